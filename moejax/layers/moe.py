"""The MoE feed-forward layer: router -> dispatcher -> experts -> combine, per device.

Legend: B batch, L sequence length, G groups, S tokens per group, E experts, C capacity,
K choices per token, d model dim, f expert hidden dim.

Routing and dispatch run per device inside `jax.shard_map` over the mesh axes
('data', 'expert'); on one device the mesh is 1×1. Tokens are split into groups of S tokens
(one sequence per group by default) and the groups are split over every device of the mesh
(both axes); capacity is per group, so a device only ever routes its own groups. The expert
weights are split over 'expert': with n devices on that axis each holds E/n experts.

Expert parallelism (n > 1), per device of an 'expert' row of n devices:
  capacity path  route -> dispatch into [E, G, C, d] buffers -> all_to_all over 'expert'
                 ([E, G, C, d] -> [E/n, n·G, C, d]: each device gets its experts' buffers from
                 the n devices) -> local experts -> all_to_all back -> combine. Every router
                 (top-k, expert choice, soft MoE, hash, dense, DeepSeek) ends in such buffers.
  dropless       each choice goes to the device of its expert in a padded buffer of N = T·K
                 rows per destination (the worst case: every choice to one device), so the
                 exchange is a plain all_to_all that runs on CPU too; the receiver runs its
                 experts on the rows that hold a choice (padding rows are skipped, not computed).
Load-balance statistics and metrics are reduced over both axes: they describe the whole batch.
The routing decision (`moejax.routing`) is separate from the data movement (`moejax.dispatch`).
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
from moejax import kernels, routers, routing
from moejax.kernels.varying import _zeros_varying_like
from moejax.layers.ffn import FeedForward, fan_in_init, ffn_apply

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
  expert_exchange: str = "auto"
  permute_backend: str = "auto"
  dropless_impl: str = "auto"
  dropless_block_size: int = 64
  router_noise: str = "none"
  jitter_eps: float = 0.01
  second_expert_policy: str = "all"
  max_experts_per_token: int = 0
  slots_per_expert: int = 1
  soft_normalize: bool = True
  hash_seed: int = 0
  score_function: str = "softmax"
  bias_update_rate: float = 1e-3
  num_expert_groups: int = 1
  top_expert_groups: int = 1
  num_shared_experts: int = 0
  load_balance_density: str = "top1"
  load_balance_scope: str = "group"
  activation: str = "gelu"
  init_scale: float = 1.0


MESH_AXES = ("data", "expert")  # Tokens are split over both axes, experts over 'expert'.


def make_mesh(num_data: int = 1, num_expert: int = 1, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'expert') mesh over the first num_data·num_expert devices.

  Devices are taken in `jax.devices()` order (process by process), so the devices of an
  'expert' row are neighbours: on one host when num_expert ≤ its local devices.
  """
  devices = jax.devices() if devices is None else devices
  n = num_data * num_expert
  grid = np.asarray(devices[:n]).reshape(num_data, num_expert)
  return jax.sharding.Mesh(grid, MESH_AXES)


class MoELayer(nnx.Module):
  """MoE FFN: [B, L, d] -> ([B, L, d], aux), with any router of `moejax.routers`.

  aux (float32, over the whole batch; see `_router_aux` for the full list):
    'load_balance_loss' []: Switch E·Σ f·P (1.0 when balanced), before the coefficient.
    'z_loss' []: router z-loss; 'importance_loss', 'load_loss' []: Shazeer's CV² losses.
    'fraction_dropped' [K]: share of routed choices of each rank that found their expert full.
    'expert_load' [E]: share of the kept assignments each expert processed.
  Dropped choices contribute 0: a token dropped from every choice leaves the layer as 0 (plus
  the shared experts, if any) and passes through the residual connection around it.
  """

  def __init__(self, d_model: int, cfg: MoEConfig, *, mesh: jax.sharding.Mesh | None = None,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.mesh = mesh
    e, f = cfg.num_experts, cfg.d_expert
    self.router = routers.Router(d_model, cfg, rngs=rngs)
    expert_init = fan_in_init(cfg.init_scale, batch_axis=(0,))
    self.wi = nnx.Param(expert_init(rngs.params(), (e, d_model, f)))
    self.wg = nnx.Param(expert_init(rngs.params(), (e, d_model, f))) if cfg.activation == "swiglu" else None
    self.wo = nnx.Param(expert_init(rngs.params(), (e, f, d_model)))
    # Shared experts (DeepSeekMoE): always on, so n of them are one FFN of hidden size n·f.
    self.shared = (FeedForward(d_model, cfg.num_shared_experts * f, cfg.activation, cfg.init_scale, rngs=rngs)
                   if cfg.num_shared_experts else None)
    # When True, an eval-mode forward pass also sows its routing decision (nnx.Intermediate
    # 'routing'): `moejax.analysis.routing_decisions` sets it to ask which tokens each expert takes.
    self.capture_routing = False

  def __call__(self, x: jax.Array, *, train: bool, rng: jax.Array | None = None,
               token_ids: jax.Array | None = None):
    """x: [B, L, d]; rng: key for training noise (required when the router draws any);
    token_ids: <int32>[B, L] for the hash router (else it hashes positions)."""
    b, l, d = x.shape
    group_size = self.cfg.group_size or l
    tokens = x.reshape(-1, group_size, d)  # [G, S, d]
    ids = None if token_ids is None else token_ids.reshape(-1, group_size)
    capacity = self.router.capacity(group_size, train)
    mesh = self.mesh if self.mesh is not None else make_mesh(devices=jax.devices()[:1])
    num_shards = mesh.shape["expert"]
    if self.cfg.num_experts % num_shards:
      raise ValueError(f"num_experts={self.cfg.num_experts} must be divisible by the mesh's "
                       f"{num_shards} 'expert' devices")
    num_devices = mesh.size
    if tokens.shape[0] % num_devices:
      raise ValueError(f"the {tokens.shape[0]} groups of {group_size} tokens must split evenly over the "
                       f"mesh's {num_devices} devices")
    router_def, router_state = nnx.split(self.router)
    weights = (self.wi[...], self.wo[...], None if self.wg is None else self.wg[...])
    if train and _needs_rng(self.cfg) and rng is None:
      raise ValueError(f"router_noise={self.cfg.router_noise!r} / second_expert_policy="
                       f"{self.cfg.second_expert_policy!r} need an rng during training")
    rng = jax.random.key(0) if rng is None else rng
    if self.capture_routing:
      if train:
        raise ValueError("capture_routing records eval-mode decisions: call with train=False")
      # The decision every device takes for its own groups, for all groups at once (routing is
      # per group, so this is the decision the experts below receive).
      decision, _ = self.router(tokens, capacity=capacity, train=False, rng=rng, token_ids=ids)
      self.sow(nnx.Intermediate, "routing", decision)

    def per_device(tokens, ids, router_state, weights, rng):
      # Each device draws its own noise.
      rng = jax.random.fold_in(rng, jax.lax.axis_index(MESH_AXES))
      router = nnx.merge(router_def, router_state)
      return _moe_per_device(tokens, ids, router, weights, rng, cfg=self.cfg, capacity=capacity, train=train,
                             num_shards=num_shards)

    specs = lambda tree, spec: jax.tree.map(lambda _: spec, tree)
    local = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(P(MESH_AXES), P(MESH_AXES), specs(router_state, P()), specs(weights, P("expert")), P()),
        out_specs=(P(MESH_AXES), P()))
    y, aux = local(tokens, ids, router_state, weights, rng)
    y = y.reshape(b, l, d)
    if self.shared is not None:
      y = y + self.shared(x)
    return y, aux

  def update_balance(self, aux: dict[str, jax.Array]) -> None:
    """After a training step: DeepSeek-V3's aux-loss-free bias update from that step's `aux`.

    b_e <- b_e + γ·sign(mean load − load_e): under-loaded experts become more likely to be
    chosen. The bias only chooses experts; it never weights their outputs. No-op for routers
    without a bias. Kept out of the forward pass so that the forward pass stays pure.
    """
    if self.router.bias is not None and self.cfg.bias_update_rate > 0:
      counts = aux["selection_counts"]
      self.router.bias[...] += self.cfg.bias_update_rate * jnp.sign(counts.mean() - counts)


def _needs_rng(cfg: MoEConfig) -> bool:
  return cfg.router_noise != "none" or cfg.second_expert_policy == "random"


def _moe_per_device(tokens, ids, router, weights, rng, *, cfg: MoEConfig, capacity: int, train: bool,
                    num_shards: int = 1):
  """One device's groups: route, move tokens, run the experts, combine; aux over the mesh.

  weights: this device's E/num_shards experts (all E when num_shards is 1).
  """
  wi, wo, wg = weights
  decision, stats = router(tokens, capacity=capacity, train=train, rng=rng, token_ids=ids)
  if cfg.dispatcher == "dropless" and isinstance(decision, routing.RoutingDecision):
    g, s, d = tokens.shape
    k = decision.expert_index.shape[-1]
    output = _dropless_experts(tokens.reshape(g * s, d), decision.expert_index.reshape(g * s, k),
                               decision.combine_weight.reshape(g * s, k), wi, wo, wg, cfg, num_shards)
    output = output.reshape(g, s, d)
  else:
    # Soft MoE mixes every token into every slot: only the dense einsum form applies.
    name = "einsum" if isinstance(decision, routing.SoftRoutingDecision) else cfg.dispatcher
    dispatcher = dispatch_lib.get_dispatcher(name, cfg.permute_backend)
    expert_in = dispatcher.dispatch(decision, tokens)  # [E, G, C, d]
    if num_shards > 1:  # To the devices holding the experts: [E/n, n·G, C, d].
      expert_in = jax.lax.all_to_all(expert_in, "expert", split_axis=0, concat_axis=1, tiled=True)
    expert_out = capacity_expert_ffn(expert_in, wi, wo, wg, cfg.activation)
    if num_shards > 1:  # And back: [E, G, C, d].
      expert_out = jax.lax.all_to_all(expert_out, "expert", split_axis=1, concat_axis=0, tiled=True)
    output = dispatcher.combine(decision, expert_out)  # [G, S, d]
  return output.astype(tokens.dtype), _router_aux(decision, stats, cfg)


def _dropless_experts(tokens, expert_index, combine_weight, wi, wo, wg, cfg: MoEConfig, num_shards: int):
  """<[T, d]> Σ_k weight · expert output, no choice dropped; experts split over 'expert'.

  With n = num_shards > 1 each of the N = T·K choices goes to the device holding its expert,
  with its local expert id; a receiver holds at most n·N rows (every choice of every device),
  and rows that hold no choice carry id E/n, which `dropless_expert_ffn` skips.
    'padded'  N rows per destination, a plain all_to_all (any backend, CPU included): sends
              n·N rows whatever the routing.
    'ragged'  the choices sorted by destination, `jax.lax.ragged_all_to_all` (GPU/TPU; XLA:CPU
              has no lowering): sends exactly N rows.
  """
  from moejax import dropless  # Local: the dropless path is optional.
  kwargs = dict(impl=cfg.dropless_impl, block_size=cfg.dropless_block_size, permute_backend=cfg.permute_backend)
  if num_shards == 1:
    return dropless.dropless_expert_ffn(tokens, expert_index, combine_weight, wi, wo, wg, cfg.activation, **kwargs)
  t, k = expert_index.shape
  n, local_experts = t * k, wi.shape[0]
  flat = expert_index.reshape(-1)
  destination = flat // local_experts
  sent_before = jnp.cumsum(jax.nn.one_hot(destination, num_shards, dtype=jnp.int32), axis=0)
  rank = sent_before[jnp.arange(n), destination] - 1  # among the choices for the same device
  exchange = resolve_exchange(cfg.expert_exchange)
  if exchange == "padded":
    row_map = kernels.RowMap.from_rows((destination * n + rank).reshape(t, k), num_shards * n)
    send = move = lambda x, fill: jax.lax.all_to_all(x, "expert", split_axis=0, concat_axis=0, tiled=True)
  else:
    send_sizes = sent_before[-1]  # [n_shards]
    input_offsets = jnp.cumsum(send_sizes) - send_sizes
    row_map = kernels.RowMap.from_rows((input_offsets[destination] + rank).reshape(t, k), n)
    send, move = _ragged_exchange(send_sizes, input_offsets, n, num_shards * n)
  rows = kernels.permute(tokens, row_map, backend=cfg.permute_backend)
  local_id = jnp.concatenate([flat % local_experts, jnp.full((1,), local_experts, flat.dtype)])
  local_id = local_id[row_map.choice_of_row]  # empty rows: no expert
  rows, local_id = send(rows, 0), send(local_id, local_experts)  # [n_shards·N, ...] on the receiver
  ones = jnp.ones((rows.shape[0], 1), jnp.float32)
  out = dropless.dropless_expert_ffn(rows, local_id[:, None], ones, wi, wo, wg, cfg.activation, **kwargs)
  return kernels.unpermute(move(out, 0), row_map, combine_weight, backend=cfg.permute_backend)


EXCHANGES = ("auto", "padded", "ragged")


def resolve_exchange(exchange: str) -> str:
  """'padded' or 'ragged' for moe.expert_exchange ('auto': ragged on GPU/TPU, padded on CPU)."""
  if exchange not in EXCHANGES:
    raise ValueError(f"expert_exchange must be one of {EXCHANGES}, got {exchange!r}")
  if exchange == "auto":
    return "ragged" if jax.default_backend() in ("gpu", "tpu") else "padded"
  return exchange


# The collective behind 'ragged'; tests swap in an emulation built from all_gather, because
# XLA:CPU cannot run ragged_all_to_all.
_ragged_all_to_all = jax.lax.ragged_all_to_all


def _ragged_exchange(send_sizes, input_offsets, num_rows: int, out_rows: int):
  """(there, back): ragged_all_to_all to the expert devices and back again, for one routing.

  send_sizes, input_offsets: <int32>[n] this device's rows for each device of its 'expert' row,
  contiguous in destination order, num_rows (N) in all. there(x, fill) sends them and returns
  out_rows rows: those from device 0 first, then device 1's, ..., `fill` after. back(y, fill)
  returns the rows that the receivers computed to where they came from ([N, ...]).
  """
  me = jax.lax.axis_index("expert")
  sizes = jax.lax.all_gather(send_sizes, "expert")  # [n, n]: sizes[i, j] rows from i to j
  # Where i's rows for j land on j: after the rows that devices before i send to j.
  landing = jnp.cumsum(sizes, axis=0) - sizes  # [n, n]
  # Where j's rows from i start on i (i's input_offsets).
  starts = jnp.cumsum(sizes, axis=1) - sizes  # [n, n]
  recv_sizes = sizes[:, me]
  recv_offsets = landing[:, me]

  def there(x, fill):
    output = _zeros_varying_like((out_rows, *x.shape[1:]), x.dtype, x) + fill  # varies as x does
    return _ragged_all_to_all(x, output, input_offsets, send_sizes, landing[me], recv_sizes, axis_name="expert")

  def back(y, fill):
    output = _zeros_varying_like((num_rows, *y.shape[1:]), y.dtype, y) + fill
    return _ragged_all_to_all(y, output, recv_offsets, recv_sizes, starts[:, me], send_sizes, axis_name="expert")

  return there, back


def capacity_expert_ffn(expert_in, wi, wo, wg, activation: str) -> jax.Array:
  """Each expert's FFN on its capacity buffers: [E, G, C, d] -> [E, G, C, d].

  Run as one [G·C, d] matrix per expert: XLA:CPU runs that 3-D batched matmul (and its weight
  gradient) much faster than the 4-D "egcd,edf" form (experiments/moe_layer_benchmark.py).
  """
  e, g, c, d = expert_in.shape
  out = ffn_apply(expert_in.reshape(e, g * c, d), wi, wo, wg, activation, "ecd,edf->ecf", "ecf,efd->ecd")
  return out.reshape(e, g, c, d)


def _router_aux(decision, stats, cfg: MoEConfig) -> dict[str, jax.Array]:
  """Losses and metrics of one device's routing, reduced over every device of the mesh.

  Every device holds the same number of groups, so the mean of device means is the batch mean.
  """
  e = cfg.num_experts
  zero = jnp.zeros((), jnp.float32)
  aux, per_device = {}, {}
  probs = stats["probs"]
  token_choice = cfg.router in ("top_k", "deepseek")
  if token_choice:
    fraction, mean_prob = losses.load_balance_terms(probs, decision.expert_index, cfg.load_balance_density)
    if cfg.load_balance_scope == "group":
      per_device["load_balance_loss"] = losses.switch_balance(fraction, mean_prob)
    elif cfg.load_balance_scope == "local_batch":
      per_device["load_balance_loss"] = losses.switch_balance(fraction.mean(0), mean_prob.mean(0))
    else:  # 'global_batch': f and P over every device's tokens first (Qwen).
      aux["load_balance_loss"] = losses.switch_balance(
          jax.lax.pmean(fraction.mean(0), MESH_AXES), jax.lax.pmean(mean_prob.mean(0), MESH_AXES))
  else:
    per_device["load_balance_loss"] = zero
  per_device["z_loss"] = zero if stats["logits"] is None else losses.router_z_loss(stats["logits"])
  # Shazeer's losses are CV² over the whole batch: sum the per-expert totals across devices first.
  aux["importance_loss"] = zero if probs is None else losses.cv_squared(
      jax.lax.psum(probs.reshape(-1, e).sum(axis=0), MESH_AXES))
  if stats.get("noise_std") is not None:
    load = losses.smooth_load(stats["clean_logits"], stats["logits"], stats["noise_std"], cfg.top_k)
    aux["load_loss"] = losses.cv_squared(jax.lax.psum(load, MESH_AXES))
  else:
    aux["load_loss"] = zero

  if isinstance(decision, routing.SoftRoutingDecision):
    # 1 = each slot takes one token (sparse-like); 1/S = uniform mixing.
    per_device["soft_dispatch_max_weight"] = decision.dispatch_weights.max(axis=1).mean()
    per_device["soft_combine_max_weight"] = decision.combine_weights.reshape(
        *decision.combine_weights.shape[:2], -1).max(axis=-1).mean()
    kept_per_expert = decision.dispatch_weights.sum(axis=(0, 1, 3))
  else:
    kept = decision.kept.astype(jnp.float32)
    if token_choice or cfg.router == "hash":  # ('dense' never drops.)
      routed = decision.routed.astype(jnp.float32)
      # Dropped for capacity, among the choices that asked for a slot (per choice rank).
      per_device["fraction_dropped"] = 1.0 - kept.sum(axis=(0, 1)) / jnp.maximum(routed.sum(axis=(0, 1)), 1.0)
      if cfg.second_expert_policy == "random":
        per_device["second_expert_skipped"] = 1.0 - routed[..., 1].mean()
    experts_per_token = kept.sum(axis=-1)
    for n in (1, 2, 3):
      per_device[f"tokens_with_ge{n}_experts"] = (experts_per_token >= n).mean()
    kept_per_expert = jnp.einsum("gsk,gske->e", kept, jax.nn.one_hot(decision.expert_index, e))
  if probs is not None:
    p = probs.astype(jnp.float32)
    per_device["router_entropy"] = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-12)), axis=-1).mean()
    per_device["top1_confidence"] = p.max(axis=-1).mean()
  aux.update(jax.lax.pmean(per_device, MESH_AXES))
  kept_per_expert = jax.lax.psum(kept_per_expert, MESH_AXES)
  aux["expert_load"] = kept_per_expert / jnp.maximum(kept_per_expert.sum(), 1e-9)
  aux["selection_counts"] = jax.lax.psum(stats["selection_counts"], MESH_AXES)
  return aux
