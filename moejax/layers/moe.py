"""The MoE feed-forward layer: router -> dispatcher -> experts -> combine, per device.

Legend: B batch, L sequence length, G groups, S tokens per group, E experts, C capacity,
K choices per token, d model dim, f expert hidden dim.

Routing and dispatch run per device inside `jax.shard_map` over the mesh axes
('data', 'expert'); on one device the mesh is 1×1. Tokens are split into groups of S tokens
(one sequence per group by default) and capacity is per group, so a device only ever routes
its own groups. The routing decision (`moejax.routing`) is separate from the data movement
(`moejax.dispatch`): other routers and expert parallelism plug in at those two seams.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from moejax import dispatch as dispatch_lib
from moejax import losses
from moejax import routing
from moejax.layers.ffn import fan_in_init, ffn_apply

ROUTERS = ("top_k",)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Static settings of one MoE layer (field meanings as in `moejax.config`)."""

  num_experts: int = 8
  top_k: int = 2
  d_expert: int = 512
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  group_size: int = 0  # 0: one sequence per group.
  router: str = "top_k"
  combine_weights: str = "raw"
  priority: str = "token_major"
  dispatcher: str = "sort"
  load_balance_density: str = "top1"
  activation: str = "gelu"
  init_scale: float = 1.0


def make_mesh(num_data: int = 1, num_expert: int = 1, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'expert') mesh over the first num_data·num_expert devices."""
  devices = jax.devices() if devices is None else devices
  n = num_data * num_expert
  grid = np.asarray(devices[:n]).reshape(num_data, num_expert)
  return jax.sharding.Mesh(grid, ("data", "expert"))


class MoELayer(nnx.Module):
  """Token-choice MoE FFN: [B, L, d] -> ([B, L, d], aux).

  aux (all float32, averaged over the groups of the whole batch):
    'load_balance_loss' []: Switch E·Σ f·P (1.0 when balanced), before the coefficient.
    'z_loss' []: router z-loss, before the coefficient.
    'fraction_dropped' [K]: share of choices of each rank that found their expert full.
    'expert_load' [E]: share of the kept assignments each expert processed.
  Dropped choices contribute 0: a token dropped from every choice leaves the layer as 0 and
  passes through the residual connection around it.
  """

  def __init__(self, d_model: int, cfg: MoEConfig, *, mesh: jax.sharding.Mesh | None = None,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.mesh = mesh
    e, f = cfg.num_experts, cfg.d_expert
    self.router_kernel = nnx.Param(fan_in_init(cfg.init_scale)(rngs.params(), (d_model, e)))
    expert_init = fan_in_init(cfg.init_scale, batch_axis=(0,))
    self.wi = nnx.Param(expert_init(rngs.params(), (e, d_model, f)))
    self.wg = nnx.Param(expert_init(rngs.params(), (e, d_model, f))) if cfg.activation == "swiglu" else None
    self.wo = nnx.Param(expert_init(rngs.params(), (e, f, d_model)))

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    b, l, d = x.shape
    group_size = self.cfg.group_size or l
    tokens = x.reshape(-1, group_size, d)  # [G, S, d]
    capacity_factor = self.cfg.capacity_factor if train else self.cfg.eval_capacity_factor
    capacity = routing.compute_capacity(group_size, self.cfg.num_experts, self.cfg.top_k, capacity_factor)
    mesh = self.mesh if self.mesh is not None else make_mesh(devices=jax.devices()[:1])
    wg = self.wg[...] if self.wg is not None else jnp.zeros((), x.dtype)
    local = jax.shard_map(
        lambda *args: _moe_per_device(*args, cfg=self.cfg, capacity=capacity),
        mesh=mesh,
        in_specs=(P("data"), P(), P(), P(), P()),
        out_specs=(P("data"), P()),
    )
    y, aux = local(tokens, self.router_kernel[...], self.wi[...], wg, self.wo[...])
    return y.reshape(b, l, d), aux


def _moe_per_device(tokens, router_kernel, wi, wg, wo, *, cfg: MoEConfig, capacity: int):
  """One device's groups: route, dispatch, run the experts, combine; aux averaged over 'data'."""
  logits = jnp.einsum("gsd,de->gse", tokens.astype(jnp.float32), router_kernel.astype(jnp.float32))
  probs = jax.nn.softmax(logits, axis=-1)  # [G, S, E], router kept in float32
  decision = routing.top_k_route(
      probs, top_k=cfg.top_k, capacity=capacity,
      combine_weights=cfg.combine_weights, priority=cfg.priority)
  dispatcher = dispatch_lib.get_dispatcher(cfg.dispatcher)
  expert_in = dispatcher.dispatch(decision, tokens)  # [E, G, C, d]
  expert_out = ffn_apply(expert_in, wi, wo, wg if cfg.activation == "swiglu" else None,
                         cfg.activation, "egcd,edf->egcf", "egcf,efd->egcd")
  output = dispatcher.combine(decision, expert_out).astype(tokens.dtype)  # [G, S, d]

  kept = decision.kept.astype(jnp.float32)
  kept_per_expert = jnp.einsum("gsk,gske->e", kept, jax.nn.one_hot(decision.expert_index, cfg.num_experts))
  kept_per_expert = jax.lax.psum(kept_per_expert, "data")
  aux = {
      "load_balance_loss": losses.load_balance_loss(probs, decision.expert_index, cfg.load_balance_density),
      "z_loss": losses.router_z_loss(logits),
      "fraction_dropped": 1.0 - kept.mean(axis=(0, 1)),
  }
  # Every device holds the same number of groups, so the mean of device means is the batch mean.
  aux = jax.lax.pmean(aux, "data")
  aux["expert_load"] = kept_per_expert / jnp.maximum(kept_per_expert.sum(), 1.0)
  return output, aux
