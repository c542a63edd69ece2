"""gpt-oss's expert pieces: clamped SwiGLU by hand, biased experts across the three expert paths
(dropless blocks with its hand-written VJP, ragged_dot, capacity buffers) against a float64 numpy
loop and a dense autodiff reference, and the router bias."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.dropless import dropless_expert_ffn
from moejax.layers.ffn import activate
from moejax.layers.moe import MoEConfig, MoELayer, capacity_expert_ffn


def _np_clamped_swiglu(h, gate):
  h = np.minimum(h, 7.0)
  return (np.clip(gate, -7.0, 7.0) + 1) * h / (1 + np.exp(-1.702 * h))


def test_clamped_swiglu_by_hand():
  h = jnp.array([-1.0, 0.0, 3.0, 10.0])
  gate = jnp.array([-8.0, 0.5, 2.0, 9.0])
  got = np.asarray(activate(h, gate, "clamped_swiglu"))
  sig = lambda v: 1 / (1 + math.exp(-1.702 * v))
  want = [
    (-7 + 1) * (-1) * sig(-1),  # gate clamped up to -7
    0.0,  # h = 0
    (2 + 1) * 3 * sig(3),
    (7 + 1) * 7 * sig(7),  # h clamped down to 7 (from above only), gate to 7
  ]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def _params(seed, t=12, k=2, e=4, d=6, f=5):
  rng = np.random.default_rng(seed)
  normal = lambda *shape, scale=1.0: jnp.asarray(scale * rng.normal(size=shape), jnp.float32)
  tokens = normal(t, d)
  index = jnp.asarray(rng.integers(0, e, (t, k)), jnp.int32)
  weight = jnp.asarray(rng.random((t, k)), jnp.float32)
  # Pre-activations of std ~3: the clamps at ±7 cut some.
  wi, wg, wo = normal(e, d, f, scale=1.2), normal(e, d, f, scale=1.2), normal(e, f, d, scale=0.3)
  biases = (normal(e, f), normal(e, f), normal(e, d))
  return tokens, index, weight, wi, wo, wg, biases


def _np_loop(tokens, index, weight, wi, wo, wg, biases):
  """Per-token float64 loop: out[t] += w · (act(x·wi + bi, x·wg + bg)·wo + bo)."""
  tokens, weight, wi, wo, wg = (np.asarray(a, np.float64) for a in (tokens, weight, wi, wo, wg))
  bi, bg, bo = (np.asarray(b, np.float64) for b in biases)
  out = np.zeros_like(tokens)
  for t, x in enumerate(tokens):
    for k, e in enumerate(np.asarray(index)[t]):
      hidden = _np_clamped_swiglu(x @ wi[e] + bi[e], x @ wg[e] + bg[e])
      out[t] += weight[t, k] * (hidden @ wo[e] + bo[e])
  return out


@pytest.mark.filterwarnings("ignore:jax.lax.ragged_dot")
@pytest.mark.parametrize("impl,block_size", [("blocks", 3), ("ragged_dot", 64)])
def test_biased_clamped_experts_match_a_numpy_loop(impl, block_size):
  tokens, index, weight, wi, wo, wg, biases = _params(0)
  got = dropless_expert_ffn(
    tokens, index, weight, wi, wo, wg, "clamped_swiglu", impl=impl, block_size=block_size, biases=biases
  )
  np.testing.assert_allclose(got, _np_loop(tokens, index, weight, wi, wo, wg, biases), rtol=1e-4, atol=1e-4)


def test_capacity_buffers_with_biases():
  # [E, G, C, d] buffers: each slot through its expert's biased FFN.
  _, _, _, wi, wo, wg, biases = _params(1)
  buffers = jax.random.normal(jax.random.key(0), (4, 2, 3, 6))
  got = capacity_expert_ffn(buffers, wi, wo, wg, "clamped_swiglu", biases)
  x = np.asarray(buffers, np.float64)
  bi, bg, bo = (np.asarray(b, np.float64) for b in biases)
  h = np.einsum("egcd,edf->egcf", x, np.asarray(wi, np.float64)) + bi[:, None, None]
  g = np.einsum("egcd,edf->egcf", x, np.asarray(wg, np.float64)) + bg[:, None, None]
  want = np.einsum("egcf,efd->egcd", _np_clamped_swiglu(h, g), np.asarray(wo, np.float64)) + bo[:, None, None]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _dense(tokens, index, weight, wi, wo, wg, biases):
  """Every expert on every token, masked by the combine weights (autodiff reference)."""
  bi, bg, bo = biases
  h = jnp.einsum("td,edf->tef", tokens, wi) + bi
  g = jnp.einsum("td,edf->tef", tokens, wg) + bg
  out = jnp.einsum("tef,efd->ted", activate(h, g, "clamped_swiglu"), wo) + bo
  mask = jnp.einsum("tk,tke->te", weight, jax.nn.one_hot(index, wi.shape[0]))
  return jnp.einsum("te,ted->td", mask, out)


@pytest.mark.filterwarnings("ignore:jax.lax.ragged_dot")
@pytest.mark.parametrize("impl", ["blocks", "ragged_dot"])
def test_bias_gradients_match_autodiff_of_the_dense_reference(impl):
  tokens, index, weight, wi, wo, wg, biases = _params(2)
  probe = jax.random.normal(jax.random.key(1), tokens.shape)

  def loss(fn, tokens, wi, wo, wg, biases):
    return jnp.sum(probe * fn(tokens, wi, wo, wg, biases))

  ours = lambda x, wi, wo, wg, b: dropless_expert_ffn(
    x, index, weight, wi, wo, wg, "clamped_swiglu", impl=impl, block_size=2, biases=b
  )
  dense = lambda x, wi, wo, wg, b: _dense(x, index, weight, wi, wo, wg, b)
  got = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2, 3, 4))(tokens, wi, wo, wg, biases)
  want = jax.grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2, 3, 4))(tokens, wi, wo, wg, biases)
  for ours_grad, want_grad in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(ours_grad, want_grad, rtol=2e-4, atol=2e-4)


def test_router_bias_moves_the_choice():
  # A +10 bias on expert 3's logit: every token's first choice becomes expert 3.
  cfg = MoEConfig(num_experts=4, top_k=2, router_bias=True, dispatcher="dropless", d_expert=8, activation="gelu")
  layer = MoELayer(8, cfg, rngs=nnx.Rngs(0))
  assert layer.router.kernel_bias[...].shape == (4,) and not np.any(layer.router.kernel_bias[...])
  layer.router.kernel_bias[...] = jnp.array([0.0, 0.0, 0.0, 10.0])
  tokens = jax.random.normal(jax.random.key(2), (1, 6, 8))
  decision, stats = layer.router(tokens, capacity=0, train=False, rng=jax.random.key(0))
  assert np.all(np.asarray(decision.expert_index)[..., 0] == 3)
  logits = np.asarray(tokens, np.float64) @ np.asarray(layer.router.kernel[...], np.float64) + [0, 0, 0, 10]
  np.testing.assert_allclose(stats["logits"], logits, rtol=1e-5, atol=1e-5)


def test_expert_biases_are_expert_parameters():
  cfg = MoEConfig(
    num_experts=4, top_k=2, expert_bias=True, dispatcher="dropless", d_expert=8, activation="clamped_swiglu"
  )
  layer = MoELayer(8, cfg, rngs=nnx.Rngs(0))
  assert layer.bi[...].shape == (4, 8) and layer.bg[...].shape == (4, 8) and layer.bo[...].shape == (4, 8)
  # Zero-initialised: the layer starts as the unbiased one.
  assert not any(np.any(p[...]) for p in (layer.bi, layer.bg, layer.bo))
