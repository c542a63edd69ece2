"""Auxiliary losses against the hand-computed values of REFERENCES.md."""

import jax
import jax.numpy as jnp
import numpy as np

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
