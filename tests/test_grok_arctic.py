"""Grok-1's and Snowflake Arctic's pieces, which transformers does not implement, against hand references.

Grok-1 (xai-org/grok-1 model.py): sandwich norms, attention logits capped at 30·tanh(s/30),
embeddings × 78.38 and logits × 0.577, GeGLU experts. Arctic (Snowflake's modeling_arctic.py,
parallel_attn_mlp_res): a dense FFN on the residual stream beside an MoE that reads the block's input.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import base_config, override
from moejax.layers.attention import dot_attention
from moejax.layers.ffn import activate
from moejax.models.build import decoder_config
from moejax.models.decoder import DecoderLM


def _model(**overrides):
  cfg = override(
    base_config("lm"),
    {
      "model.num_layers": 2,
      "model.d_model": 16,
      "model.num_heads": 2,
      "model.d_ff": 32,
      "moe.num_experts": 4,
      "moe.dispatcher": "dropless",
      "train.seq_len": 8,
      **overrides,
    },
  )
  return DecoderLM(decoder_config(cfg, 24), rngs=nnx.Rngs(0))


# Jitted: eager op-by-op dispatch of the dropless MoE takes half a minute a call on CPU.
_moe = nnx.jit(lambda module, x, tokens: module(x, train=False, token_ids=tokens))
_call = nnx.jit(lambda model, tokens: model(tokens))


def test_geglu_by_hand():
  h, gate = jnp.array([-1.0, 0.5, 2.0]), jnp.array([3.0, -2.0, 0.5])
  gelu = lambda v: 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))  # tanh approximation
  np.testing.assert_allclose(activate(h, gate, "geglu"), [gelu(-1.0) * 3, gelu(0.5) * -2, gelu(2.0) * 0.5], rtol=1e-6)


def test_attention_softcap_by_hand():
  # One query, two keys with scores 40 and 35 (after the 1/√H scale): capped to 30·tanh(40/30) = 26.10
  # and 30·tanh(35/30) = 24.70, so the first key's weight is σ(1.41) = 0.803, not σ(5) = 0.993.
  q = jnp.array([[[[40.0, 35.0]]]]) * math.sqrt(2)  # [B, L, N, H], H 2: scale 1/√2
  k = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [B, T, N_kv, H]
  v = jnp.array([[[[1.0, 0.0]], [[0.0, 1.0]]]])
  out = dot_attention(q, k, v, scale=2**-0.5, causal=False, softcap=30.0)
  gap = 30 * math.tanh(40 / 30) - 30 * math.tanh(35 / 30)
  p = 1 / (1 + math.exp(-gap))
  assert p == pytest.approx(0.8031, abs=1e-4)
  np.testing.assert_allclose(out[0, 0, 0], [p, 1 - p], rtol=1e-5)


def test_grok_sandwich_norms_and_multipliers():
  model = _model(**{"model.post_norms": True, "model.attention_softcap": 30.0, "model.activation": "geglu"})
  block = model.blocks[1]
  for norm in (block.attention_post_norm, block.ffn_post_norm):  # Away from 1, so that a skipped norm shows.
    norm.scale[...] = jnp.linspace(0.5, 2.0, 16)
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  tokens = jnp.zeros((2, 8), jnp.int32)
  # h = x + Norm'(Attn(Norm(x))); out = h + Norm'(MoE(Norm(h))).
  h = x + block.attention_post_norm(block.attention(block.attention_norm(x)))
  moe, _ = _moe(block.ffn, block.ffn_norm(h), tokens)
  out, _ = _moe(block, x, tokens)
  np.testing.assert_allclose(out, h + block.ffn_post_norm(moe), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_embedding_and_output_multipliers(tie):
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 24)
  scaled = _model(**{"model.embed_multiplier": 3.0, "model.output_multiplier": 0.5, "model.tie_embeddings": tie})
  plain = _model(**{"model.tie_embeddings": tie})
  # The logits × 0.5 exactly; the embeddings × 3 equal a model whose input table is 3× larger (untied:
  # the output head is apart; tied, the multiplier must not reach the output head).
  if not tie:
    plain.embed.embedding[...] = 3.0 * scaled.embed.embedding[...]
    np.testing.assert_allclose(_call(scaled, tokens)[0], 0.5 * _call(plain, tokens)[0], rtol=1e-5, atol=1e-5)
  else:
    x = scaled.embed(tokens) * 3.0
    for block in scaled.blocks:
      x, _ = _moe(block, x, tokens)
    want = 0.5 * scaled.embed.attend(scaled.final_norm(x))
    np.testing.assert_allclose(_call(scaled, tokens)[0], want, rtol=1e-5, atol=1e-5)


def test_arctic_dense_ffn_beside_an_moe_reading_the_block_input():
  model = _model(**{"model.parallel_dense_d_ff": 16, "model.activation": "swiglu"})
  dense_block, moe_block = model.blocks  # moe_every 2: block 1 is MoE; block 0 stays a plain dense block.
  assert dense_block.dense_ffn is None and moe_block.dense_ffn.wi[...].shape == (16, 16)
  moe_block.dense_norm.scale[...] = jnp.linspace(0.5, 2.0, 16)
  x = jax.random.normal(jax.random.key(2), (2, 8, 16))
  tokens = jnp.zeros((2, 8), jnp.int32)
  h = x + moe_block.attention(moe_block.attention_norm(x))
  moe, _ = _moe(moe_block.ffn, moe_block.ffn_norm(x), tokens)  # the block's input, not h
  want = h + moe_block.dense_ffn(moe_block.dense_norm(h)) + moe
  out, _ = _moe(moe_block, x, tokens)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # The MoE reading h instead would give another output.
  other, _ = _moe(moe_block.ffn, moe_block.ffn_norm(h), tokens)
  assert not np.allclose(h + moe_block.dense_ffn(moe_block.dense_norm(h)) + other, out, atol=1e-4)
