"""Decoder LM: causality through the MoE router, MoE placement, and shape-only accounting."""

import jax
import numpy as np
import pytest
from flax import nnx

from moejax import accounting
from moejax.layers.moe import MoEConfig, MoELayer
from moejax.models.decoder import DecoderConfig, DecoderLM


def _small(**overrides):
  moe = MoEConfig(num_experts=4, top_k=2, d_expert=32, capacity_factor=1.0, priority="token_major")
  fields = dict(vocab_size=32, num_layers=2, d_model=16, num_heads=2, d_ff=32, max_len=24, moe_every=1, moe=moe)
  fields.update(overrides)
  return DecoderConfig(**fields)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_future_tokens_do_not_change_the_past(positions):
  """Leakage test: perturb tokens after position t; logits at positions <= t must not move.

  Capacity 1.0 makes the experts overflow, so this also checks that token-major dropping is causal.
  """
  model = DecoderLM(_small(positions=positions), rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda m, x: m(x, train=True))
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 32)
  t = 11
  changed = tokens.at[:, t + 1 :].set(jax.random.randint(jax.random.key(2), (2, 24 - t - 1), 0, 32))
  (a, aux), (b, _) = forward(model, tokens), forward(model, changed)
  assert float(aux[0]["fraction_dropped"].sum()) > 0
  np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
  assert np.abs(a[:, t + 1 :] - b[:, t + 1 :]).max() > 1e-3  # The change is visible afterwards.


def test_moe_every_places_moe_layers():
  model = DecoderLM(_small(num_layers=4, moe_every=2), rngs=nnx.Rngs(0))
  kinds = [isinstance(block.ffn, MoELayer) for block in model.blocks]
  assert kinds == [False, True, False, True]
  dense = DecoderLM(_small(num_layers=2, moe_every=0), rngs=nnx.Rngs(0))
  assert not any(isinstance(block.ffn, MoELayer) for block in dense.blocks)


def test_accounting_by_hand():
  cfg = DecoderConfig(
    vocab_size=64,
    num_layers=4,
    d_model=128,
    num_heads=4,
    d_ff=512,
    max_len=128,
    moe_every=2,
    moe=MoEConfig(num_experts=8, top_k=2, d_expert=512),
  )
  attention = 4 * 128 * 128  # q, k, v, o per layer.
  dense_ffn, expert = 2 * 128 * 512, 2 * 128 * 512
  router = 128 * 8
  norms = 2 * 4 * 128 + 128
  embeddings = 2 * 64 * 128  # Input table and untied unembedding.
  total = 4 * attention + 2 * dense_ffn + 2 * (router + 8 * expert) + norms + embeddings
  active = total - 2 * 6 * expert  # Each token skips 6 of the 8 experts in both MoE layers.
  cost = accounting.decoder_cost(cfg)
  assert cost.total_params == total == 2_641_024
  assert cost.active_params == active
  matmul = active - 64 * 128 - norms  # The input table is a lookup; norms are not matmuls.
  assert cost.train_flops_per_token == 6 * (matmul + 4 * 128 * 128)
  # The count really is shape-only: it agrees with a materialised model.
  real = DecoderLM(cfg, rngs=nnx.Rngs(0))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(real, nnx.Param))) == total
