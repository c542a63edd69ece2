"""Top-k routing against the hand-checkable cases of REFERENCES.md and hand-made scenarios."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing

# REFERENCES.md worked example: 3 tokens, 3 experts, K = 2, C = 2.
PROBS = jnp.array([[[0.4, 0.0, 0.2], [0.5, 0.1, 0.4], [0.3, 0.2, 0.6]]])


def test_worked_example_choice_major_raw():
  decision = routing.top_k_route(PROBS, top_k=2, capacity=2, priority="choice_major")
  combine = np.asarray(decision.combine_array()[0])  # [S, E, C]
  expected = np.zeros((3, 3, 2))
  expected[0, 0, 0] = 0.4  # t0's 1st choice e0 takes slot 0 (first in line).
  expected[0, 2, 1] = 0.2  # t0's 2nd choice e2: slot 1, behind t2's 1st choice.
  expected[1, 0, 1] = 0.5  # t1's 1st choice e0: slot 1. Its 2nd choice e2 would be slot 2 >= C.
  expected[2, 2, 0] = 0.6  # t2's 1st choice e2: slot 0. Its 2nd choice e0 would be slot 2.
  np.testing.assert_allclose(combine, expected, atol=1e-7)
  np.testing.assert_array_equal(decision.kept[0], [[True, True], [True, False], [True, False]])
  np.testing.assert_array_equal(decision.dispatch_mask()[0], expected > 0)


def test_token_major_priority():
  # Token-major: t0 takes e0 slot0 and e2 slot0; t1 takes e0 slot1, e2 slot1; t2 finds both full.
  decision = routing.top_k_route(PROBS, top_k=2, capacity=2, priority="token_major")
  np.testing.assert_array_equal(decision.expert_index[0], [[0, 2], [0, 2], [2, 0]])
  np.testing.assert_array_equal(decision.slot[0], [[0, 0], [1, 1], [2, 2]])
  np.testing.assert_allclose(decision.combine_weight[0], [[0.4, 0.2], [0.5, 0.4], [0.0, 0.0]], atol=1e-7)


def test_renormalized_combine_weights():
  decision = routing.top_k_route(PROBS, top_k=2, capacity=3, combine_weights="renormalized")
  # With room for every choice, weights are the top-2 probabilities divided by their sum.
  np.testing.assert_allclose(decision.combine_weight[0],
                             [[0.4 / 0.6, 0.2 / 0.6], [0.5 / 0.9, 0.4 / 0.9], [0.6 / 0.9, 0.3 / 0.9]], rtol=1e-6)


def test_top1_switch_drops_overflow_in_token_order():
  # Four tokens all prefer expert 1; capacity 2 keeps the first two (Switch top-1).
  probs = jnp.array([[[0.2, 0.8], [0.3, 0.7], [0.1, 0.9], [0.4, 0.6]]])
  decision = routing.top_k_route(probs, top_k=1, capacity=2)
  np.testing.assert_array_equal(decision.kept[0, :, 0], [True, True, False, False])
  np.testing.assert_allclose(decision.combine_weight[0, :, 0], [0.8, 0.7, 0.0, 0.0], rtol=1e-6)


@pytest.mark.parametrize("priority", routing.PRIORITIES)
def test_slots_are_a_valid_assignment(priority):
  """Property: kept choices of an expert occupy distinct slots 0..n-1, never more than C."""
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (3, 40, 6)))
  capacity = 9
  d = routing.top_k_route(probs, top_k=3, capacity=capacity, priority=priority)
  expert, slot, kept = map(np.asarray, (d.expert_index, d.slot, d.kept))
  for g in range(3):
    for e in range(6):
      slots = slot[g][(expert[g] == e)]
      # Queue positions of one expert are exactly 0..n-1, each once.
      np.testing.assert_array_equal(np.sort(slots), np.arange(len(slots)))
      assert (kept[g][expert[g] == e] == (slots < capacity)).all()


def test_token_major_is_causal():
  """Token-major slots depend only on earlier tokens: changing later tokens changes no earlier decision."""
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(1), (1, 32, 4)))
  changed = probs.at[:, 20:].set(jax.nn.softmax(jax.random.normal(jax.random.key(2), (1, 12, 4))))
  a = routing.top_k_route(probs, top_k=2, capacity=6, priority="token_major")
  b = routing.top_k_route(changed, top_k=2, capacity=6, priority="token_major")
  np.testing.assert_array_equal(a.slot[:, :20], b.slot[:, :20])
  np.testing.assert_array_equal(a.kept[:, :20], b.kept[:, :20])


@pytest.mark.parametrize("s,e,k,cf,expected", [(16, 8, 2, 1.25, 5), (8, 4, 1, 1.0, 2), (4, 2, 2, 4.0, 4),
                                                (3, 8, 1, 1.0, 1)])
def test_capacity(s, e, k, cf, expected):
  # ceil(16·2·1.25/8) = 5; ceil(8/4) = 2; ceil(16) capped at S = 4; ceil(3/8) = 1.
  assert routing.compute_capacity(s, e, k, cf) == expected
