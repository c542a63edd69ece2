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

DISPATCHERS = ("einsum", "sort", "dropless")


class EinsumDispatcher:
  """GShard's one-hot dispatch/combine einsums: O(G·S·E·C·d) FLOPs, the reference."""

  def dispatch(self, decision: RoutingDecision, x: jax.Array) -> jax.Array:
    mask = decision.dispatch_mask().astype(x.dtype)  # [G, S, E, C]
    return jnp.einsum("gsec,gsd->egcd", mask, x)

  def combine(self, decision: RoutingDecision, y: jax.Array) -> jax.Array:
    weights = decision.combine_array().astype(y.dtype)  # [G, S, E, C]
    return jnp.einsum("gsec,egcd->gsd", weights, y)


class SortDispatcher:
  """Gather/scatter by slot index: O(G·E·C·d) data movement, no one-hot matmuls.

  Each kept choice has a flat buffer position e·C + slot; dropped choices point at a spare
  row E·C, which is discarded. Inverting that map gives each buffer row its token: dispatch
  gathers rows, combine scatter-adds weighted rows back, so a token with many experts
  (expert choice, dense) costs no extra memory.
  """

  def _flat_position(self, decision: RoutingDecision) -> jax.Array:
    """<int32>[G, S·K] buffer row of each choice; E·C for dropped ones."""
    e, c = decision.num_experts, decision.capacity
    position = jnp.where(decision.kept, decision.expert_index * c + decision.slot, e * c)
    return position.reshape(position.shape[0], -1)

  def _rows(self, decision: RoutingDecision):
    """Inverts the map: <int32>[G, E·C] token filling each buffer row (S if none) and its weight."""
    g, s, k = decision.expert_index.shape
    e, c = decision.num_experts, decision.capacity
    position = self._flat_position(decision)  # [G, S·K]
    token = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], (s, k)).reshape(1, -1)
    rows = jnp.arange(g)[:, None]
    token_of_row = jnp.full((g, e * c + 1), s, jnp.int32).at[rows, position].set(token)
    weight_of_row = jnp.zeros((g, e * c + 1), jnp.float32).at[rows, position].set(
        decision.combine_weight.reshape(g, -1))
    return token_of_row[:, : e * c], weight_of_row[:, : e * c]

  def dispatch(self, decision: RoutingDecision, x: jax.Array) -> jax.Array:
    g, s, d = x.shape
    token_of_row, _ = self._rows(decision)
    x_padded = jnp.concatenate([x, jnp.zeros((g, 1, d), x.dtype)], axis=1)  # [G, S+1, d]
    buffers = jnp.take_along_axis(x_padded, token_of_row[..., None], axis=1)  # [G, E·C, d]
    return jnp.swapaxes(buffers.reshape(g, decision.num_experts, decision.capacity, d), 0, 1)

  def combine(self, decision: RoutingDecision, y: jax.Array) -> jax.Array:
    e, g, c, d = y.shape
    s = decision.expert_index.shape[1]
    token_of_row, weight_of_row = self._rows(decision)  # Unfilled rows: token S, weight 0.
    weighted = jnp.swapaxes(y, 0, 1).reshape(g, e * c, d) * weight_of_row[..., None].astype(y.dtype)
    # Scatter-add rows back to their tokens: O(E·C·d), however many choices a token has.
    out = jnp.zeros((g, s + 1, d), y.dtype).at[jnp.arange(g)[:, None], token_of_row].add(weighted)
    return out[:, :s]


def get_dispatcher(name: str):
  """The dispatcher called `name` (one of DISPATCHERS)."""
  if name == "einsum":
    return EinsumDispatcher()
  if name == "sort":
    return SortDispatcher()
  if name == "dropless":
    raise ValueError("'dropless' runs the experts itself (moejax.dropless); it has no dispatch/combine")
  raise ValueError(f"dispatcher must be one of {DISPATCHERS}, got {name!r}")
