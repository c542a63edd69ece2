"""The router module: holds a router family's parameters and state, and asks the family to route.

The family (`moejax.routers`, selected by `cfg.router`) says which variables exist, what
capacity a group gets and how tokens are routed; this module is only their NNX container, so
that parameters live in the model's state like any other (checkpointed, sharded, optimised).
"""

from __future__ import annotations

import jax
from flax import nnx

from moejax import routers
from moejax.layers.ffn import fan_in_init


class RouterBias(nnx.Variable):
  """Non-trained routing state (DeepSeek's balancing bias): updated by a rule, not by gradients."""


class Router(nnx.Module):
  """Per-device router: [G, S, d] tokens -> (decision, stats) (see `moejax.routers.base` for stats)."""

  def __init__(self, d_model: int, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.family = routers.get(cfg.router)
    for name, (kind, value) in self.family.variables(cfg, d_model, fan_in_init(cfg.init_scale), rngs).items():
      setattr(self, name, nnx.Param(value) if kind == "param" else RouterBias(value))

  def capacity(self, group_size: int, train: bool) -> int:
    """C for a group of S = group_size tokens."""
    return self.family.capacity(self.cfg, group_size, train)

  def __call__(self, x: jax.Array, *, capacity: int, train: bool, rng: jax.Array, token_ids: jax.Array | None = None):
    return self.family.route(self, x, capacity=capacity, train=train, rng=rng, token_ids=token_ids)
