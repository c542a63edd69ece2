"""Routing decisions: which expert and slot each token's choices get, as pure functions.

A router turns router scores into a decision; dispatchers (`moejax.dispatch`) move the data
according to it, and any dispatcher gives the same output for the same decision. Everything
here is a pure function usable on hand-written probabilities, so tests and notebooks can
inspect a decision; `moejax.routers` wraps them with parameters, noise and state.

Legend: G groups, S tokens per group, E experts, C capacity (slots per expert per group),
K choices per token, n = E·p soft slots, d model dim.

Decision kinds:
  RoutingDecision       discrete: (expert, slot, weight) per (token, choice). Token-choice
                        routers (top-k, hash, dense-gated, DeepSeek) and expert choice
                        (a token's "choices" are the experts that picked it, K = E or a cap).
  SoftRoutingDecision   Soft MoE: dense dispatch and combine weights over (expert, slot).
Both offer dense `[G, S, E, C]` views: `dispatch_mask()` and `combine_array()`.

Conventions (see REFERENCES.md, each a named option):
  combine_weights: 'raw'          the full-softmax probability of the chosen expert (Switch, vmoe);
                   'renormalized' renormalized over the K chosen (GShard, Mixtral).
  priority:        'choice_major' every token's 1st choice takes a slot before any 2nd choice,
                                  token order inside (vmoe, flaxformer). Not causal for K > 1:
                                  token t's 2nd choice competes with later tokens' 1st choices.
                   'token_major'  t0's K choices, then t1's, ... (MaxText). Causal within a group
                                  that is one sequence: a token's slots depend only on earlier ones.
                   'bpr'          batch-prioritized (V-MoE): choice-major, tokens ordered by their
                                  top-1 probability, highest first. Not causal.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

COMBINE_WEIGHTS = ("raw", "renormalized")
PRIORITIES = ("choice_major", "token_major", "bpr")


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
    routed: <bool>[G, S, K] whether the choice asked for a slot at all (False only for a 2nd
      expert that GShard's random policy skipped); routed & ~kept = dropped for capacity.
    num_experts: E.
    capacity: C.
  """

  expert_index: jax.Array
  slot: jax.Array
  combine_weight: jax.Array
  kept: jax.Array
  routed: jax.Array
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


def assign_slots(
  expert_index: jax.Array,
  num_experts: int,
  priority: str,
  active: jax.Array | None = None,
  order_score: jax.Array | None = None,
) -> jax.Array:
  """<int32>[G, S, K] position of each choice in its expert's queue, in `priority` order.

  Args:
    expert_index: <int32>[G, S, K] chosen experts.
    num_experts: E.
    priority: one of PRIORITIES.
    active: optional <bool>[G, S, K]; inactive choices take no place in any queue (their
      returned position is meaningless; callers mark them dropped).
    order_score: <float32>[G, S] for 'bpr': tokens with higher scores queue first.
  """
  g, s, k = expert_index.shape
  expert_1h = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [G, S, K, E]
  if active is not None:
    expert_1h = expert_1h * active[..., None].astype(jnp.int32)
  if priority == "bpr":
    order = jnp.argsort(-order_score, axis=1, stable=True)  # [G, S] tokens, best first
    sorted_1h = jnp.take_along_axis(expert_1h, order[:, :, None, None], axis=1)
    position = assign_slots_from_one_hot(sorted_1h, "choice_major")
    inverse = jnp.argsort(order, axis=1)
    return jnp.take_along_axis(position, inverse[:, :, None], axis=1)
  if priority not in PRIORITIES:
    raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
  return assign_slots_from_one_hot(expert_1h, priority)


def assign_slots_from_one_hot(expert_1h: jax.Array, priority: str) -> jax.Array:
  """Queue positions from <int32>[G, S, K, E] one-hot choices in choice- or token-major order."""
  g, s, k, e = expert_1h.shape
  if priority == "choice_major":
    ordered = jnp.swapaxes(expert_1h, 1, 2).reshape(g, k * s, e)  # [G, K·S, E]
  else:
    ordered = expert_1h.reshape(g, s * k, e)  # [G, S·K, E]
  # Position = number of earlier choices (in priority order) that picked the same expert.
  position = ((jnp.cumsum(ordered, axis=1) - 1) * ordered).sum(axis=-1)
  if priority == "choice_major":
    return jnp.swapaxes(position.reshape(g, k, s), 1, 2)
  return position.reshape(g, s, k)


def route_choices(
  expert_index: jax.Array,
  gate: jax.Array,
  *,
  num_experts: int,
  capacity: int,
  priority: str = "choice_major",
  active: jax.Array | None = None,
  order_score: jax.Array | None = None,
) -> RoutingDecision:
  """Token-choice decision from chosen experts and their weights: queues, capacity, dropping.

  Args:
    expert_index: <int32>[G, S, K] chosen experts, best first.
    gate: <float32>[G, S, K] combine weight of each choice if it is kept.
    num_experts, capacity: E and C.
    priority: slot order (see module docstring).
    active: optional <bool>[G, S, K]; inactive choices are not routed at all.
    order_score: <float32>[G, S] token order for 'bpr' (the top-1 probability).
  """
  slot = assign_slots(expert_index, num_experts, priority, active, order_score)
  kept = slot < capacity
  routed = jnp.ones(expert_index.shape, bool) if active is None else active
  if active is not None:
    kept = kept & active
    slot = jnp.where(active, slot, capacity)
  return RoutingDecision(
    expert_index=expert_index.astype(jnp.int32),
    slot=slot.astype(jnp.int32),
    combine_weight=jnp.where(kept, gate, 0.0).astype(jnp.float32),
    kept=kept,
    routed=routed,
    num_experts=num_experts,
    capacity=capacity,
  )


def top_k_route(
  probs: jax.Array,
  *,
  top_k: int,
  capacity: int,
  combine_weights: str = "raw",
  priority: str = "choice_major",
  second_expert_threshold: jax.Array | None = None,
  selection_scores: jax.Array | None = None,
) -> RoutingDecision:
  """Top-k token-choice routing (Switch for k=1, GShard for k=2) with capacity dropping.

  Args:
    probs: <float32>[G, S, E] router probabilities (softmax of float32 logits), or any
      non-negative affinities (DeepSeek's sigmoid scores).
    top_k: K, choices per token.
    capacity: C, slots per expert per group; choices beyond it are dropped (their token
      passes through the residual connection only).
    combine_weights: 'raw' or 'renormalized' (see module docstring).
    priority: one of PRIORITIES (see module docstring).
    second_expert_threshold: GShard's random routing, <float32>[G, S] uniform draws u: a
      token's 2nd choice is used only if 2·g2 > u, with g the renormalized top-2 weights.
    selection_scores: <float32>[G, S, E] used to *choose* experts instead of `probs` (DeepSeek's
      biased scores); weights still come from `probs`.

  Returns:
    The decision. A pure function of its inputs: usable on hand-written probabilities.
  """
  if combine_weights not in COMBINE_WEIGHTS:
    raise ValueError(f"combine_weights must be one of {COMBINE_WEIGHTS}, got {combine_weights!r}")
  num_experts = probs.shape[-1]
  chooser = probs if selection_scores is None else selection_scores
  _, expert_index = jax.lax.top_k(chooser, top_k)  # [G, S, K]
  gate = jnp.take_along_axis(probs, expert_index, axis=-1)
  if combine_weights == "renormalized":
    gate = gate / jnp.maximum(jnp.sum(gate, axis=-1, keepdims=True), 1e-9)
  active = None
  if second_expert_threshold is not None:
    normalized = gate / jnp.maximum(jnp.sum(gate, axis=-1, keepdims=True), 1e-9)
    use_second = 2.0 * normalized[..., 1] > second_expert_threshold
    active = jnp.ones(expert_index.shape, bool).at[..., 1].set(use_second)
  return route_choices(
    expert_index,
    gate,
    num_experts=num_experts,
    capacity=capacity,
    priority=priority,
    active=active,
    order_score=probs.max(axis=-1),
  )


def expert_choice_route(probs: jax.Array, *, capacity: int, max_experts_per_token: int = 0) -> RoutingDecision:
  """Expert choice (Zhou et al. 2022): each expert takes its C highest-scoring tokens of the group.

  Args:
    probs: <float32>[G, S, E] token-to-expert softmax probabilities (the scores and the weights).
    capacity: C = S·cf/E tokens per expert.
    max_experts_per_token: optional cap: a token keeps at most this many of the experts that
      picked it (its highest-weighted ones); 0 = no cap (a token may get 0..E experts).

  Returns:
    A RoutingDecision with K = E (or the cap): a token's "choices" are the experts that picked
    it, best weight first; slots are in descending score order within each expert. Not causal.
  """
  g, s, e = probs.shape
  _, top_tokens = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)  # [G, E, C], best first
  chosen = (
    jnp.zeros((g, e, s), bool).at[jnp.arange(g)[:, None, None], jnp.arange(e)[None, :, None], top_tokens].set(True)
  )
  rank = (
    jnp.full((g, e, s), capacity, jnp.int32)
    .at[jnp.arange(g)[:, None, None], jnp.arange(e)[None, :, None], top_tokens]
    .set(jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (g, e, capacity)))
  )
  chosen, rank = jnp.swapaxes(chosen, 1, 2), jnp.swapaxes(rank, 1, 2)  # [G, S, E]
  k = max_experts_per_token or e
  _, expert_index = jax.lax.top_k(jnp.where(chosen, probs, -1.0), k)  # [G, S, K]
  kept = jnp.take_along_axis(chosen, expert_index, axis=-1)
  return RoutingDecision(
    expert_index=expert_index.astype(jnp.int32),
    slot=jnp.where(kept, jnp.take_along_axis(rank, expert_index, axis=-1), capacity).astype(jnp.int32),
    combine_weight=jnp.where(kept, jnp.take_along_axis(probs, expert_index, axis=-1), 0.0),
    kept=kept,
    routed=kept,  # An expert that did not pick the token is no request of the token's.
    num_experts=e,
    capacity=capacity,
  )


def hash_experts(token_ids: jax.Array, num_experts: int, seed: int = 0) -> jax.Array:
  """<int32>[...] a fixed pseudo-random expert per token id (Roller et al. 2021).

  A multiplicative hash of (id, seed): the same id always goes to the same expert, and ids
  spread evenly over experts whatever their frequency.
  """
  h = (token_ids.astype(jnp.uint32) + jnp.uint32(seed) * jnp.uint32(0x9E3779B9)) * jnp.uint32(2654435761)
  h = h ^ (h >> 16)
  return (h % jnp.uint32(num_experts)).astype(jnp.int32)


GROUP_SCORES = ("top2_sum", "max")


def group_limited_scores(
  scores: jax.Array, *, num_groups: int, top_groups: int, group_score: str = "top2_sum"
) -> jax.Array:
  """DeepSeek's group-limited routing: keep the experts of the best `top_groups` groups.

  Args:
    scores: <float32>[G, S, E] selection scores (with the balancing bias), E divisible by
      num_groups.
    group_score: a group's score, 'top2_sum' the sum of its two best expert scores (V3's
      node-limited routing, `noaux_tc`) | 'max' its best one (V2's device-limited routing,
      `group_limited_greedy`).

  Returns:
    scores with experts outside the chosen groups set to -inf.
  """
  if group_score not in GROUP_SCORES:
    raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {group_score!r}")
  g, s, e = scores.shape
  grouped = scores.reshape(g, s, num_groups, e // num_groups)
  best = min(2, e // num_groups) if group_score == "top2_sum" else 1
  group_scores = jax.lax.top_k(grouped, best)[0].sum(axis=-1)  # [G, S, groups]
  _, keep = jax.lax.top_k(group_scores, top_groups)
  group_mask = jax.nn.one_hot(keep, num_groups, dtype=bool).any(axis=-2)  # [G, S, groups]
  mask = jnp.repeat(group_mask, e // num_groups, axis=-1)
  return jnp.where(mask, scores, -jnp.inf)


@flax.struct.dataclass
class SoftRoutingDecision:
  """Soft MoE (Puigcerver et al.): every slot is a convex mix of the group's tokens.

  Attributes:
    dispatch_weights: <float32>[G, S, E, C] softmax over the S tokens for each (expert, slot).
    combine_weights: <float32>[G, S, E, C] softmax over all E·C slots for each token.
  """

  dispatch_weights: jax.Array
  combine_weights: jax.Array

  @property
  def num_experts(self) -> int:
    return self.dispatch_weights.shape[2]

  @property
  def capacity(self) -> int:
    return self.dispatch_weights.shape[3]

  def dispatch_mask(self) -> jax.Array:
    return self.dispatch_weights

  def combine_array(self) -> jax.Array:
    return self.combine_weights


def soft_moe_route(
  x: jax.Array, slot_params: jax.Array, *, num_experts: int, scale: jax.Array | float = 1.0, normalize: bool = True
) -> SoftRoutingDecision:
  """Soft MoE weights from tokens and slot parameters.

  Args:
    x: [G, S, d] tokens.
    slot_params: Φ, [d, E·p] one column per slot, expert-major.
    scale: learned scalar multiplying the logits when `normalize` (App. E of the paper).
    normalize: L2-normalize x and Φ over d (else the softmax collapses at large d).
  """
  x = x.astype(jnp.float32)
  phi = slot_params.astype(jnp.float32)
  if normalize:
    x = x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)
    phi = scale * phi * jax.lax.rsqrt(jnp.sum(phi * phi, axis=0, keepdims=True) + 1e-6)
  logits = jnp.einsum("gsd,dn->gsn", x, phi)  # [G, S, n]
  g, s, n = logits.shape
  dispatch = jax.nn.softmax(logits, axis=1).reshape(g, s, num_experts, n // num_experts)
  combine = jax.nn.softmax(logits, axis=2).reshape(g, s, num_experts, n // num_experts)
  return SoftRoutingDecision(dispatch_weights=dispatch, combine_weights=combine)
