"""A new router family in one file: defined, registered, and given a config that trains it.

  python -m moejax.main --config tests/toy_router.py --workdir workdirs/toy
(tests/test_config.py does, and README "Adding a router" shows this file.)
"""

import jax

from moejax import routing
from moejax.config import common
from moejax.routers import Option, RouterFamily, base, register

TEMPERATURE = Option("temperature", 1.0, "Softmax temperature of the tempered top-1 router.", minimum=0, exclusive=True)


@register
class TemperedTop1(RouterFamily):
  """Top-1 of softmax(logits / temperature): a sharper or flatter Switch router."""

  name = "tempered_top1"
  options = (
    base.CAPACITY_FACTOR,
    base.EVAL_CAPACITY_FACTOR,
    base.DISPATCHER,
    base.Z_LOSS_WEIGHT,
    base.LOAD_BALANCE_LOSS_WEIGHT,
    TEMPERATURE,
  )

  @classmethod
  def route(cls, router, x, *, capacity, train, rng, token_ids=None):
    logits, stats = cls.logits(router, x, train=train, rng=None)
    probs = jax.nn.softmax(logits / router.cfg.temperature, axis=-1)
    decision = routing.top_k_route(probs, top_k=1, capacity=capacity, priority="token_major")
    return decision, {**stats, "probs": probs, "selection_counts": base.selection_counts(decision)}

  @classmethod
  def aux(cls, cfg, decision, stats, batch):
    aux = super().aux(cfg, decision, stats, batch)
    aux["load_balance_loss"] = batch.mean(base.losses.load_balance_loss(stats["probs"], decision.expert_index))
    return aux


def get_config():
  config = common.small_lm()
  config.moe.router = "tempered_top1"
  config.moe.temperature = 0.5
  return config
