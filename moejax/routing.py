"""Routers: the routing *decision*, kept apart from the data movement.

A router turns router logits into a `RoutingDecision`: for each (token, choice) the expert it
goes to, its slot in that expert's capacity buffer (or that it was dropped) and its combine
weight. Dispatchers (`moejax.dispatch`) move the data according to a decision; any dispatcher
gives the same output for the same decision.

Legend: G groups, S tokens per group, E experts, C capacity (slots per expert per group),
K choices per token, d model dim.

Conventions (see REFERENCES.md, each a named option):
  combine_weights: 'raw'          the full-softmax probability of the chosen expert (Switch, vmoe);
                   'renormalized' softmax renormalized over the K chosen (GShard, Mixtral).
  priority:        'choice_major' every token's 1st choice takes a slot before any 2nd choice,
                                  token order inside (vmoe, flaxformer). Not causal for K > 1:
                                  token t's 2nd choice competes with later tokens' 1st choices.
                   'token_major'  t0's K choices, then t1's, ... (MaxText). Causal within a group
                                  that is one sequence: a token's slots depend only on earlier ones.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

COMBINE_WEIGHTS = ("raw", "renormalized")
PRIORITIES = ("choice_major", "token_major")


def compute_capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """Slots per expert per group: ceil(S·K·cf / E), at least 1 and at most S.

  This is vmoe's formula without its rounding to a multiple of 4 (which would change the
  dropping behaviour of small hand-checkable cases). An expert can never receive more than S
  tokens of one group, since a token chooses K distinct experts.
  """
  capacity = math.ceil(group_size * top_k * capacity_factor / num_experts)
  return max(1, min(group_size, capacity))


@flax.struct.dataclass
class RoutingDecision:
  """Where each (token, choice) goes.

  Attributes:
    expert_index: <int32>[G, S, K] the chosen expert of each choice, best first.
    slot: <int32>[G, S, K] position in that expert's buffer; >= capacity when dropped.
    combine_weight: <float32>[G, S, K] weight of the expert output; 0 where dropped.
    kept: <bool>[G, S, K] whether the choice got a slot.
    num_experts: E.
    capacity: C.
  """

  expert_index: jax.Array
  slot: jax.Array
  combine_weight: jax.Array
  kept: jax.Array
  num_experts: int = flax.struct.field(pytree_node=False)
  capacity: int = flax.struct.field(pytree_node=False)

  def dispatch_mask(self) -> jax.Array:
    """<float32>[G, S, E, C]: 1 where token s of group g sits in slot c of expert e."""
    expert_1h = jax.nn.one_hot(self.expert_index, self.num_experts, dtype=jnp.float32)
    # Dropped choices have slot >= C, so their one-hot row is all zero.
    slot_1h = jax.nn.one_hot(self.slot, self.capacity, dtype=jnp.float32)
    return jnp.einsum("gske,gskc->gsec", expert_1h, slot_1h)

  def combine_array(self) -> jax.Array:
    """<float32>[G, S, E, C]: the combine weight at each (token, expert, slot)."""
    expert_1h = jax.nn.one_hot(self.expert_index, self.num_experts, dtype=jnp.float32)
    slot_1h = jax.nn.one_hot(self.slot, self.capacity, dtype=jnp.float32)
    return jnp.einsum("gsk,gske,gskc->gsec", self.combine_weight, expert_1h, slot_1h)


def assign_slots(expert_index: jax.Array, num_experts: int, priority: str) -> jax.Array:
  """<int32>[G, S, K] position of each choice in its expert's queue, in `priority` order."""
  g, s, k = expert_index.shape
  expert_1h = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [G, S, K, E]
  if priority == "choice_major":
    ordered = jnp.swapaxes(expert_1h, 1, 2).reshape(g, k * s, num_experts)  # [G, K·S, E]
  elif priority == "token_major":
    ordered = expert_1h.reshape(g, s * k, num_experts)  # [G, S·K, E]
  else:
    raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
  # Position = number of earlier choices (in priority order) that picked the same expert.
  position = (jnp.cumsum(ordered, axis=1) - 1) * ordered
  position = position.sum(axis=-1)
  if priority == "choice_major":
    return jnp.swapaxes(position.reshape(g, k, s), 1, 2)
  return position.reshape(g, s, k)


def top_k_route(
    probs: jax.Array,
    *,
    top_k: int,
    capacity: int,
    combine_weights: str = "raw",
    priority: str = "choice_major",
) -> RoutingDecision:
  """Top-k token-choice routing (Switch for k=1, GShard for k=2) with capacity dropping.

  Args:
    probs: <float32>[G, S, E] router probabilities (softmax of float32 logits).
    top_k: K, choices per token.
    capacity: C, slots per expert per group; choices beyond it are dropped (their token
      passes through the residual connection only).
    combine_weights: 'raw' or 'renormalized' (see module docstring).
    priority: 'choice_major' or 'token_major' (see module docstring).

  Returns:
    The decision. Pure function of `probs`: usable on hand-written probabilities.
  """
  if combine_weights not in COMBINE_WEIGHTS:
    raise ValueError(f"combine_weights must be one of {COMBINE_WEIGHTS}, got {combine_weights!r}")
  num_experts = probs.shape[-1]
  gate, expert_index = jax.lax.top_k(probs, top_k)  # [G, S, K] each
  if combine_weights == "renormalized":
    gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
  slot = assign_slots(expert_index, num_experts, priority)
  kept = slot < capacity
  return RoutingDecision(
      expert_index=expert_index.astype(jnp.int32),
      slot=slot.astype(jnp.int32),
      combine_weight=jnp.where(kept, gate, 0.0).astype(jnp.float32),
      kept=kept,
      num_experts=num_experts,
      capacity=capacity,
  )
