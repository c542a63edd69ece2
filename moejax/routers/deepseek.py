"""DeepSeek-style token choice (DeepSeekMoE, V2, V3): affinities, a balancing bias, group limits.

Scores are sigmoid (V3) or softmax (V2) affinities; a per-expert bias, which is state and not a
parameter, is added only to *choose* experts (aux-loss-free balancing, V3) and moves after each
training step by γ·sign(mean load − load). Group-limited routing keeps each token's experts in
its best `top_expert_groups` of `num_expert_groups` groups, a group scored by its best expert
(V2's device-limited routing) or the sum of its best two (V3's node-limited routing). The
routed experts' combine weights
are then multiplied by `routed_scaling_factor` (V3 2.5). Shared experts (`num_shared_experts`)
and fine-grained experts (`num_experts`, `d_expert`, `top_k`) are layer options every family has.
"""

from __future__ import annotations

from moejax.errors import ConfigError
from moejax.lazy import jax, jnp
from moejax.routers import base
from moejax.routers.base import Option, losses, routing
from moejax.routers.registry import register
from moejax.routers.top_k import TopK, check_balance_pooling, check_top_k

SCORE_FUNCTION = Option("score_function", "softmax", "'softmax' (V2) | 'sigmoid' (V3).", allowed=("softmax", "sigmoid"))
BIAS_UPDATE_RATE = Option("bias_update_rate", 1e-3, "Aux-loss-free balancing γ (V3); 0 = off.", minimum=0)
NUM_EXPERT_GROUPS = Option("num_expert_groups", 1, "Group-limited routing: the experts form this many groups ...")
TOP_EXPERT_GROUPS = Option("top_expert_groups", 1, "... of which each token may use its best ones.")
GROUP_SCORE = Option(
  "group_score",
  "top2_sum",
  "A group's score: 'top2_sum' of its two best experts (V3, node-limited) | 'max' (V2, device-limited).",
  allowed=("top2_sum", "max"),
)
DEVICE_BALANCE_LOSS_WEIGHT = Option(
  "device_balance_loss_weight",
  0.0,
  "DeepSeek-V2's device-level balance α2 (0.05): Σ_i f'_i·P'_i over the num_expert_groups devices.",
  minimum=0,
)
COMM_BALANCE_LOSS_WEIGHT = Option(
  "comm_balance_loss_weight",
  0.0,
  "DeepSeek-V2's communication balance α3 (0.02): Σ_i f''_i·P''_i, f'' the share of tokens a device receives.",
  minimum=0,
)
ROUTED_SCALING_FACTOR = Option(
  "routed_scaling_factor",
  1.0,
  "The routed experts' combine weights × this, after any renormalisation (DeepSeek-V3 2.5, V2 16.0, "
  "V2-Lite 1.0; transformers' routed_scaling_factor).",
  minimum=0,
  exclusive=True,
)


@register
class DeepSeek(TopK):
  """Top-K of biased affinities; weights from the unbiased ones."""

  name = "deepseek"
  options = (
    base.TOP_K,
    base.COMBINE_WEIGHTS,
    base.PRIORITY,
    *base.CAPACITY,
    *base.SWITCH_LOSSES,
    SCORE_FUNCTION,
    BIAS_UPDATE_RATE,
    NUM_EXPERT_GROUPS,
    TOP_EXPERT_GROUPS,
    GROUP_SCORE,
    ROUTED_SCALING_FACTOR,
    DEVICE_BALANCE_LOSS_WEIGHT,
    COMM_BALANCE_LOSS_WEIGHT,
  )

  @classmethod
  def validate(cls, moe) -> None:
    check_top_k(moe)
    base.check_options(cls.options, moe)
    check_balance_pooling(moe)
    if not (moe.num_expert_groups >= 1 and moe.num_experts % moe.num_expert_groups == 0):
      raise ConfigError(
        "moe.num_expert_groups", f"must divide moe.num_experts ({moe.num_experts}), got {moe.num_expert_groups}"
      )
    if not 1 <= moe.top_expert_groups <= moe.num_expert_groups:
      raise ConfigError(
        "moe.top_expert_groups",
        f"must be between 1 and moe.num_expert_groups ({moe.num_expert_groups}), got {moe.top_expert_groups}",
      )
    if moe.top_k > moe.top_expert_groups * (moe.num_experts // moe.num_expert_groups):
      raise ConfigError("moe.top_k", "exceeds the experts in the moe.top_expert_groups groups a token may use")

  @classmethod
  def unused_options(cls, cfg) -> dict[str, str]:
    unused = super().unused_options(cfg)
    if cfg.num_expert_groups == 1:
      names = ("top_expert_groups", "group_score", "device_balance_loss_weight", "comm_balance_loss_weight")
      unused.update({n: "moe.num_expert_groups is 1: no group limit" for n in names})
    return unused

  @classmethod
  def needs_rng(cls, cfg) -> bool:
    return False

  @classmethod
  def variables(cls, cfg, d_model, init, rngs):
    return {
      **base.RouterFamily.variables(cfg, d_model, init, rngs),
      "bias": ("state", jnp.zeros((cfg.num_experts,), jnp.float32)),
    }

  @classmethod
  def route(cls, router, x, *, capacity, train, rng, token_ids=None):
    cfg = router.cfg
    logits, stats = base.RouterFamily.logits(router, x, train=train, rng=None)
    if cfg.score_function == "sigmoid":
      scores = jax.nn.sigmoid(logits)
      stats["probs"] = scores / jnp.sum(scores, axis=-1, keepdims=True)  # What balance and entropy read.
    else:
      scores = jax.nn.softmax(logits, axis=-1)
      stats["probs"] = scores
    selection = scores + router.bias[...]
    if cfg.num_expert_groups > 1:
      selection = routing.group_limited_scores(
        selection, num_groups=cfg.num_expert_groups, top_groups=cfg.top_expert_groups, group_score=cfg.group_score
      )
    decision = routing.top_k_route(
      scores,
      top_k=cfg.top_k,
      capacity=capacity,
      combine_weights=cfg.combine_weights,
      priority=cfg.priority,
      selection_scores=selection,
    )
    if cfg.routed_scaling_factor != 1.0:
      decision = decision.replace(combine_weight=decision.combine_weight * cfg.routed_scaling_factor)
    stats["selection_counts"] = base.selection_counts(decision)
    return decision, stats

  @classmethod
  def aux(cls, cfg, decision, stats, batch):
    """TopK's losses and metrics, and V2's device- and communication-level balance losses (groups = devices)."""
    aux = super().aux(cfg, decision, stats, batch)
    if cfg.num_expert_groups > 1:
      terms = losses.device_balance_terms(
        stats["probs"], decision.expert_index, cfg.num_expert_groups, cfg.top_expert_groups
      )
      for name, fraction in (("device_balance_loss", terms[0]), ("comm_balance_loss", terms[1])):
        aux[name] = _at_scope(cfg.load_balance_scope, fraction, terms[2], batch)
    return aux

  @classmethod
  def update_state(cls, cfg, router, aux) -> None:
    """b_e <- b_e + γ·sign(mean load − load_e): under-loaded experts become more likely to be chosen."""
    if cfg.bias_update_rate > 0:
      counts = aux["selection_counts"]
      router.bias[...] += cfg.bias_update_rate * jnp.sign(counts.mean() - counts)


def _at_scope(scope: str, fraction, prob, batch):
  """Σ_i f_i·P_i of [G, D] per-group terms: per group then averaged ('group'), or over the local / global batch."""
  if scope == "group":
    return batch.mean(jnp.sum(fraction * prob, axis=-1).mean())
  if scope == "local_batch":
    return batch.mean(jnp.sum(fraction.mean(0) * prob.mean(0)))
  return jnp.sum(batch.mean(fraction.mean(0)) * batch.mean(prob.mean(0)))
