"""Soft MoE (Puigcerver et al.): each of E·p slots is a softmax mix of the group's tokens.

Dispatch weights are a softmax over tokens per slot, combine weights a softmax over slots per
token; tokens and slot parameters are L2-normalised with a learned scale (App. E) unless
`soft_normalize` is off. Nothing is dropped and the decision is dense, so it always moves
through the einsum dispatcher. Not causal: every slot mixes the whole group.
"""

from __future__ import annotations

from moejax.lazy import jax, jnp
from moejax.routers.base import Option, RouterFamily, routing
from moejax.routers.registry import register

SLOTS_PER_EXPERT = Option("slots_per_expert", 1, "Slots p per expert (the paper's best: 1).", minimum=0, exclusive=True)
SOFT_NORMALIZE = Option("soft_normalize", True, "L2-normalise tokens and slot parameters, learned scale.")
SOFT_SIMILARITY_METRICS = Option(
  "soft_similarity_metrics",
  True,
  "Log vmoe's cosine similarities of the combine weights (token pairs), dispatch weights (slot pairs) and "
  "slot parameters; the token pairs cost a [G, S, S] array per layer and step.",
)


@register
class SoftMoE(RouterFamily):
  """C = p slots per expert per group, each a convex mix of the group's S tokens."""

  name = "soft_moe"
  options = (SLOTS_PER_EXPERT, SOFT_NORMALIZE, SOFT_SIMILARITY_METRICS)

  @classmethod
  def capacity(cls, cfg, group_size, train):
    return cfg.slots_per_expert

  @classmethod
  def is_causal(cls, cfg) -> bool:
    return False

  @classmethod
  def experts_per_token(cls, cfg, group_size):
    """E·p slots of mixed tokens per S tokens."""
    return cfg.num_experts * cfg.slots_per_expert / group_size

  @classmethod
  def dispatcher(cls, cfg) -> str:
    return "einsum"

  @classmethod
  def variables(cls, cfg, d_model, init, rngs):
    out = {"slot_params": ("param", init(rngs.params(), (d_model, cfg.num_experts * cfg.slots_per_expert)))}
    if cfg.soft_normalize:
      out["scale"] = ("param", jnp.ones((), jnp.float32))
    return out

  @classmethod
  def route(cls, router, x, *, capacity, train, rng, token_ids=None):
    cfg = router.cfg
    scale = router.scale[...] if cfg.soft_normalize else 1.0
    decision = routing.soft_moe_route(
      x, router.slot_params[...], num_experts=cfg.num_experts, scale=scale, normalize=cfg.soft_normalize
    )
    stats = {"logits": None, "probs": None, "selection_counts": jnp.zeros((cfg.num_experts,), jnp.float32)}
    stats["slot_params"] = router.slot_params[...]  # [d, E·p], for the similarity metrics.
    return decision, stats

  @classmethod
  def kept_per_expert(cls, cfg, decision, aux, batch):
    """Also vmoe's means of the extreme weights: 'soft_dispatch_{max,min}_weight' (its
    dispatch_weights_{max,min}_mean: per slot over the S tokens, averaged over slots and groups;
    max 1 = each slot takes one token, 1/S = uniform mixing) and 'soft_combine_{max,min}_weight'
    (combine_weights_{max,min}_mean: per token over the E·p slots)."""
    dispatch = jax.lax.stop_gradient(decision.dispatch_weights)  # [G, S, E, p]
    combine = jax.lax.stop_gradient(decision.combine_weights)
    combine = combine.reshape(*combine.shape[:2], -1)  # [G, S, E·p]
    aux["soft_dispatch_max_weight"] = batch.mean(dispatch.max(axis=1).mean())
    aux["soft_dispatch_min_weight"] = batch.mean(dispatch.min(axis=1).mean())
    aux["soft_combine_max_weight"] = batch.mean(combine.max(axis=-1).mean())
    aux["soft_combine_min_weight"] = batch.mean(combine.min(axis=-1).mean())
    return decision.dispatch_weights.sum(axis=(0, 1, 3))

  @classmethod
  def aux(cls, cfg, decision, stats, batch):
    """The base metrics, and with `soft_similarity_metrics` vmoe's similarity metrics.

    'soft_{combine,dispatch,slot}_similarity_{min,max,mean}': the cosine similarity of every pair
    of distinct tokens' combine weights [E·p] (within a group), of distinct slots' dispatch
    weights [S] (within a group), and of distinct slot parameters [d] (vmoe's
    combine_weights_similarity_*, dispatch_weights_similarity_*, mu_similarity_*).
    """
    aux = super().aux(cfg, decision, stats, batch)
    if not cfg.soft_similarity_metrics:
      return aux
    g, s, e, p = decision.combine_weights.shape
    pairs = {
      "combine": decision.combine_weights.reshape(g, s, e * p),  # [G, S, E·p] one vector per token
      "dispatch": jnp.swapaxes(decision.dispatch_weights.reshape(g, s, e * p), 1, 2),  # [G, E·p, S] per slot
    }
    for name, vectors in pairs.items():
      aux.update(_pairwise_cosine_stats(jax.lax.stop_gradient(vectors), f"soft_{name}_similarity", batch))
    slot_params = jax.lax.stop_gradient(stats["slot_params"].astype(jnp.float32).T[None])  # [1, E·p, d]
    aux.update(_pairwise_cosine_stats(slot_params, "soft_slot_similarity", None))
    return aux


def _pairwise_cosine_stats(vectors, prefix: str, batch) -> dict:
  """{prefix_min, _max, _mean}: cosine similarity of distinct pairs of the N vectors of each set, [B, N, D]."""
  _, n, _ = vectors.shape
  if n < 2:  # No pair (one token, or one slot): report the similarity of a vector with itself.
    one = jnp.ones((), jnp.float32)
    return {f"{prefix}_min": one, f"{prefix}_max": one, f"{prefix}_mean": one}
  unit = vectors * jax.lax.rsqrt(jnp.sum(vectors * vectors, axis=-1, keepdims=True) + 1e-9)
  similarity = jnp.einsum("bnd,bmd->bnm", unit, unit)  # [B, N, N]
  distinct = ~jnp.eye(n, dtype=bool)
  low = jnp.where(distinct, similarity, jnp.inf).min()
  high = jnp.where(distinct, similarity, -jnp.inf).max()
  mean = jnp.where(distinct, similarity, 0.0).sum(axis=(1, 2)).mean() / (n * (n - 1))
  if batch is not None:  # None: the same on every device (the replicated slot parameters).
    low, high, mean = batch.min(low), batch.max(high), batch.mean(mean)
  return {f"{prefix}_min": low, f"{prefix}_max": high, f"{prefix}_mean": mean}
