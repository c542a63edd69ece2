"""Dispatchers: move tokens to the experts and back, following a routing decision.

Every dispatcher implements
  dispatch(decision, x: [G, S, d]) -> what the experts receive
  combine(decision, y) -> [G, S, d]    Σ_k combine_weight · the expert output of choice k
and all give the same result for the same decision (tests/test_dispatch.py, tests/test_routers.py).
  'einsum'    GShard's one-hot form, capacity buffers [E, G, C, d]; also Soft MoE's dense decision.
  'sort'      the same buffers by row gathers through `moejax.kernels` (XLA or Pallas).
  'dropless'  no capacity: `Rows` (the tokens and their K choices); the experts' grouped matmul
              (`moejax.dropless`) sorts the rows into expert order itself.
The MoE layer (`moejax.layers.moe`) runs route -> dispatch -> experts -> combine with any of them;
the expert-parallel exchange between dispatch and experts is `moejax.parallel`'s.

Legend: G groups, S tokens per group, E experts, C capacity, K choices per token, d model dim.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from moejax import kernels
from moejax.routing import RoutingDecision

DISPATCHERS = ("einsum", "sort", "dropless")


class EinsumDispatcher:
  """GShard's one-hot dispatch/combine einsums: O(G·S·E·C·d) FLOPs, the reference.

  Works on any decision with dense views (`dispatch_mask`, `combine_array`), Soft MoE's included.
  """

  def dispatch(self, decision, x: jax.Array) -> jax.Array:
    mask = decision.dispatch_mask().astype(x.dtype)  # [G, S, E, C]
    return jnp.einsum("gsec,gsd->egcd", mask, x)

  def combine(self, decision, y: jax.Array) -> jax.Array:
    weights = decision.combine_array().astype(y.dtype)  # [G, S, E, C]
    return jnp.einsum("gsec,egcd->gsd", weights, y)


class SortDispatcher:
  """Gather by slot index, both ways: O(E·G·C·d + T·K·d) data movement, no one-hot matmuls.

  Each kept choice has a buffer row (e·G + g)·C + slot of the [E, G, C] buffers, and each
  filled row its choice (a `kernels.RowMap`). dispatch gathers each row's token, combine
  gathers each token's K rows and sums them with the combine weights, and the gradients are
  gathers too (moejax/kernels/permute.py says why no scatter-add). `backend` picks the XLA
  gathers or the Pallas kernels ('auto': see `moejax.kernels.permute`).
  """

  def __init__(self, backend: str = "auto"):
    self.backend = backend

  def row_map(self, decision: RoutingDecision) -> kernels.RowMap:
    """The RowMap of the decision's G·S tokens and E·G·C buffer rows (dropped choices: none)."""
    g, s, k = decision.expert_index.shape
    e, c = decision.num_experts, decision.capacity
    group = jnp.arange(g, dtype=jnp.int32)[:, None, None]
    row = (decision.expert_index * g + group) * c + decision.slot  # [G, S, K] in [E, G, C] order
    row = jnp.where(decision.kept, row, e * g * c)
    return kernels.RowMap.from_rows(row.reshape(g * s, k), e * g * c)

  def dispatch(self, decision: RoutingDecision, x: jax.Array) -> jax.Array:
    g, s, d = x.shape
    rows = kernels.permute(x.reshape(g * s, d), self.row_map(decision), backend=self.backend)
    return rows.reshape(decision.num_experts, g, decision.capacity, d)

  def combine(self, decision: RoutingDecision, y: jax.Array) -> jax.Array:
    e, g, c, d = y.shape
    s, k = decision.expert_index.shape[1:]
    out = kernels.unpermute(
      y.reshape(e * g * c, d), self.row_map(decision), decision.combine_weight.reshape(g * s, k), backend=self.backend
    )
    return out.reshape(g, s, d)


@flax.struct.dataclass
class Rows:
  """What the dropless experts receive: every token with its K choices, none dropped.

  Attributes:
    tokens: [T, d], T = G·S.
    expert_index: <int32>[T, K] the chosen experts.
    combine_weight: <float32>[T, K] the weight of each choice's expert output.
  """

  tokens: jax.Array
  expert_index: jax.Array
  combine_weight: jax.Array


class DroplessDispatcher:
  """No capacity (MegaBlocks): every choice reaches its expert; the experts return the weighted sum."""

  def dispatch(self, decision: RoutingDecision, x: jax.Array) -> Rows:
    g, s, d = x.shape
    k = decision.expert_index.shape[-1]
    return Rows(x.reshape(g * s, d), decision.expert_index.reshape(g * s, k), decision.combine_weight.reshape(g * s, k))

  def combine(self, decision: RoutingDecision, y: jax.Array) -> jax.Array:
    """y: [T, d], already Σ_k weight · expert output (the dropless experts combine as they go)."""
    return y.reshape(decision.expert_index.shape[:2] + y.shape[-1:])


def get_dispatcher(name: str, permute_backend: str = "auto"):
  """The dispatcher called `name` (one of DISPATCHERS); permute_backend for 'sort'."""
  if name == "einsum":
    return EinsumDispatcher()
  if name == "sort":
    return SortDispatcher(permute_backend)
  if name == "dropless":
    return DroplessDispatcher()
  raise ValueError(f"dispatcher must be one of {DISPATCHERS}, got {name!r}")
