"""Tests of moejax.data.markov: the Bayes-optimal loss and the sampler.

Hand-checked case first, then brute force over all sequences of a tiny
mixture, then Monte Carlo and sampler statistics.
"""

import itertools
import math

import numpy as np
import pytest

from moejax.data import markov

# ---------------------------------------------------------------------------
# Markov mixture: the Bayes-optimal loss.
# ---------------------------------------------------------------------------


def test_bayes_losses_hand_checked():
  # Two sources over V=2. Source 0 flips a fair coin at every step; source 1
  # never changes state. Source 0 starts with 0 w.p. 3/4, source 1 w.p. 1/4.
  init = np.array([[3 / 4, 1 / 4], [1 / 4, 3 / 4]])
  trans = np.array([[[0.5, 0.5], [0.5, 0.5]], [[1.0, 0.0], [0.0, 1.0]]])
  tokens = np.array([[0, 0, 0], [0, 1, 1], [1, 1, 1]])
  # [0,0,0]: after x0=0 the posterior is (3/4, 1/4); p(x1=0) = 3/4*1/2 + 1/4*1
  #   = 5/8. Posterior becomes (3/8, 1/4)/(5/8) = (3/5, 2/5);
  #   p(x2=0) = 3/5*1/2 + 2/5*1 = 7/10.
  # [0,1,1]: p(x1=1) = 3/4*1/2 + 1/4*0 = 3/8. Source 1 cannot switch, so the
  #   posterior is (1, 0) and p(x2=1) = 1/2.
  # [1,1,1]: posterior (1/4, 3/4); p(x1=1) = 1/8 + 3/4 = 7/8; posterior
  #   (1/8, 3/4)/(7/8) = (1/7, 6/7); p(x2=1) = 1/14 + 6/7 = 13/14.
  expected = -np.log([[5 / 8, 7 / 10], [3 / 8, 1 / 2], [7 / 8, 13 / 14]])
  losses = markov.mixture_token_losses(init, trans, tokens)
  np.testing.assert_allclose(losses, expected, rtol=1e-12)


def _tiny_mixture():
  return markov.MarkovMixture(vocab_size=3, num_sources=2, branching=2, seed=3)


def _brute_force(mixture, length):
  """All V^T sequences with p(x), and -log p(x_{t+1} | x_<=t) from prefixes."""
  init, trans = mixture.init_probs, mixture.transitions
  k = mixture.num_sources
  seqs = np.array(list(itertools.product(range(mixture.vocab_size), repeat=length)))
  per_source = np.ones((k, len(seqs)))  # p_k(x)
  for src in range(k):
    per_source[src] = init[src, seqs[:, 0]]
    for t in range(length - 1):
      per_source[src] *= trans[src, seqs[:, t], seqs[:, t + 1]]
  joint = per_source.mean(0)  # Uniform prior over sources.
  prefix_prob = {}  # P(x_<=t) = sum of p(x) over all suffixes.
  for seq, p in zip(map(tuple, seqs), joint):
    for t in range(1, length + 1):
      prefix_prob[seq[:t]] = prefix_prob.get(seq[:t], 0.0) + p
  with np.errstate(divide="ignore", invalid="ignore"):
    cond = np.array(
      [[prefix_prob[tuple(s[: t + 2])] / prefix_prob[tuple(s[: t + 1])] for t in range(length - 1)] for s in seqs]
    )
    losses = -np.log(cond)
  return seqs, joint, per_source, losses


def test_bayes_losses_match_brute_force():
  mixture = _tiny_mixture()
  seqs, joint, _, expected = _brute_force(mixture, length=4)
  losses = mixture.bayes_token_losses(seqs)
  assert losses.shape == (81, 3)
  possible = joint > 0
  assert 0 < possible.sum() < len(seqs)  # Both kinds are exercised.
  np.testing.assert_allclose(losses[possible], expected[possible], rtol=1e-10)
  # An impossible sequence costs +inf at its first impossible token.
  for row, ref in zip(losses[~possible], expected[~possible]):
    first = np.argmax(np.isinf(ref))
    np.testing.assert_allclose(row[:first], ref[:first], rtol=1e-10)
    assert np.isposinf(row[first])


def test_expected_bayes_loss_between_oracle_and_no_inference():
  mixture = _tiny_mixture()
  length = 4
  seqs, joint, per_source, _ = _brute_force(mixture, length)
  trans = mixture.transitions
  possible = joint > 0
  bayes = np.sum(joint[possible] * mixture.bayes_token_losses(seqs[possible]).mean(1))
  # Oracle: knows the source, pays -log trans_k(x_t, x_{t+1}).
  oracle = 0.0
  for src in range(mixture.num_sources):
    ok = per_source[src] > 0
    step = trans[src, seqs[ok, :-1], seqs[ok, 1:]]
    oracle += 0.5 * np.sum(per_source[src, ok] * -np.log(step).mean(1))
  # No inference: always predicts with the prior mixture of transitions.
  prior_trans = trans.mean(0)
  naive = np.sum(joint[possible] * -np.log(prior_trans[seqs[possible, :-1], seqs[possible, 1:]]).mean(1))
  assert oracle < bayes < naive


def test_monte_carlo_floor_matches_exact_expectation():
  mixture = _tiny_mixture()
  seqs, joint, _, _ = _brute_force(mixture, length=4)
  possible = joint > 0
  exact = np.sum(joint[possible] * mixture.bayes_token_losses(seqs[possible]).mean(1))
  tokens, _ = mixture.sample(20_000, 4, seed=0)
  per_seq = mixture.bayes_token_losses(tokens).mean(1)
  stderr = per_seq.std() / math.sqrt(len(per_seq))
  assert abs(mixture.bayes_floor(tokens) - exact) < 4 * stderr
  assert mixture.bayes_floor(tokens) == pytest.approx(per_seq.mean())


def test_bayes_losses_stable_on_long_sequences():
  # Posterior weights of the wrong sources fall below 1e-308 after a few
  # hundred tokens; the log-space recursion must stay finite.
  mixture = markov.MarkovMixture(vocab_size=16, num_sources=4, branching=4, seed=1)
  tokens, _ = mixture.sample(8, 3000, seed=1)
  losses = mixture.bayes_token_losses(tokens)
  assert np.all(np.isfinite(losses)) and np.all(losses >= 0)
  # Once the source is known, the loss is the oracle's.
  _, source = mixture.sample(8, 3000, seed=1)
  oracle = -np.log(mixture.transitions[source[:, None], tokens[:, -11:-1], tokens[:, -10:]])
  np.testing.assert_allclose(losses[:, -10:], oracle, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# Markov mixture: parameters and sampler.
# ---------------------------------------------------------------------------


def test_transitions_are_sparse_and_stochastic():
  mixture = markov.MarkovMixture(vocab_size=10, num_sources=3, branching=4, seed=0)
  trans = mixture.transitions
  assert trans.shape == (3, 10, 10)
  np.testing.assert_allclose(trans.sum(-1), 1.0, rtol=1e-12)
  np.testing.assert_array_equal((trans > 0).sum(-1), 4)
  np.testing.assert_allclose(mixture.init_probs.sum(-1), 1.0, rtol=1e-12)
  # The sources differ in which successors they allow.
  assert not np.array_equal(trans[0] > 0, trans[1] > 0)
  # Parameters are a function of the fields only.
  same = markov.MarkovMixture(vocab_size=10, num_sources=3, branching=4, seed=0)
  np.testing.assert_array_equal(same.transitions, trans)
  other = markov.MarkovMixture(vocab_size=10, num_sources=3, branching=4, seed=1)
  assert not np.array_equal(other.transitions, trans)


def test_sampler_statistics_match_parameters():
  mixture = markov.MarkovMixture(vocab_size=8, num_sources=3, branching=3, seed=2)
  tokens, source = mixture.sample(6000, 40, seed=0)
  assert tokens.dtype == np.int32 and tokens.shape == (6000, 40)
  assert source.dtype == np.int32 and source.shape == (6000,)
  np.testing.assert_allclose(np.bincount(source) / 6000, 1 / 3, atol=0.03)
  for src in range(3):
    mine = tokens[source == src]
    first = np.bincount(mine[:, 0], minlength=8) / len(mine)
    np.testing.assert_allclose(first, mixture.init_probs[src], atol=0.05)
    counts = np.zeros((8, 8))
    np.add.at(counts, (mine[:, :-1].ravel(), mine[:, 1:].ravel()), 1)
    # Impossible transitions never happen.
    assert np.all(counts[mixture.transitions[src] == 0] == 0)
    visited = counts.sum(1) > 2000  # ~10k visits per state on average.
    assert visited.sum() >= 6
    empirical = counts[visited] / counts[visited].sum(1, keepdims=True)
    np.testing.assert_allclose(empirical, mixture.transitions[src][visited], atol=0.04)


def test_sample_is_a_function_of_its_seed():
  mixture = _tiny_mixture()
  a = mixture.sample(50, 6, seed=[7, 1])
  b = mixture.sample(50, 6, seed=[7, 1])
  c = mixture.sample(50, 6, seed=[7, 2])
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
