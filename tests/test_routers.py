"""Every router through the MoE layer: dispatchers agree, dropless = per-token loop, state, losses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import losses
from moejax.layers.moe import MoEConfig, MoELayer
from moejax.parallel import make_mesh

BASE = MoEConfig(num_experts=4, top_k=2, d_expert=16, capacity_factor=1.0)
ROUTER_CASES = {
  "top_k/choice_major": dict(router="top_k", priority="choice_major"),
  "top_k/token_major/renormalized": dict(router="top_k", combine_weights="renormalized"),
  "top_k/bpr": dict(router="top_k", priority="bpr"),
  "top_k/noisy": dict(router="top_k", router_noise="noisy_top_k"),
  "top_k/jitter+random_second": dict(
    router="top_k", router_noise="jitter", second_expert_policy="random", combine_weights="renormalized"
  ),
  "expert_choice": dict(router="expert_choice", capacity_factor=2.0),
  "expert_choice/capped": dict(router="expert_choice", capacity_factor=2.0, max_experts_per_token=1),
  "hash": dict(router="hash"),
  "dense": dict(router="dense"),
  "deepseek/sigmoid/groups": dict(
    router="deepseek",
    score_function="sigmoid",
    num_expert_groups=2,
    top_expert_groups=1,
    combine_weights="renormalized",
    num_shared_experts=1,
  ),
  "soft_moe": dict(router="soft_moe", slots_per_expert=2),
}


def _layer(mesh=None, **fields):
  return MoELayer(8, dataclasses.replace(BASE, **fields), mesh=mesh, rngs=nnx.Rngs(0))


def _forward_and_grads(layer, x, token_ids, rng):
  def loss_fn(layer, x):
    y, aux = layer(x, train=True, rng=rng, token_ids=token_ids)
    return jnp.sum(jnp.sin(y)) + aux["load_balance_loss"] + aux["z_loss"], (y, aux)

  (_, (y, aux)), grads = nnx.jit(nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(layer, x)
  return y, aux, grads


@pytest.mark.parametrize("name", list(ROUTER_CASES))
def test_sort_dispatch_equals_einsum_for_every_router(name):
  """Property: the same decision gives the same output and gradients through both dispatchers."""
  x = jax.random.normal(jax.random.key(1), (2, 12, 8))
  token_ids = jax.random.randint(jax.random.key(2), (2, 12), 0, 50)
  rng = jax.random.key(3)
  y_sort, aux_sort, g_sort = _forward_and_grads(_layer(dispatcher="sort", **ROUTER_CASES[name]), x, token_ids, rng)
  y_ein, aux_ein, g_ein = _forward_and_grads(_layer(dispatcher="einsum", **ROUTER_CASES[name]), x, token_ids, rng)
  np.testing.assert_allclose(y_sort, y_ein, atol=1e-5)
  for a, b in zip(jax.tree.leaves((aux_sort, g_sort)), jax.tree.leaves((aux_ein, g_ein))):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)
  assert np.abs(y_sort).max() > 0


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_equals_per_token_loop(top_k):
  """Dropless: every choice reaches its expert (no capacity), as a per-token loop computes."""
  layer = _layer(dispatcher="dropless", top_k=top_k, capacity_factor=0.25)  # cf is ignored.
  x = np.asarray(jax.random.normal(jax.random.key(4), (2, 16, 8)))
  y, aux = nnx.jit(lambda layer, x: layer(x, train=True))(layer, jnp.asarray(x))
  w_router, wi, wo = (np.asarray(v[...], np.float64) for v in (layer.router.kernel, layer.wi, layer.wo))
  expected = np.zeros_like(x, dtype=np.float64)
  for b in range(2):
    for t in range(16):
      logits = x[b, t] @ w_router
      probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
      for e in np.argsort(-probs, kind="stable")[:top_k]:
        expected[b, t] += probs[e] * (_gelu(x[b, t] @ wi[e]) @ wo[e])
  np.testing.assert_allclose(y, expected, atol=2e-5)
  np.testing.assert_array_equal(aux["fraction_dropped"], 0.0)


def test_dropless_gradients_match_a_large_capacity_sort_layer():
  x = jax.random.normal(jax.random.key(5), (2, 16, 8))
  big = dict(top_k=2, capacity_factor=4.0)  # Capacity = S: nothing is dropped.
  _, _, g_dropless = _forward_and_grads(_layer(dispatcher="dropless", **big), x, None, None)
  _, _, g_sort = _forward_and_grads(_layer(dispatcher="sort", **big), x, None, None)
  for a, b in zip(jax.tree.leaves(g_dropless), jax.tree.leaves(g_sort)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_deepseek_bias_update_rule():
  layer = _layer(router="deepseek", score_function="sigmoid", bias_update_rate=0.01)
  # Expert loads 5, 1, 3, 3 (mean 3): over-loaded e0 goes down, under-loaded e1 up, e2/e3 stay.
  layer.update_balance({"selection_counts": jnp.array([5.0, 1.0, 3.0, 3.0])})
  np.testing.assert_allclose(layer.router.bias[...], [-0.01, 0.01, 0.0, 0.0])
  # The bias chooses but never weights: a huge bias on e3 makes every token pick it, with
  # its sigmoid score (not score + bias) as weight.
  layer.router.bias[...] = jnp.array([0.0, 0.0, 0.0, 100.0])
  x = jax.random.normal(jax.random.key(6), (1, 6, 8))
  decision, stats = layer.router(x.reshape(1, 6, 8), capacity=6, train=False, rng=jax.random.key(0))
  np.testing.assert_array_equal(decision.expert_index[..., 0], 3)
  logits = jnp.einsum("gsd,de->gse", x, layer.router.kernel[...])
  np.testing.assert_allclose(decision.combine_weight[..., 0], jax.nn.sigmoid(logits)[..., 3], rtol=1e-6)


def test_load_balance_scopes_on_eight_devices():
  """'group' and 'global_batch' do not depend on the mesh; 'global_batch' uses batch-wide f and P."""
  x = jax.random.normal(jax.random.key(7), (8, 12, 8))
  out = {}
  for scope in ("group", "local_batch", "global_batch"):
    for n in (1, 8):
      layer = _layer(mesh=make_mesh(n), load_balance_scope=scope)
      _, aux = nnx.jit(lambda layer, x: layer(x, train=True))(layer, x)
      out[scope, n] = float(aux["load_balance_loss"])
  assert out["group", 1] == pytest.approx(out["group", 8], rel=1e-5)
  assert out["global_batch", 1] == pytest.approx(out["global_batch", 8], rel=1e-5)
  assert out["local_batch", 1] == pytest.approx(out["global_batch", 1], rel=1e-5)  # One device = the batch.
  assert out["local_batch", 8] != pytest.approx(out["local_batch", 1], rel=1e-3)
  # Batch-wide f and P: E·Σ f·P of the whole batch's tokens, by hand.
  layer = _layer(load_balance_scope="global_batch")
  logits = jnp.einsum("gsd,de->gse", x, layer.router.kernel[...])
  probs = jax.nn.softmax(logits).reshape(1, -1, 4)
  expected = losses.load_balance_loss(probs, jax.lax.top_k(probs, 2)[1])
  assert out["global_batch", 1] == pytest.approx(float(expected), rel=1e-5)


def test_smooth_load_hand_case():
  # One token, 3 experts, K = 1. Noisy logits (2, 1, 0): e0 is in the top-1 and the best other
  # is 1, so P(e0) = Φ((clean0 − 1)/σ0); e1, e2 are out and must beat 2.
  clean = jnp.array([[1.5, 1.0, 0.5]])
  noisy = jnp.array([[2.0, 1.0, 0.0]])
  std = jnp.array([[0.5, 1.0, 2.0]])
  norm_cdf = jax.scipy.stats.norm.cdf
  expected = [norm_cdf((1.5 - 1.0) / 0.5), norm_cdf((1.0 - 2.0) / 1.0), norm_cdf((0.5 - 2.0) / 2.0)]
  np.testing.assert_allclose(losses.smooth_load(clean, noisy, std, 1), expected, rtol=1e-6)


def test_expert_choice_metrics_count_experts_per_token():
  layer = _layer(router="expert_choice", capacity_factor=2.0)
  _, aux = nnx.jit(lambda layer, x: layer(x, train=True))(layer, jax.random.normal(jax.random.key(8), (2, 8, 8)))
  # E·C = 4·4 = 16 slots for 8 tokens per group: on average 2 experts per token.
  shares = [float(aux[f"tokens_with_ge{n}_experts"]) for n in (1, 2, 3)]
  assert shares[0] >= shares[1] >= shares[2]
  np.testing.assert_allclose(aux["expert_load"], 0.25)  # Perfect balance by construction.


def test_dropless_inside_shard_map_on_eight_devices():
  x = jax.random.normal(jax.random.key(9), (8, 12, 8))
  one = _forward_and_grads(_layer(mesh=make_mesh(1), dispatcher="dropless"), x, None, None)
  eight = _forward_and_grads(_layer(mesh=make_mesh(8), dispatcher="dropless"), x, None, None)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_skipped_second_experts_are_not_counted_as_dropped():
  # Capacity = S: nothing can overflow, so every unused 2nd choice was skipped by GShard's policy.
  layer = _layer(second_expert_policy="random", combine_weights="renormalized", capacity_factor=4.0)
  _, aux = nnx.jit(lambda layer, x, rng: layer(x, train=True, rng=rng))(
    layer, jax.random.normal(jax.random.key(10), (4, 16, 8)), jax.random.key(11)
  )
  np.testing.assert_array_equal(aux["fraction_dropped"], 0.0)
  assert 0.0 < float(aux["second_expert_skipped"]) < 1.0


def test_expert_choice_evaluates_with_its_training_capacity():
  layer = _layer(router="expert_choice", capacity_factor=1.0, eval_capacity_factor=2.0)
  assert layer.router.capacity(16, train=False) == layer.router.capacity(16, train=True) == 4
  top_k = _layer(router="top_k", capacity_factor=1.0, eval_capacity_factor=2.0)
  assert (top_k.router.capacity(16, train=True), top_k.router.capacity(16, train=False)) == (8, 16)
