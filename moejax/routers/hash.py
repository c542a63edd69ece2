"""Hash routing (Roller et al. 2021): expert = a fixed hash of the token id; nothing is learned.

In the LM the ids are the input tokens; in the ViT (no ids) the token positions, so patch i
always goes to the same expert. Capacity and slot priority apply as for top-1.
"""

from __future__ import annotations

from moejax.errors import ConfigError
from moejax.lazy import jax, jnp
from moejax.routers import base
from moejax.routers.base import Option, RouterFamily, routing
from moejax.routers.registry import register
from moejax.routers.top_k import token_choice_is_causal

HASH_SEED = Option("hash_seed", 0, "Seed of the hash routing (token id -> expert).")


@register
class Hash(RouterFamily):
  """One expert per token, by hash; the combine weight is 1."""

  name = "hash"
  options = (base.TOP_K, base.PRIORITY, *base.CAPACITY, HASH_SEED)

  @classmethod
  def validate(cls, moe) -> None:
    super().validate(moe)
    if moe.top_k != 1:
      raise ConfigError("moe.top_k", f"the hash router sends each token to 1 expert; set moe.top_k=1 (got {moe.top_k})")
    if moe.priority == "bpr":
      raise ConfigError(
        "moe.priority", "'bpr' orders tokens by router probability, which the hash router does not have"
      )

  @classmethod
  def is_causal(cls, cfg) -> bool:
    return token_choice_is_causal(cfg, 1)

  @classmethod
  def variables(cls, cfg, d_model, init, rngs):
    return {}

  @classmethod
  def route(cls, router, x, *, capacity, train, rng, token_ids=None):
    cfg = router.cfg
    ids = token_ids if token_ids is not None else jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    experts = routing.hash_experts(ids, cfg.num_experts, cfg.hash_seed)[..., None]  # [G, S, 1]
    decision = routing.route_choices(
      experts,
      jnp.ones(experts.shape, jnp.float32),
      num_experts=cfg.num_experts,
      capacity=capacity,
      priority=cfg.priority,
    )
    probs = jax.nn.one_hot(experts[..., 0], cfg.num_experts)
    # One-hot "probabilities": entropy 0, confidence 1, and the expert shares the importance loss would read.
    return decision, {"logits": None, "probs": probs, "selection_counts": probs.sum(axis=(0, 1))}

  @classmethod
  def aux(cls, cfg, decision, stats, batch):
    aux = super().aux(cfg, decision, stats, batch)
    aux["fraction_dropped"] = base.fraction_dropped(decision, batch)
    return aux
