"""Auxiliary losses against the hand-computed values of REFERENCES.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import losses

# vmoe's example: 4 tokens, 3 experts.
PROBS = jnp.array([[0.5, 0.4, 0.1], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7], [0.8, 0.2, 0.0]])


def test_switch_load_balance_top1():
  # Top-1 choices e0, e2, e2, e0: f = [.5, 0, .5]; P = [.425, .275, .3]; 3·(.2125 + .15) = 1.0875.
  expert_index = jnp.argmax(PROBS, -1)[None, :, None]
  loss = losses.load_balance_loss(PROBS[None], expert_index, "top1")
  np.testing.assert_allclose(loss, 1.0875, rtol=1e-6)


def test_load_balance_topk_density_and_group_average():
  # Top-2 choices: t0 {0,1}, t1 {2,0}, t2 {2,1}, t3 {0,1}: f = [3, 3, 2]/8.
  _, expert_index = jax.lax.top_k(PROBS, 2)
  expected = 3 * (3 / 8 * 0.425 + 3 / 8 * 0.275 + 2 / 8 * 0.3)
  loss = losses.load_balance_loss(PROBS[None], expert_index[None], "topk")
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # A perfectly balanced group scores exactly 1; the loss averages groups.
  uniform = jnp.full((1, 3, 3), 1 / 3)
  both = losses.load_balance_loss(
    jnp.concatenate([PROBS[None, :3], uniform]), jnp.array([[[0], [2], [2]], [[0], [1], [2]]]), "top1"
  )
  first = 3 * (1 / 3 * 0.3 + 2 / 3 * 0.4)  # f = [1/3, 0, 2/3], P = [.3, .3, .4]: 1.1
  np.testing.assert_allclose(both, (first + 1.0) / 2, rtol=1e-6)


def test_router_z_loss():
  logits = jnp.array([[0.0, 0.0], [1.0, 2.0]])
  expected = (np.log(2.0) ** 2 + np.log(np.e + np.e**2) ** 2) / 2
  np.testing.assert_allclose(losses.router_z_loss(logits), expected, rtol=1e-6)


def test_importance_cv_squared():
  # Shazeer's importance loss: CV² of the per-expert sums of the probabilities (population std).
  np.testing.assert_allclose(losses.cv_squared(PROBS.sum(axis=0)), 0.03874999, rtol=1e-5)


def transformers_load_balancing_loss(layer_logits: list, top_k: int) -> float:
  """transformers' load_balancing_loss_func (no attention mask), re-written in numpy."""
  logits = np.concatenate(layer_logits)  # [L·T, E]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  selected = np.argsort(-probs, axis=-1)[:, :top_k]
  expert_mask = np.eye(logits.shape[-1])[selected]  # [L·T, K, E]
  tokens_per_expert = expert_mask.mean(axis=0)  # [K, E]
  router_prob_per_expert = probs.mean(axis=0)  # [E]
  return float(np.sum(tokens_per_expert * router_prob_per_expert[None]) * logits.shape[-1])


def test_topk_sum_density_is_k_times_topk():
  _, expert_index = jax.lax.top_k(PROBS, 2)
  topk = losses.load_balance_loss(PROBS[None], expert_index[None], "topk")
  topk_sum = losses.load_balance_loss(PROBS[None], expert_index[None], "topk_sum")
  np.testing.assert_allclose(topk_sum, 2 * topk, rtol=1e-6)
  np.testing.assert_allclose(topk_sum, 3 * (6 / 8 * 0.425 + 6 / 8 * 0.275 + 4 / 8 * 0.3), rtol=1e-6)


def test_pooled_load_balance_is_transformers_loss_over_all_layers():
  # 3 layers of 10 tokens, 6 experts, top-2: the pooled loss differs from the mean of the layers' losses.
  rng = np.random.default_rng(0)
  layer_logits = [rng.normal(size=(10, 6)) * s for s in (0.5, 1.0, 3.0)]
  fractions, probs = [], []
  for logits in layer_logits:
    p = jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1)[None]  # [1, S, E]
    _, index = jax.lax.top_k(p, 2)
    f, mean_p = losses.load_balance_terms(p, index, "topk_sum")
    fractions.append(f[0])
    probs.append(mean_p[0])
  pooled = losses.pooled_load_balance(jnp.stack(fractions), jnp.stack(probs))
  np.testing.assert_allclose(pooled, transformers_load_balancing_loss(layer_logits, 2), rtol=1e-5)
  per_layer_mean = np.mean([float(losses.switch_balance(f, p)) for f, p in zip(fractions, probs)])
  assert abs(float(pooled) - per_layer_mean) > 1e-3


def test_deepseek_v2_device_and_communication_balance_by_hand():
  # E 4 experts on D 2 devices ({0, 1} on device 0, {2, 3} on device 1), K 2, S 2 tokens.
  # Token 0 picks experts 0 and 1 (device 0 only); token 1 picks 0 and 2 (both devices).
  probs = jnp.array([[[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]]])
  chosen = jnp.array([[[0, 1], [0, 2]]])
  f_device, f_comm, p_device = losses.device_balance_terms(probs, chosen, num_devices=2, max_devices=2)
  # f_j = E/(K·S)·count_j = [2, 1, 1, 0]: f' = the mean per device = [1.5, 0.5].
  np.testing.assert_allclose(f_device, [[1.5, 0.5]])
  # Mean affinities [0.45, 0.2, 0.25, 0.1]: P' = [0.65, 0.35].
  np.testing.assert_allclose(p_device, [[0.65, 0.35]], rtol=1e-6)
  # Device 0 receives both tokens, device 1 one: f'' = D/(M·S)·[2, 1] = [1, 0.5].
  np.testing.assert_allclose(f_comm, [[1.0, 0.5]])
  device_loss = float(jnp.sum(f_device * p_device))
  comm_loss = float(jnp.sum(f_comm * p_device))
  assert device_loss == pytest.approx(1.5 * 0.65 + 0.5 * 0.35) and comm_loss == pytest.approx(0.65 + 0.5 * 0.35)


def test_a_familys_own_losses_are_weighted_by_their_option():
  from moejax.layers.moe import MoEConfig
  from moejax.tasks import moe_losses_and_metrics

  cfg = MoEConfig(
    router="deepseek", load_balance_loss_weight=0.003, device_balance_loss_weight=0.05, comm_balance_loss_weight=0.02
  )
  zero = jnp.zeros(())
  layer = {
    "load_balance_loss": jnp.float32(1.2),
    "z_loss": zero,
    "importance_loss": zero,
    "load_loss": zero,
    "device_balance_loss": jnp.float32(1.1),
    "comm_balance_loss": jnp.float32(1.4),
  }
  total, metrics = moe_losses_and_metrics([layer, layer], cfg)  # Two MoE layers: each loss summed.
  assert float(metrics["device_balance_loss"]) == pytest.approx(2.2)
  assert float(total) == pytest.approx(0.003 * 2.4 + 0.05 * 2.2 + 0.02 * 2.8, rel=1e-6)
