"""Expert choice (Zhou et al. 2022): each expert takes its C best tokens of the group.

Scores are the softmax over experts; C = ceil(S·cf / E) (cf = 2 matches top-2 compute); a token
gets 0..E experts, or at most `max_experts_per_token`. Perfectly balanced, no aux loss needed.
Not causal: whether token t is taken depends on the scores of the tokens after it.
"""

from __future__ import annotations

from moejax.errors import ConfigError
from moejax.lazy import jax
from moejax.routers import base
from moejax.routers.base import Option, RouterFamily, routing
from moejax.routers.registry import register

MAX_EXPERTS_PER_TOKEN = Option("max_experts_per_token", 0, "Cap on the experts a token keeps; 0 = none.", minimum=0)


@register
class ExpertChoice(RouterFamily):
  """Experts pick tokens; the eval capacity is the training one (it decides the function computed)."""

  name = "expert_choice"
  options = (
    base.CAPACITY_FACTOR,
    base.DISPATCHER,
    base.Z_LOSS_WEIGHT,
    base.IMPORTANCE_LOSS_WEIGHT,
    MAX_EXPERTS_PER_TOKEN,
  )

  @classmethod
  def validate(cls, moe) -> None:
    super().validate(moe)
    if moe.dispatcher == "dropless":
      raise ConfigError(
        "moe.dispatcher", "'dropless' is for token-choice routers; 'expert_choice' fixes its slots by construction"
      )
    if moe.max_experts_per_token > moe.num_experts:
      raise ConfigError(
        "moe.max_experts_per_token", f"must be <= moe.num_experts ({moe.num_experts}), got {moe.max_experts_per_token}"
      )

  @classmethod
  def capacity(cls, cfg, group_size, train):
    # The capacity decides how many experts each token gets: another eval capacity would
    # evaluate another function, so eval uses the training one.
    return routing.compute_capacity(group_size, cfg.num_experts, 1, cfg.capacity_factor)

  @classmethod
  def is_causal(cls, cfg) -> bool:
    return False

  @classmethod
  def experts_per_token(cls, cfg, group_size):
    """cf: E·C = S·cf slots shared by S tokens."""
    return cfg.num_experts * cls.capacity(cfg, group_size, True) / group_size

  @classmethod
  def route(cls, router, x, *, capacity, train, rng, token_ids=None):
    logits, stats = cls.logits(router, x, train=train, rng=None)
    probs = jax.nn.softmax(logits, axis=-1)
    decision = routing.expert_choice_route(
      probs, capacity=capacity, max_experts_per_token=router.cfg.max_experts_per_token
    )
    return decision, {**stats, "probs": probs, "selection_counts": base.selection_counts(decision)}
