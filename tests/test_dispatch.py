"""Dispatchers agree with each other (values and gradients) on random decisions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import dispatch, routing


def _random_case(seed, g=3, s=24, e=5, k=2, d=8):
  keys = jax.random.split(jax.random.key(seed), 3)
  probs = jax.nn.softmax(2.0 * jax.random.normal(keys[0], (g, s, e)))
  x = jax.random.normal(keys[1], (g, s, d))
  return probs, x, keys[2]


@pytest.mark.parametrize("priority", routing.PRIORITIES)
@pytest.mark.parametrize("k,capacity", [(1, 3), (2, 6), (3, 24)])
def test_sort_equals_einsum(priority, k, capacity):
  probs, x, key = _random_case(k + capacity)
  decision = routing.top_k_route(probs, top_k=k, capacity=capacity, priority=priority)
  einsum, sort = dispatch.EinsumDispatcher(), dispatch.SortDispatcher()
  np.testing.assert_allclose(sort.dispatch(decision, x), einsum.dispatch(decision, x), atol=1e-6)
  y = jax.random.normal(key, (probs.shape[-1], x.shape[0], capacity, x.shape[-1]))
  np.testing.assert_allclose(sort.combine(decision, y), einsum.combine(decision, y), atol=1e-5)

  def roundtrip(dispatcher, x):
    return jnp.sum(jnp.sin(dispatcher.combine(decision, 2.0 * dispatcher.dispatch(decision, x))))

  grad_sort = jax.jit(jax.grad(roundtrip, argnums=1), static_argnums=0)(sort, x)
  grad_einsum = jax.jit(jax.grad(roundtrip, argnums=1), static_argnums=0)(einsum, x)
  np.testing.assert_allclose(grad_sort, grad_einsum, atol=1e-5)


def test_dispatch_places_tokens_in_their_slots():
  probs = jnp.array([[[0.4, 0.0, 0.2], [0.5, 0.1, 0.4], [0.3, 0.2, 0.6]]])
  x = jnp.array([[[1.0], [2.0], [3.0]]])  # Token t carries the value t+1.
  decision = routing.top_k_route(probs, top_k=2, capacity=2, priority="choice_major")
  buffers = dispatch.SortDispatcher().dispatch(decision, x)[:, 0, :, 0]  # [E, C]
  # e0: t0 then t1; e1: empty; e2: t2 (1st choices first) then t0's 2nd choice.
  np.testing.assert_array_equal(buffers, [[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]])
