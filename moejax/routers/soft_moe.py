"""Soft MoE (Puigcerver et al.): each of E·p slots is a softmax mix of the group's tokens.

Dispatch weights are a softmax over tokens per slot, combine weights a softmax over slots per
token; tokens and slot parameters are L2-normalised with a learned scale (App. E) unless
`soft_normalize` is off. Nothing is dropped and the decision is dense, so it always moves
through the einsum dispatcher. Not causal: every slot mixes the whole group.
"""

from __future__ import annotations

from moejax.lazy import jnp
from moejax.routers.base import Option, RouterFamily, routing
from moejax.routers.registry import register

SLOTS_PER_EXPERT = Option("slots_per_expert", 1, "Slots p per expert (the paper's best: 1).", minimum=0, exclusive=True)
SOFT_NORMALIZE = Option("soft_normalize", True, "L2-normalise tokens and slot parameters, learned scale.")


@register
class SoftMoE(RouterFamily):
  """C = p slots per expert per group, each a convex mix of the group's S tokens."""

  name = "soft_moe"
  options = (SLOTS_PER_EXPERT, SOFT_NORMALIZE)

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
    return decision, {"logits": None, "probs": None, "selection_counts": jnp.zeros((cfg.num_experts,), jnp.float32)}

  @classmethod
  def kept_per_expert(cls, cfg, decision, aux, batch):
    # 1 = each slot takes one token (sparse-like); 1/S = uniform mixing.
    aux["soft_dispatch_max_weight"] = batch.mean(decision.dispatch_weights.max(axis=1).mean())
    combine = decision.combine_weights
    aux["soft_combine_max_weight"] = batch.mean(combine.reshape(*combine.shape[:2], -1).max(axis=-1).mean())
    return decision.dispatch_weights.sum(axis=(0, 1, 3))
