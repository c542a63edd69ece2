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
  np.testing.assert_allclose(
    decision.combine_weight[0], [[0.4 / 0.6, 0.2 / 0.6], [0.5 / 0.9, 0.4 / 0.9], [0.6 / 0.9, 0.3 / 0.9]], rtol=1e-6
  )


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


@pytest.mark.parametrize(
  "s,e,k,cf,expected", [(16, 8, 2, 1.25, 5), (8, 4, 1, 1.0, 2), (4, 2, 2, 4.0, 4), (3, 8, 1, 1.0, 1)]
)
def test_capacity(s, e, k, cf, expected):
  # ceil(16·2·1.25/8) = 5; ceil(8/4) = 2; ceil(16) capped at S = 4; ceil(3/8) = 1.
  assert routing.compute_capacity(s, e, k, cf) == expected


def test_worked_example_batch_prioritized():
  # REFERENCES.md: BPR orders tokens by top-1 probability (t2 .6, t1 .5, t0 .4), choice-major.
  decision = routing.top_k_route(PROBS, top_k=2, capacity=2, priority="bpr")
  combine = np.asarray(decision.combine_array()[0])
  expected = np.zeros((3, 3, 2))
  expected[0, 0, 1] = 0.4  # t0 queues last for e0: slot 1. Its 2nd choice e2 is full (dropped).
  expected[1, 0, 0] = 0.5  # t1 goes before t0: e0 slot 0,
  expected[1, 2, 1] = 0.4  # and its 2nd choice e2 gets slot 1 behind t2.
  expected[2, 2, 0] = 0.6  # t2 first in line for e2; its 2nd choice e0 is full (dropped).
  np.testing.assert_allclose(combine, expected, atol=1e-7)


def test_gshard_random_second_expert():
  probs = jnp.array([[[0.6, 0.3, 0.1], [0.1, 0.3, 0.6]]])
  # Both tokens: renormalized top-2 = (2/3, 1/3), so 2·g2 = 2/3.
  keep = routing.top_k_route(
    probs, top_k=2, capacity=2, combine_weights="renormalized", second_expert_threshold=jnp.array([[0.5, 0.5]])
  )
  np.testing.assert_array_equal(keep.kept[0], [[True, True], [True, True]])
  skip = routing.top_k_route(
    probs, top_k=2, capacity=1, combine_weights="renormalized", second_expert_threshold=jnp.array([[0.9, 0.5]])
  )
  # t0 skips its 2nd expert (e1), so t1's 2nd choice e1 still finds slot 0 free at capacity 1.
  np.testing.assert_array_equal(skip.kept[0], [[True, False], [True, True]])
  np.testing.assert_allclose(skip.combine_weight[0], [[2 / 3, 0.0], [2 / 3, 1 / 3]], rtol=1e-6)


def test_expert_choice_worked_example():
  decision = routing.expert_choice_route(PROBS, capacity=2)
  combine = np.asarray(decision.combine_array()[0])
  expected = np.zeros((3, 3, 2))
  expected[1, 0, 0], expected[0, 0, 1] = 0.5, 0.4  # e0 takes its best tokens: t1 (.5), t0 (.4).
  expected[2, 1, 0], expected[1, 1, 1] = 0.2, 0.1  # e1: t2 (.2), t1 (.1).
  expected[2, 2, 0], expected[1, 2, 1] = 0.6, 0.4  # e2: t2 (.6), t1 (.4).
  np.testing.assert_allclose(combine, expected, atol=1e-7)
  np.testing.assert_array_equal(decision.kept[0].sum(-1), [1, 3, 2])  # Experts per token.
  # Perfect balance: every expert fills exactly C slots.
  np.testing.assert_array_equal(decision.dispatch_mask()[0].sum(axis=(0, 2)), [2, 2, 2])
  capped = routing.expert_choice_route(PROBS, capacity=2, max_experts_per_token=1)
  # With a cap of one expert, t1 keeps only e0 (.5) and t2 only e2 (.6).
  np.testing.assert_allclose(capped.combine_weight[0, :, 0], [0.4, 0.5, 0.6], atol=1e-7)
  assert capped.expert_index.shape == (1, 3, 1)


def test_hash_experts_fixed_and_even():
  ids = jnp.arange(10000)
  experts = np.asarray(routing.hash_experts(ids, 8))
  np.testing.assert_array_equal(experts, np.asarray(routing.hash_experts(ids, 8)))
  counts = np.bincount(experts, minlength=8)
  assert counts.min() > 1250 * 0.9 and counts.max() < 1250 * 1.1
  assert not np.array_equal(experts, np.asarray(routing.hash_experts(ids, 8, seed=1)))


def test_group_limited_routing():
  # 8 experts in 4 groups of 2. Group scores (sum of the best two): g0 .9, g1 1.0, g2 .96, g3 .2.
  scores = jnp.array([[[0.9, 0.0, 0.5, 0.5, 0.48, 0.48, 0.1, 0.1]]])
  limited = routing.group_limited_scores(scores, num_groups=4, top_groups=2)
  # g1 and g2 win, so expert 0 is excluded although it has the single best score.
  np.testing.assert_array_equal(np.isfinite(limited[0, 0]), [0, 0, 1, 1, 1, 1, 0, 0])
  decision = routing.top_k_route(scores, top_k=2, capacity=1, selection_scores=limited)
  np.testing.assert_array_equal(decision.expert_index[0, 0], [2, 3])


def test_soft_moe_weights_against_numpy():
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 4)))
  phi = np.asarray(jax.random.normal(jax.random.key(1), (4, 6)))  # E=3 experts × p=2 slots.
  for normalize, scale in ((False, 1.0), (True, 3.0)):
    d = routing.soft_moe_route(jnp.asarray(x), jnp.asarray(phi), num_experts=3, scale=scale, normalize=normalize)
    xn = x / np.linalg.norm(x, axis=-1, keepdims=True) if normalize else x
    pn = scale * phi / np.linalg.norm(phi, axis=0, keepdims=True) if normalize else phi
    logits = np.einsum("gsd,dn->gsn", xn, pn)
    dispatch = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # Over tokens.
    combine = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)  # Over slots.
    # float32 with a 1e-6 guard in the norm vs float64: agree to ~1e-5 relative.
    np.testing.assert_allclose(d.dispatch_mask(), dispatch.reshape(2, 5, 3, 2), rtol=1e-4)
    np.testing.assert_allclose(d.combine_array(), combine.reshape(2, 5, 3, 2), rtol=1e-4)
