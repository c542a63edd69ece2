"""KV-cache decoding (DecoderLM.decode): prefill then one token at a time equals the full forward pass.

For every attention kind (multi-head, grouped-query, QK-norm of either scope, biases, sliding
windows with sinks, clipped q/k/v with LayerNorm, soft-capped logits with sandwich norms, multi-head
latent attention with and without a query LoRA, YaRN, learned positions) and causal routers
(dropless top-k, DeepSeek's grouped routing with shared experts and its bias, hash, dense-gated),
the logits of a prefill of P prompt tokens and of each later token decoded alone equal the logits
of one forward pass over the whole sequence (float32, 2e-5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import base_config, override
from moejax.models.build import decoder_config
from moejax.models.decoder import DecoderLM

VOCAB, LENGTH, PROMPT = 24, 12, 5
SMALL = {
  "model.num_layers": 2,
  "model.d_model": 32,
  "model.num_heads": 4,
  "model.d_ff": 64,
  "moe.num_experts": 4,
  "moe.dispatcher": "dropless",
  "train.seq_len": LENGTH,
}
_MLA = {
  "model.attention": "mla",
  "model.kv_lora_rank": 16,
  "model.qk_nope_head_dim": 8,
  "model.qk_rope_head_dim": 8,
  "model.v_head_dim": 8,
}
CASES = {
  "mha_top2": {},
  "gqa_qk_norm_per_head": {"model.num_kv_heads": 2, "model.qk_norm": True, "model.qk_norm_scope": "per_head"},
  "qk_norm_projection_biases": {
    "model.qk_norm": True,
    "model.qk_norm_scope": "projection",
    "model.attention_bias": "qkvo",
  },
  "sliding_window_sinks": {
    "model.num_kv_heads": 2,
    "model.sliding_window": 3,
    "model.full_attention_every": 2,
    "model.attention_sinks": True,
    "model.attention_bias": "qkvo",
  },
  "dbrx_clip_layernorm": {"model.clip_qkv": 0.3, "model.norm": "layer", "model.num_kv_heads": 2},
  "grok_softcap_post_norms": {"model.attention_softcap": 0.5, "model.post_norms": True, "model.activation": "geglu"},
  "mla_deepseek_v3": {
    **_MLA,
    "model.q_lora_rank": 24,
    "model.rope_interleaved": True,
    "model.rope_scaling": "yarn",
    "model.yarn_factor": 4.0,
    "model.yarn_original_max_len": 4,
    "moe.router": "deepseek",
    "moe.score_function": "sigmoid",
    "moe.num_experts": 8,
    "moe.top_k": 2,
    "moe.num_expert_groups": 4,
    "moe.top_expert_groups": 2,
    "moe.num_shared_experts": 1,
    "model.mtp_depth": 1,
  },
  "mla_without_q_lora": {**_MLA, "model.q_lora_rank": 0},
  "learned_positions_tied_hash": {
    "model.positions": "learned",
    "model.tie_embeddings": True,
    "moe.router": "hash",
    "moe.top_k": 1,
  },
  "dense_gated_arctic": {"moe.router": "dense", "model.parallel_dense_d_ff": 16, "model.activation": "swiglu"},
}

_call = nnx.jit(lambda model, tokens: model(tokens))
_decode = nnx.jit(lambda model, tokens, cache, start: model.decode(tokens, cache, start))


def _model(overrides, seed=0):
  cfg = override(base_config("lm"), {**SMALL, **overrides})
  return DecoderLM(decoder_config(cfg, VOCAB), rngs=nnx.Rngs(seed))


def _decoded(model, tokens, prompt):
  """Logits of a prefill of `prompt` tokens, then of each later token decoded alone: [B, L, V]."""
  cache = model.init_cache(tokens.shape[0], LENGTH)
  out = []
  if prompt:
    logits, cache = _decode(model, tokens[:, :prompt], cache, jnp.int32(0))
    out.append(logits)
  for i in range(prompt, tokens.shape[1]):
    logits, cache = _decode(model, tokens[:, i : i + 1], cache, jnp.int32(i))
    out.append(logits)
  return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_then_decode_equals_the_full_forward(case):
  model = _model(CASES[case])
  tokens = jax.random.randint(jax.random.key(1), (2, LENGTH), 0, VOCAB)
  full, _ = _call(model, tokens)
  np.testing.assert_allclose(_decoded(model, tokens, PROMPT), full, rtol=2e-5, atol=2e-5)


def test_the_sliding_window_reaches_into_the_cache():
  """Block 0 sees 3 keys: a token decoded late must not see the prompt's first tokens (their change is invisible)."""
  model = _model(CASES["sliding_window_sinks"] | {"model.num_layers": 1, "moe.router": "dense"})
  tokens = jax.random.randint(jax.random.key(2), (1, LENGTH), 0, VOCAB)
  changed = tokens.at[:, 0].set((tokens[:, 0] + 1) % VOCAB)
  a, b = _decoded(model, tokens, PROMPT), _decoded(model, changed, PROMPT)
  np.testing.assert_array_equal(a[:, 3:], b[:, 3:])  # Positions 3.. see keys 1.. only (window 3).
  assert not np.allclose(a[:, 2], b[:, 2])


def test_a_capacity_router_decoding_one_token_a_group_drops_nothing():
  """Top-2 with capacity factor 1.25 (a capacity of one slot an expert for one token): token by token,
  the logits are the dropless model's (the same weights) over the whole sequence."""
  capacity = _model({"moe.dispatcher": "einsum", "moe.capacity_factor": 1.25})
  dropless = _model({})
  for (path, a), (_, b) in zip(
    nnx.to_flat_state(nnx.state(capacity, nnx.Param)), nnx.to_flat_state(nnx.state(dropless, nnx.Param))
  ):
    np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))
  tokens = jax.random.randint(jax.random.key(3), (2, LENGTH), 0, VOCAB)
  full, _ = _call(dropless, tokens)
  np.testing.assert_allclose(_decoded(capacity, tokens, 0), full, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dispatcher", ["dropless", "einsum"])
def test_expert_parallel_decoding_equals_one_device(dispatcher):
  """On a data 2 × expert 4 mesh of the 8 fake devices (each device's tokens to its experts' devices
  and back: all_to_all), prefill and decode give the one-device model's full-forward logits; the
  capacity dispatcher decodes token by token (a group of one token cannot drop it)."""
  from moejax.parallel import make_mesh

  overrides = {"moe.dispatcher": dispatcher, "moe.expert_exchange": "padded"}
  cfg = override(base_config("lm"), {**SMALL, **overrides})
  sharded = DecoderLM(decoder_config(cfg, VOCAB), mesh=make_mesh(2, 4), rngs=nnx.Rngs(0))
  one = _model({})  # Dropless, one device: the reference, with the same weights (same seed).
  tokens = jax.random.randint(jax.random.key(4), (8, LENGTH), 0, VOCAB)  # 8 sequences: a group a device.
  full, _ = _call(one, tokens)
  prompt = PROMPT if dispatcher == "dropless" else 0
  np.testing.assert_allclose(_decoded(sharded, tokens, prompt), full, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("case", ["mha_top2", "sliding_window_sinks", "mla_deepseek_v3", "learned_positions_tied_hash"])
def test_rows_of_different_lengths_share_a_cache(case):
  """Rows prefilled right-padded (with junk tokens) to the longest prompt, then each decoded at its own
  positions (start [B]): every row's logits are its own full forward's, at every position it reached."""
  model = _model(CASES[case])
  tokens = jax.random.randint(jax.random.key(6), (3, LENGTH), 0, VOCAB)
  full = np.asarray(_call(model, tokens)[0])
  lengths = np.array([5, 2, 8])
  junk = jax.random.randint(jax.random.key(7), (3, LENGTH), 0, VOCAB)
  padded = jnp.where(jnp.arange(8) < lengths[:, None], tokens[:, :8], junk[:, :8])
  cache = model.init_cache(3, 2 * LENGTH)
  logits, cache = _decode(model, padded, cache, jnp.zeros(3, jnp.int32))
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(logits[b, :n], full[b, :n], rtol=2e-5, atol=2e-5, err_msg=f"prefill of row {b}")
  for j in range(LENGTH - lengths.min()):
    positions = lengths + j
    step = jnp.asarray([[tokens[b, p] if p < LENGTH else 0] for b, p in enumerate(positions)], jnp.int32)
    logits, cache = _decode(model, step, cache, jnp.asarray(positions, jnp.int32))
    for b, p in enumerate(positions):
      if p < LENGTH:
        np.testing.assert_allclose(logits[b, 0], full[b, p], rtol=2e-5, atol=2e-5, err_msg=f"row {b} at {p}")
