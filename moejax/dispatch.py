"""Dispatchers: move tokens to expert buffers and back, following a `RoutingDecision`.

Every dispatcher implements
  dispatch(decision, x: [G, S, d]) -> [E, G, C, d]   expert buffers (empty slots are zero)
  combine(decision, y: [E, G, C, d]) -> [G, S, d]    Σ_k combine_weight · y[expert, slot]
and all give the same result for the same decision (tests/test_dispatch.py checks this).

Legend: G groups, S tokens per group, E experts, C capacity, K choices per token, d model dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.routing import RoutingDecision

DISPATCHERS = ("einsum", "sort")


class EinsumDispatcher:
  """GShard's one-hot dispatch/combine einsums: O(G·S·E·C·d) FLOPs, the reference."""

  def dispatch(self, decision: RoutingDecision, x: jax.Array) -> jax.Array:
    mask = decision.dispatch_mask().astype(x.dtype)  # [G, S, E, C]
    return jnp.einsum("gsec,gsd->egcd", mask, x)

  def combine(self, decision: RoutingDecision, y: jax.Array) -> jax.Array:
    weights = decision.combine_array().astype(y.dtype)  # [G, S, E, C]
    return jnp.einsum("gsec,egcd->gsd", weights, y)


class SortDispatcher:
  """Gather/scatter by slot index: O(G·S·K·d) memory and data movement, no one-hot matmuls.

  Each kept choice has a flat buffer position e·C + slot; dropped choices point at a spare
  row E·C, which is discarded on dispatch and reads zeros on combine.
  """

  def _flat_position(self, decision: RoutingDecision) -> jax.Array:
    """<int32>[G, S·K] buffer row of each choice; E·C for dropped ones."""
    e, c = decision.num_experts, decision.capacity
    position = jnp.where(decision.kept, decision.expert_index * c + decision.slot, e * c)
    return position.reshape(position.shape[0], -1)

  def dispatch(self, decision: RoutingDecision, x: jax.Array) -> jax.Array:
    g, s, d = x.shape
    e, c, k = decision.num_experts, decision.capacity, decision.expert_index.shape[-1]
    position = self._flat_position(decision)  # [G, S·K]
    token = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], (s, k)).reshape(-1)
    # Invert the map: which token fills each buffer row (S = an all-zero padding token).
    token_of_row = jnp.full((g, e * c + 1), s, dtype=jnp.int32)
    token_of_row = token_of_row.at[jnp.arange(g)[:, None], position].set(token[None, :])
    x_padded = jnp.concatenate([x, jnp.zeros((g, 1, d), x.dtype)], axis=1)  # [G, S+1, d]
    buffers = jnp.take_along_axis(x_padded, token_of_row[:, : e * c, None], axis=1)
    return jnp.swapaxes(buffers.reshape(g, e, c, d), 0, 1)  # [E, G, C, d]

  def combine(self, decision: RoutingDecision, y: jax.Array) -> jax.Array:
    e, g, c, d = y.shape
    s, k = decision.expert_index.shape[1:]
    rows = jnp.swapaxes(y, 0, 1).reshape(g, e * c, d)
    rows = jnp.concatenate([rows, jnp.zeros((g, 1, d), y.dtype)], axis=1)  # [G, E·C+1, d]
    picked = jnp.take_along_axis(rows, self._flat_position(decision)[..., None], axis=1)
    picked = picked.reshape(g, s, k, d)
    return jnp.einsum("gsk,gskd->gsd", decision.combine_weight.astype(y.dtype), picked)


def get_dispatcher(name: str):
  """The dispatcher called `name` (one of DISPATCHERS)."""
  if name == "einsum":
    return EinsumDispatcher()
  if name == "sort":
    return SortDispatcher()
  raise ValueError(f"dispatcher must be one of {DISPATCHERS}, got {name!r}")
