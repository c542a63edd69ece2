"""Dense-gated MoE: every token uses every expert, weighted by the softmax (no sparsity, no drops)."""

from __future__ import annotations

from moejax.lazy import jax
from moejax.routers import base
from moejax.routers.base import RouterFamily, routing
from moejax.routers.registry import register


@register
class Dense(RouterFamily):
  """All E experts per token; capacity S (nobody is dropped)."""

  name = "dense"
  options = (base.DISPATCHER, base.Z_LOSS_WEIGHT, base.IMPORTANCE_LOSS_WEIGHT)

  @classmethod
  def capacity(cls, cfg, group_size, train):
    return group_size

  @classmethod
  def experts_per_token(cls, cfg, group_size):
    return cfg.num_experts

  @classmethod
  def route(cls, router, x, *, capacity, train, rng, token_ids=None):
    logits, stats = cls.logits(router, x, train=train, rng=None)
    probs = jax.nn.softmax(logits, axis=-1)
    decision = routing.top_k_route(probs, top_k=router.cfg.num_experts, capacity=capacity)
    return decision, {**stats, "probs": probs, "selection_counts": base.selection_counts(decision)}
