"""The MoE layer against a per-token numpy loop, and across meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.layers.moe import MoEConfig, MoELayer
from moejax.parallel import make_mesh


def _gelu(x):
  """tanh-approximate GELU, as jax.nn.gelu computes by default."""
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _reference(layer: MoELayer, x: np.ndarray, capacity_factor: float) -> np.ndarray:
  """Per-token loop: softmax, top-k, token-major queues with capacity, raw weights, experts."""
  cfg = layer.cfg
  w_router, wi, wo = (np.asarray(v[...], np.float64) for v in (layer.router.kernel, layer.wi, layer.wo))
  b, l, d = x.shape
  s = cfg.group_size or l
  groups = x.reshape(-1, s, d).astype(np.float64)
  capacity = max(1, min(s, int(np.ceil(s * cfg.top_k * capacity_factor / cfg.num_experts))))
  out = np.zeros_like(groups)
  for g, tokens in enumerate(groups):
    used = np.zeros(cfg.num_experts, int)
    for t, token in enumerate(tokens):
      logits = token @ w_router
      probs = np.exp(logits - logits.max())
      probs /= probs.sum()
      for e in np.argsort(-probs, kind="stable")[: cfg.top_k]:
        if used[e] < capacity:  # Otherwise this choice is dropped: it adds nothing.
          used[e] += 1
          out[g, t] += probs[e] * (_gelu(token @ wi[e]) @ wo[e])
  return out.reshape(b, l, d)


@pytest.mark.parametrize("top_k,capacity_factor,group_size", [(1, 1.0, 0), (2, 1.25, 0), (2, 0.5, 8), (3, 2.0, 32)])
def test_layer_matches_per_token_loop(top_k, capacity_factor, group_size):
  cfg = MoEConfig(
    num_experts=4,
    top_k=top_k,
    d_expert=16,
    capacity_factor=capacity_factor,
    group_size=group_size,
    priority="token_major",
  )
  layer = MoELayer(8, cfg, rngs=nnx.Rngs(0))
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 16, 8)))
  y, aux = nnx.jit(lambda layer, x: layer(x, train=True))(layer, jnp.asarray(x))
  np.testing.assert_allclose(y, _reference(layer, x, capacity_factor), atol=2e-5)
  if capacity_factor < 1:
    assert float(aux["fraction_dropped"].sum()) > 0  # The tight case really drops.


@pytest.mark.parametrize("dispatcher", ["sort", "einsum"])
def test_sharded_over_data_equals_one_device(dispatcher):
  """Routing per device inside shard_map on 8 devices gives the 1-device output, loss and gradients."""
  cfg = MoEConfig(num_experts=4, top_k=2, d_expert=16, dispatcher=dispatcher, capacity_factor=1.0)
  x = jax.random.normal(jax.random.key(2), (8, 12, 8))

  def loss_and_grad(mesh):
    layer = MoELayer(8, cfg, mesh=mesh, rngs=nnx.Rngs(0))

    def loss_fn(layer, x):
      y, aux = layer(x, train=True)
      return jnp.sum(y**2) + aux["load_balance_loss"] + aux["z_loss"], aux

    (loss, aux), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(layer, x)
    return loss, aux, nnx.state(grads)

  one = loss_and_grad(make_mesh(1))
  eight = loss_and_grad(make_mesh(8))
  assert jax.device_count() == 8
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_dropped_token_gets_zero_output():
  # One expert with capacity 1 (cf = 0.25 of 4 tokens): only token 0 is processed.
  cfg = MoEConfig(num_experts=1, top_k=1, d_expert=4, capacity_factor=0.25)
  layer = MoELayer(4, cfg, rngs=nnx.Rngs(0))
  y, aux = nnx.jit(lambda layer, x: layer(x, train=True))(layer, jax.random.normal(jax.random.key(3), (1, 4, 4)))
  assert np.abs(y[0, 0]).sum() > 0
  np.testing.assert_array_equal(y[0, 1:], 0.0)
  np.testing.assert_allclose(aux["fraction_dropped"], [0.75])


@pytest.mark.parametrize("dispatcher", ["sort", "dropless"])
def test_pallas_permutation_equals_xla_in_the_layer(dispatcher):
  """moe.permute_backend='pallas' (interpreted on CPU) gives the XLA path's output and gradients."""
  x = jax.random.normal(jax.random.key(4), (2, 8, 8))

  def loss_and_grad(backend):
    cfg = MoEConfig(
      num_experts=4,
      top_k=2,
      d_expert=16,
      capacity_factor=0.75,
      dispatcher=dispatcher,
      permute_backend=backend,
      dropless_block_size=4,
    )
    layer = MoELayer(8, cfg, rngs=nnx.Rngs(0))

    def loss_fn(layer, x):
      y, aux = layer(x, train=True)
      return jnp.sum(jnp.sin(y)) + aux["load_balance_loss"], y

    (loss, y), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(layer, x)
    return y, nnx.state(grads)

  (y_xla, g_xla), (y_pallas, g_pallas) = loss_and_grad("xla"), loss_and_grad("pallas")
  assert np.abs(np.asarray(y_xla)).max() > 0.1
  np.testing.assert_allclose(y_pallas, y_xla, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_pallas), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
