"""The anchors' conventions as options (issue #12): each against a hand value or a numpy re-implementation.

load_balance_pooling 'all_layers'     transformers' load_balancing_loss_func over every layer
load_loss_threshold 'overall'         vmoe's load loss threshold (vmoe/nn/routing.py)
routed_scaling_factor                 DeepSeek's scaled combine weights
jitter_scope 'router_and_experts'     transformers' Mixtral router_jitter_noise
routing metrics                       vmoe's token-choice and Soft MoE metrics
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.stats import norm
from test_losses import transformers_load_balancing_loss

from moejax import losses, routing, tasks
from moejax.layers.moe import MoEConfig, MoELayer
from moejax.parallel import make_mesh
from moejax.routers.base import RouterFamily
from moejax.routers.soft_moe import SoftMoE
from moejax.routers.top_k import TopK

BASE = MoEConfig(num_experts=4, top_k=2, d_expert=16, capacity_factor=1.0)


class OneDevice:
  """The BatchReduce of a single device: every reduction over the mesh is the identity."""

  mean = sum = min = max = staticmethod(lambda tree: tree)


def _layer(mesh=None, seed=0, **fields):
  return MoELayer(8, dataclasses.replace(BASE, **fields), mesh=mesh, rngs=nnx.Rngs(seed))


@nnx.jit
def _train_forward(layer, x):
  return layer(x, train=True)


@nnx.jit(static_argnames="train")
def _forward(layer, x, train, rng=None):
  """(output, aux) of the layer, compiled: called eagerly, op by op, a layer takes tens of seconds on CPU."""
  return layer(x, train=train, rng=rng)


# ----- load_balance_pooling -----


@pytest.mark.parametrize("density", ["topk_sum", "top1"])
def test_all_layers_pooling_is_transformers_loss_through_the_layers(density):
  """Two MoE layers (different routers) on the same tokens: one loss over both layers' router logits."""
  fields = {"load_balance_scope": "global_batch", "load_balance_pooling": "all_layers", "load_balance_density": density}
  layers = [_layer(seed=seed, **fields) for seed in (0, 1)]
  x = jax.random.normal(jax.random.key(0), (4, 6, 8))
  auxes = [_train_forward(layer, x)[1] for layer in layers]
  cfg = layers[0].cfg
  total, metrics = tasks.moe_losses_and_metrics(auxes, cfg)
  layer_logits = [np.asarray(x).reshape(-1, 8) @ np.asarray(layer.router.kernel[...]) for layer in layers]
  top_k = 2 if density == "topk_sum" else 1  # HF counts all K choices; top1 density = HF with K = 1.
  expected = transformers_load_balancing_loss(layer_logits, top_k)
  np.testing.assert_allclose(metrics["load_balance_loss"], expected, rtol=1e-5)
  # Counted once with its weight, not once per layer.
  others = cfg.z_loss_weight * metrics["z_loss"] + cfg.importance_loss_weight * metrics["importance_loss"]
  np.testing.assert_allclose(total, cfg.load_balance_loss_weight * expected + others, rtol=1e-5)
  # The per-layer losses summed (per_layer pooling) are another number, and the [E] vectors are not logged.
  per_layer = sum(float(a["load_balance_loss"]) for a in auxes)
  assert abs(per_layer - expected) > 0.1
  assert not [name for name in metrics if "balance_fraction" in name or "balance_prob" in name]


def test_all_layers_pooling_vectors_do_not_depend_on_the_mesh():
  fields = {
    "load_balance_scope": "global_batch",
    "load_balance_pooling": "all_layers",
    "load_balance_density": "topk_sum",
  }
  x = jax.random.normal(jax.random.key(1), (8, 6, 8))
  one = _train_forward(_layer(mesh=make_mesh(1), **fields), x)[1]
  eight = _train_forward(_layer(mesh=make_mesh(8), **fields), x)[1]
  for key in ("balance_fraction", "balance_prob"):
    assert one[key].shape == (4,)
    np.testing.assert_allclose(one[key], eight[key], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(one["balance_fraction"].sum(), 2.0, rtol=1e-6)  # 'topk_sum': shares sum to K.


def test_per_layer_pooling_sums_the_layer_losses():
  auxes = [_train_forward(_layer(seed=seed), jnp.ones((2, 6, 8)))[1] for seed in (0, 1)]
  _, metrics = tasks.moe_losses_and_metrics(auxes, BASE)
  assert "balance_fraction" not in auxes[0]
  np.testing.assert_allclose(metrics["load_balance_loss"], sum(a["load_balance_loss"] for a in auxes), rtol=1e-6)


# ----- load_loss_threshold -----


def test_overall_threshold_hand_case():
  # One token, 3 experts, noisy logits (2, 1, 0), K = 2: the 2nd largest noisy logit overall is 1,
  # the threshold of every expert. 'others': e0 and e1 (in the top 2) must beat the others' 2nd
  # largest, 0; e2 must beat 1.
  clean = jnp.array([[1.5, 1.0, 0.5]])
  noisy = jnp.array([[2.0, 1.0, 0.0]])
  std = jnp.array([[0.5, 1.0, 2.0]])
  overall = [norm.cdf((1.5 - 1) / 0.5), norm.cdf((1.0 - 1) / 1.0), norm.cdf((0.5 - 1) / 2.0)]
  others = [norm.cdf((1.5 - 0) / 0.5), norm.cdf((1.0 - 0) / 1.0), norm.cdf((0.5 - 1) / 2.0)]
  np.testing.assert_allclose(losses.smooth_load(clean, noisy, std, 2, "overall"), overall, rtol=1e-5)
  np.testing.assert_allclose(losses.smooth_load(clean, noisy, std, 2, "others"), others, rtol=1e-5)
  # K = 1: the top-1 expert e0 is its own threshold, Φ(−0.5 / 0.5); 'others' compares it with e1's 1.
  np.testing.assert_allclose(losses.smooth_load(clean, noisy, std, 1, "overall")[0], norm.cdf(-1.0), rtol=1e-5)
  np.testing.assert_allclose(losses.smooth_load(clean, noisy, std, 1, "others")[0], norm.cdf(1.0), rtol=1e-5)


def _vmoe_load_loss(clean, noisy, noise_std, k):
  """vmoe's _load_auxiliary_loss on one group, in numpy: CV² over experts of the mean P(in the top k)."""
  threshold = np.sort(noisy, axis=-1)[:, -k]  # [S] the k-th largest noisy logit of each token
  p = 1.0 - norm.cdf((threshold[:, None] - clean) / noise_std)
  p_mean = p.mean(axis=0)
  return (p_mean.std() / p_mean.mean()) ** 2


def test_overall_threshold_load_loss_is_vmoes_through_the_router():
  cfg = dataclasses.replace(
    BASE, router_noise="noisy_top_k", load_loss_weight=1e-2, load_loss_threshold="overall", num_experts=6
  )
  layer = MoELayer(8, cfg, rngs=nnx.Rngs(0))
  layer.router.noise_kernel[...] = 0.3 * jax.random.normal(jax.random.key(2), (8, 6))
  x = jax.random.normal(jax.random.key(3), (1, 16, 8))
  decision, stats = layer.router(x, capacity=16, train=True, rng=jax.random.key(4))
  aux = TopK.aux(cfg, decision, stats, OneDevice())
  clean, noisy, std = (np.asarray(stats[k][0], np.float64) for k in ("clean_logits", "logits", "noise_std"))
  np.testing.assert_allclose(aux["load_loss"], _vmoe_load_loss(clean, noisy, std, 2), rtol=1e-4)
  others = TopK.aux(dataclasses.replace(cfg, load_loss_threshold="others"), decision, stats, OneDevice())
  assert abs(float(others["load_loss"]) - float(aux["load_loss"])) > 1e-4


# ----- routed_scaling_factor -----


def test_routed_scaling_factor_scales_the_routed_experts():
  fields = {"router": "deepseek", "score_function": "sigmoid", "combine_weights": "renormalized"}
  plain, scaled = _layer(**fields), _layer(routed_scaling_factor=2.5, **fields)
  x = jax.random.normal(jax.random.key(5), (2, 6, 8))
  d_plain, _ = plain.router(x, capacity=6, train=False, rng=None)
  d_scaled, _ = scaled.router(x, capacity=6, train=False, rng=None)
  np.testing.assert_allclose(d_plain.combine_weight.sum(-1), 1.0, rtol=1e-6)  # Renormalised first ...
  np.testing.assert_allclose(d_scaled.combine_weight, 2.5 * d_plain.combine_weight, rtol=1e-6)  # ... then scaled.
  np.testing.assert_array_equal(d_scaled.expert_index, d_plain.expert_index)
  y_plain, _ = _forward(plain, x, False)
  y_scaled, _ = _forward(scaled, x, False)
  np.testing.assert_allclose(y_scaled, 2.5 * y_plain, rtol=1e-5, atol=1e-6)


# ----- jitter_scope -----


def test_router_and_experts_jitter_feeds_both_the_same_tokens():
  """Training on x equals eval on x·u (u: the layer's one draw); with scope 'router' the experts see x."""
  fields = {
    "router_noise": "jitter",
    "jitter_eps": 0.3,
    "dispatcher": "sort",
    "capacity_factor": 1.5,
    "eval_capacity_factor": 1.5,
  }
  x = jax.random.normal(jax.random.key(6), (2, 6, 8))
  rng = jax.random.key(7)
  both = _layer(jitter_scope="router_and_experts", **fields)
  trained, _ = _forward(both, x, True, rng)
  # One device (axis index 0): the layer's key is fold_in(fold_in(rng, device), 1).
  u = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(rng, 0), 1), x.shape, minval=0.7, maxval=1.3)
  expected, _ = _forward(both, x * u, False)
  np.testing.assert_allclose(trained, expected, rtol=1e-5, atol=1e-6)
  # Were the router to jitter a second time, its weights (and so the output) would differ.
  router_only, _ = _forward(_layer(jitter_scope="router", **fields), x, True, rng)
  assert np.abs(np.asarray(router_only) - np.asarray(expected)).max() > 1e-2
  assert np.abs(np.asarray(trained) - np.asarray(_forward(both, x, False)[0])).max() > 1e-2


# ----- routing metrics -----


def test_token_choice_metrics_on_the_worked_example():
  # REFERENCES.md: t0 keeps e0 (.4) and e2 (.2); t1 keeps e0 (.5), its e2 is dropped; t2 keeps
  # e2 (.6), its e0 is dropped. Experts per token 2, 1, 1; kept gates .2 ... .6.
  probs = jnp.array([[[0.4, 0.0, 0.2], [0.5, 0.1, 0.4], [0.3, 0.2, 0.6]]])
  decision = routing.top_k_route(probs, top_k=2, capacity=2, priority="choice_major")
  aux = {}
  RouterFamily.kept_per_expert(dataclasses.replace(BASE, num_experts=3), decision, aux, OneDevice())
  assert (float(aux["num_experts_per_token_min"]), float(aux["num_experts_per_token_max"])) == (1.0, 2.0)
  np.testing.assert_allclose([aux["min_selected_gate"], aux["max_selected_gate"]], [0.2, 0.6], rtol=1e-6)
  # Capacity 1, first choices first: t0 takes e0's slot and t2 e2's; t1's e0 finds e0 full, and
  # every 2nd choice finds its expert full. Experts per token 1, 0, 1; kept gates .4 and .6.
  decision = routing.top_k_route(probs, top_k=2, capacity=1, priority="choice_major")
  RouterFamily.kept_per_expert(dataclasses.replace(BASE, num_experts=3), decision, aux, OneDevice())
  np.testing.assert_array_equal(np.asarray(decision.kept.sum(-1)), [[1, 0, 1]])
  assert (float(aux["num_experts_per_token_min"]), float(aux["num_experts_per_token_max"])) == (0.0, 1.0)
  np.testing.assert_allclose([aux["min_selected_gate"], aux["max_selected_gate"]], [0.4, 0.6], rtol=1e-6)


@pytest.mark.parametrize("router", ["top_k", "soft_moe"])
def test_routing_metrics_are_over_the_whole_batch_on_eight_devices(router):
  """Minima and maxima over every device's groups: the same on 1 and 8 devices."""
  x = jax.random.normal(jax.random.key(8), (8, 6, 8))
  fields = {"router": router, "slots_per_expert": 2} if router == "soft_moe" else {"router": router}
  one = _train_forward(_layer(mesh=make_mesh(1), **fields), x)[1]
  eight = _train_forward(_layer(mesh=make_mesh(8), **fields), x)[1]
  names = [n for n in one if "_min" in n or "_max" in n or "selected_gate" in n]
  assert len(names) >= 4
  for name in names:
    np.testing.assert_allclose(one[name], eight[name], rtol=1e-5, atol=1e-6, err_msg=name)


def _vmoe_soft_metrics(combine, dispatch, mu):
  """vmoe/projects/soft_moe/router.py's get_metrics, in numpy: combine, dispatch [G, S, E, p], mu [d, E, p]."""
  g, m, n, p = combine.shape

  def cosine_pairs(vectors):  # [B, N, D] -> [B, N, N]
    unit = vectors / np.sqrt(np.square(vectors).sum(-1, keepdims=True) + 1e-9)
    return np.einsum("bnd,bmd->bnm", unit, unit)

  def masked(sim, size, count):  # vmoe: the diagonal replaced by the largest masked entry.
    eye = np.eye(size)[None]
    mask = (1 - eye) * sim
    mask = mask + eye * mask.max()
    return mask.min(), mask.max(), (sim.sum() - count * size) / (count * size * (size - 1))

  out = {
    "soft_combine_min_weight": combine.min(axis=(2, 3)).mean(),
    "soft_combine_max_weight": combine.max(axis=(2, 3)).mean(),
    "soft_dispatch_min_weight": dispatch.min(axis=1).mean(),
    "soft_dispatch_max_weight": dispatch.max(axis=1).mean(),
  }
  sims = {
    "combine": (cosine_pairs(combine.reshape(g, m, n * p)), m, g),
    "dispatch": (cosine_pairs(dispatch.reshape(g, m, n * p).transpose(0, 2, 1)), n * p, g),
    "slot": (cosine_pairs(mu.reshape(-1, n * p).T[None]), n * p, 1),
  }
  for name, (sim, size, count) in sims.items():
    low, high, mean = masked(sim, size, count)
    out.update({f"soft_{name}_similarity_min": low, f"soft_{name}_similarity_max": high})
    out[f"soft_{name}_similarity_mean"] = mean
  return out


def test_soft_moe_metrics_are_vmoes():
  cfg = dataclasses.replace(BASE, router="soft_moe", slots_per_expert=2)
  layer = MoELayer(8, cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(9), (3, 5, 8))
  decision, stats = layer.router(x, capacity=2, train=True, rng=None)
  aux = SoftMoE.aux(cfg, decision, stats, OneDevice())
  mu = np.asarray(layer.router.slot_params[...], np.float64).reshape(8, 4, 2)  # [d, E, p], expert-major
  expected = _vmoe_soft_metrics(
    np.asarray(decision.combine_weights, np.float64), np.asarray(decision.dispatch_weights, np.float64), mu
  )
  assert expected["soft_slot_similarity_max"] > 0  # Where vmoe's masking and distinct pairs agree.
  for name, value in expected.items():
    np.testing.assert_allclose(aux[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  off = SoftMoE.aux(dataclasses.replace(cfg, soft_similarity_metrics=False), decision, stats, OneDevice())
  assert "soft_combine_min_weight" in off and not [n for n in off if "similarity" in n]


def test_soft_moe_similarity_hand_case():
  # One group of 2 tokens, 2 experts of 1 slot. Both tokens mix the 2 slots equally: their combine
  # weights (.5, .5) have similarity 1. Slot e0 takes token 0 only, slot e1 token 1 only: their
  # dispatch weights (1, 0) and (0, 1) have similarity 0, per-slot max 1 and min 0. The slot
  # parameters are orthogonal columns: similarity 0.
  combine = jnp.full((1, 2, 2, 1), 0.5)  # [G, S, E, p]
  dispatch = jnp.eye(2).reshape(1, 2, 2, 1)  # dispatch[0, s, e, 0] = 1 iff s == e
  decision = routing.SoftRoutingDecision(dispatch_weights=dispatch, combine_weights=combine)
  cfg = dataclasses.replace(BASE, router="soft_moe", num_experts=2)
  stats = {"logits": None, "probs": None, "selection_counts": jnp.zeros(2), "slot_params": jnp.eye(2)}
  aux = SoftMoE.aux(cfg, decision, stats, OneDevice())
  np.testing.assert_allclose([aux["soft_combine_similarity_min"], aux["soft_combine_similarity_max"]], 1.0, rtol=1e-6)
  np.testing.assert_allclose([aux["soft_dispatch_similarity_mean"], aux["soft_slot_similarity_mean"]], 0.0, atol=1e-6)
  np.testing.assert_allclose([aux["soft_dispatch_min_weight"], aux["soft_dispatch_max_weight"]], [0.0, 1.0])
