"""Multi-token prediction (DeepSeek-V3 §2.2): the loss by hand, the module's inputs, causality, conversion."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import losses
from moejax.config import base_config
from moejax.convert import hf
from moejax.errors import ConfigError
from moejax.models.build import decoder_config
from moejax.models.decoder import DecoderLM


def test_mtp_loss_by_hand():
  # B 1, L 3, V 2; depth 1 predicts token i + 2 at position i: targets[i + 1], for positions 0 and 1.
  targets = jnp.array([[1, 0, 1]])  # tokens t1, t2, t3
  logits = jnp.log(jnp.array([[[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]]]))  # Position 2 has no target: ignored.
  # Position 0's target is targets[0, 1] = 0: p = 0.25; position 1's is targets[0, 2] = 1: p = 0.5.
  want = -(math.log(0.25) + math.log(0.5)) / 2
  assert float(losses.multi_token_prediction_loss([logits], targets)) == pytest.approx(want, rel=1e-6)
  # Depth 2 scores position 0 only (target targets[0, 2] = 1, p = 0.75); the loss is the mean over depths.
  two = float(losses.multi_token_prediction_loss([logits, logits], targets))
  assert two == pytest.approx((want - math.log(0.75)) / 2, rel=1e-6)


def _mtp_model(depth=2, router="top_k"):
  cfg = base_config("lm")
  cfg.model.num_layers, cfg.model.d_model, cfg.model.d_ff, cfg.model.mtp_depth = 2, 32, 64, depth
  cfg.moe.router, cfg.moe.num_experts = router, 4
  cfg.moe.dispatcher = "dropless"  # No capacity: a token's output cannot depend on later tokens.
  cfg.train.seq_len = 10
  return DecoderLM(decoder_config(cfg, 20), rngs=nnx.Rngs(0))


# Jitted: eager op-by-op dispatch of a dropless MoE takes a minute a call on CPU.
_forward = nnx.jit(lambda model, tokens: model.forward(tokens))
_call = nnx.jit(lambda model, tokens: model(tokens))
_block = nnx.jit(lambda block, x, tokens: block(x, train=False, token_ids=tokens))


def test_mtp_modules_see_the_token_k_ahead_and_nothing_later():
  model = _mtp_model(depth=2)
  tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 20)
  logits, aux, mtp_logits = _forward(model, tokens)
  assert len(mtp_logits) == 2 and mtp_logits[0].shape == (2, 10, 20)
  assert len(aux) == len(model.moe_layers()) == 3  # Block 1's MoE, then the 2 MTP modules' (each like block 1).
  assert model.moe_layers()[1] is model.mtp[0].block.ffn
  # __call__ is the main model alone: the same logits, no MTP aux.
  main, main_aux = _call(model, tokens)
  np.testing.assert_array_equal(main, logits)
  assert len(main_aux) == 1
  # Depth k at position i reads tokens up to i + k: changing token 6 leaves depth 1's positions
  # 0..4 and depth 2's positions 0..3 unchanged, and changes depth 1 at position 5.
  changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % 20)
  _, _, other = _forward(model, changed)
  np.testing.assert_allclose(other[0][:, :5], mtp_logits[0][:, :5], atol=1e-6)
  np.testing.assert_allclose(other[1][:, :4], mtp_logits[1][:, :4], atol=1e-6)
  assert not np.allclose(other[0][:, 5], mtp_logits[0][:, 5], atol=1e-4)


def test_mtp_module_is_the_papers_formula():
  # h' = Block(W·[RMSNorm(emb(t_{i+1})); RMSNorm(h_i)]) and its logits Norm(h')·head, by hand.
  model = _mtp_model(depth=1)
  tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, 20)
  module = model.mtp[0]
  module.embed_norm.scale[...] = jnp.linspace(0.5, 1.5, 32)  # Away from 1, so that a swapped norm shows.
  module.hidden_norm.scale[...] = jnp.linspace(2.0, 1.0, 32)
  x = model.embed(tokens)
  for block in model.blocks:
    x, _ = _block(block, x, tokens)
  emb = np.asarray(model.embed(jnp.roll(tokens, -1, axis=1)), np.float64)
  h = np.asarray(x, np.float64)

  def rms(v, scale):
    return v / np.sqrt((v**2).mean(-1, keepdims=True) + 1e-6) * np.asarray(scale, np.float64)

  joined = np.concatenate([rms(emb, module.embed_norm.scale[...]), rms(h, module.hidden_norm.scale[...])], -1)
  projected = joined @ np.asarray(module.proj[...], np.float64)
  out, _ = _block(module.block, jnp.asarray(projected, jnp.float32), jnp.roll(tokens, -1, axis=1))
  want = rms(np.asarray(out, np.float64), module.norm.scale[...]) @ np.asarray(model.unembed.kernel[...], np.float64)
  _, _, (got,) = _forward(model, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_mtp_weights_convert_both_ways():
  cfg = base_config("lm")
  overrides = {
    "model.attention": "mla",
    "model.num_layers": 2,
    "model.d_model": 32,
    "model.num_heads": 2,
    "model.d_ff": 48,
    "model.dense_layers": (0,),
    "model.moe_every": 1,
    "model.activation": "swiglu",
    "model.mtp_depth": 1,
    "moe.router": "deepseek",
    "moe.num_experts": 4,
    "moe.d_expert": 16,
    "moe.num_shared_experts": 1,
  }
  for key, value in overrides.items():
    section, name = key.split(".")
    cfg[section][name] = value
  cfg.train.seq_len = 8
  model = DecoderLM(decoder_config(cfg, 20), rngs=nnx.Rngs(0))
  weights = hf.export_hf_weights(model, "deepseek_v3")
  assert weights["model.layers.2.eh_proj.weight"].shape == (32, 64)  # The MTP module is layer L = 2.
  again = DecoderLM(decoder_config(cfg, 20), rngs=nnx.Rngs(1))
  hf.load_hf_weights(again, weights, "deepseek_v3")
  tokens = jnp.arange(16).reshape(2, 8) % 20
  for ours, theirs in zip(_forward(model, tokens)[2], _forward(again, tokens)[2]):
    np.testing.assert_array_equal(ours, theirs)
  # The released checkpoints' copies of the shared embedding must be it; a missing module is named.
  copies = {**weights, "model.layers.2.embed_tokens.weight": weights["model.embed_tokens.weight"]}
  hf.load_hf_weights(again, copies, "deepseek_v3")
  bad = {**weights, "model.layers.2.embed_tokens.weight": weights["model.embed_tokens.weight"] + 1}
  with pytest.raises(ConfigError, match=r"tensor model\.layers\.2\.embed_tokens\.weight: differs"):
    hf.load_hf_weights(again, bad, "deepseek_v3")
  main_only = {k: v for k, v in weights.items() if not k.startswith("model.layers.2.")}
  with pytest.raises(ConfigError, match=r"model\.layers\.2\.eh_proj\.weight: is missing.*mtp_depth=0"):
    hf.load_hf_weights(again, main_only, "deepseek_v3")
