"""The MoE feed-forward layer: route -> dispatch -> experts -> combine, per device.

Legend: B batch, L sequence length, G groups, S tokens per group, E experts, C capacity,
K choices per token, d model dim, f expert hidden dim.

Tokens are split into groups of S tokens (one sequence per group by default); the groups are
split over the 'data' and 'expert' devices of the mesh (`moejax.parallel`) and each device routes its own groups
inside `jax.shard_map` (`moejax.parallel.per_device`). The router family (`moejax.routers`)
decides, a dispatcher (`moejax.dispatch`) moves the tokens, the experts compute — on the device
that holds them, with `moejax.parallel`'s exchange around them when experts are split over
'expert' — and the dispatcher combines. With tensor parallelism ('model' > 1) each device of a
'model' row computes a slice of the experts' hidden dimension and the combined outputs are summed
over 'model'. Losses and metrics describe the whole batch.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from moejax import dispatch, dropless, parallel
from moejax.config import schema
from moejax.layers.ffn import GATED, FeedForward, fan_in_init, ffn_apply
from moejax.layers.router import Router


def _layer_fields() -> dict:
  """{field: default}: every `moe.*` field, plus the `model.*` fields a layer reads, resolved."""
  model = schema.defaults("lm", "model")
  return {
    **schema.defaults("lm", "moe"),
    "d_expert": model["d_ff"],
    "activation": model["activation"],
    "init_scale": model["init_scale"],
    "remat": model["remat"],
    # mesh.rules.expert_mlp: the mesh axis ('model' or '') the experts' hidden dimension is split over.
    "expert_mlp_axis": schema.defaults("lm", "mesh")["rules"]["expert_mlp"],
  }


# The logical axes of the expert weights (`moejax.parallel`): E over 'expert', the hidden f over
# what mesh.rules gives 'expert_mlp' (tensor parallelism).
EXPERT_AXES = {
  "wi": ("expert", None, "expert_mlp"),
  "wg": ("expert", None, "expert_mlp"),
  "wo": ("expert", "expert_mlp", None),
  "bi": ("expert", "expert_mlp"),
  "bg": ("expert", "expert_mlp"),
  "bo": ("expert", None),
}
EXPERT_WEIGHTS = ("wi", "wo", "wg", "bi", "bg", "bo")  # The order _experts takes them in.

# Names of the values `moejax.models.remat`'s 'moe' policy keeps (jax.ad_checkpoint.checkpoint_name):
# the experts' outputs before the weighted combine, and what each exchange over 'expert' delivers.
EXPERT_OUTPUT, EXCHANGED = dropless.EXPERT_OUTPUT, parallel.EXCHANGED

MoEConfig = dataclasses.make_dataclass(
  "MoEConfig",
  [(name, type(default), dataclasses.field(default=default)) for name, default in _layer_fields().items()],
  frozen=True,
  namespace={
    "__module__": __name__,
    "__doc__": """Static settings of one MoE layer.

    Its fields are the config's `moe.*` fields (defaults and meanings: moejax/config/schema.py and
    each router family's options in moejax/routers/), with d_expert resolved (the config's 0 means
    model.d_ff), the layer's `activation`, `init_scale` and `remat` from `model.*`, and
    `expert_mlp_axis` from `mesh.rules.expert_mlp`. Built from a config by
    `moejax.models.build.moe_config`; a router family registered after this module was imported
    has no fields here (import it first).
    """,
  },
)


class MoELayer(nnx.Module):
  """MoE FFN: [B, L, d] -> ([B, L, d], aux), with any router family of `moejax.routers`.

  aux (float32, over the whole batch):
    'load_balance_loss' []: Switch E·Σ f·P (1.0 when balanced), before the coefficient.
    'z_loss' []: router z-loss; 'importance_loss', 'load_loss' []: Shazeer's CV² losses.
    'fraction_dropped' [K]: share of routed choices of each rank that found their expert full.
    'expert_load' [E]: share of the kept assignments each expert processed.
    'selection_counts' [E]: choices per expert before capacity (DeepSeek's bias update).
    'balance_fraction', 'balance_prob' [E]: with moe.load_balance_pooling 'all_layers', the
      layer's f and P, which the task pools over layers before the product (transformers).
    and the family's scalar metrics: router entropy, experts per token and its min/max,
    min/max selected gate (token choice); Soft MoE's extreme dispatch/combine weights and,
    with moe.soft_similarity_metrics, their cosine similarities (vmoe's metrics).
  Dropped choices contribute 0: a token dropped from every choice leaves the layer as 0 (plus
  the shared experts, if any) and passes through the residual connection around it.
  """

  def __init__(self, d_model: int, cfg, *, mesh: jax.sharding.Mesh | None = None, rngs: nnx.Rngs):
    self.cfg = cfg
    self.mesh = mesh
    e, f = cfg.num_experts, cfg.d_expert
    self.router = Router(d_model, cfg, rngs=rngs)
    expert_init = fan_in_init(cfg.init_scale, batch_axis=(0,))
    # [E, d, f] and [E, f, d]: split over 'expert' on E and, with tensor parallelism, on f.
    self.wi = parallel.expert_param(expert_init(rngs.params(), (e, d_model, f)), *EXPERT_AXES["wi"][1:])
    self.wg = (
      parallel.expert_param(expert_init(rngs.params(), (e, d_model, f)), *EXPERT_AXES["wg"][1:])
      if cfg.activation in GATED
      else None
    )
    self.wo = parallel.expert_param(expert_init(rngs.params(), (e, f, d_model)), *EXPERT_AXES["wo"][1:])
    # Expert biases (gpt-oss): zero-initialised, split like the experts' matrices.
    zeros = lambda name, *shape: parallel.expert_param(jnp.zeros(shape, jnp.float32), *EXPERT_AXES[name][1:])
    self.bi = zeros("bi", e, f) if cfg.expert_bias else None
    self.bg = zeros("bg", e, f) if cfg.expert_bias and self.wg is not None else None
    self.bo = zeros("bo", e, d_model) if cfg.expert_bias else None
    # Shared experts (DeepSeekMoE): always on, so n of them are one FFN of hidden size n·f.
    self.shared = (
      FeedForward(d_model, cfg.num_shared_experts * f, cfg.activation, cfg.init_scale, rngs=rngs)
      if cfg.num_shared_experts
      else None
    )
    # Qwen2-MoE's shared-expert gate: the shared output × sigmoid(x·w), a [d, 1] kernel.
    self.shared_gate = (
      nnx.Param(fan_in_init(cfg.init_scale)(rngs.params(), (d_model, 1)))
      if self.shared is not None and cfg.shared_expert_gate == "sigmoid"
      else None
    )
    # When True, an eval-mode forward pass also sows its routing decision (nnx.Intermediate
    # 'routing'): `moejax.analysis.routing_decisions` sets it to ask which tokens each expert takes.
    self.capture_routing = False

  def __call__(self, x: jax.Array, *, train: bool, rng: jax.Array | None = None, token_ids: jax.Array | None = None):
    """x: [B, L, d]; rng: key for training noise (required when the router draws any);
    token_ids: <int32>[B, L] for the hash router (else it hashes positions)."""
    cfg = self.cfg
    b, l, d = x.shape
    group_size = cfg.group_size or l
    tokens = x.reshape(-1, group_size, d)  # [G, S, d]
    ids = None if token_ids is None else token_ids.reshape(-1, group_size)
    capacity = self.router.capacity(group_size, train)
    mesh = self.mesh if self.mesh is not None else parallel.single_device_mesh()
    num_shards, batch_devices = mesh.shape["expert"], parallel.batch_devices(mesh)
    if cfg.num_experts % num_shards:
      raise ValueError(f"num_experts={cfg.num_experts} must be divisible by the mesh's {num_shards} 'expert' devices")
    if tokens.shape[0] % batch_devices:
      raise ValueError(
        f"the {tokens.shape[0]} groups of {group_size} tokens must split evenly over the mesh's "
        f"{batch_devices} data × expert devices"
      )
    weights = tuple(None if getattr(self, name) is None else getattr(self, name)[...] for name in EXPERT_WEIGHTS)
    rules = {"expert_mlp": cfg.expert_mlp_axis}
    specs = tuple(
      None if w is None else parallel.mesh_spec(EXPERT_AXES[name], w.shape, mesh, rules)
      for name, w in zip(EXPERT_WEIGHTS, weights)
    )
    # Tensor parallelism: each 'model' device holds a slice of f, so its experts' outputs are partial sums.
    split_hidden = any(s is not None and "model" in s for s in specs)
    if train and self.router.family.needs_rng(cfg) and rng is None:
      raise ValueError(
        f"router {cfg.router!r} draws random numbers in training (router_noise / second_expert_policy): pass an rng"
      )
    rng = jax.random.key(0) if rng is None else rng
    router_def, router_state = nnx.split(self.router)
    if self.capture_routing:
      if train:
        raise ValueError("capture_routing records eval-mode decisions: call with train=False")
      # The decision every device takes for its own groups, for all groups at once (routing is
      # per group, so this is the decision the experts below receive).
      decision, _ = self.router(tokens, capacity=capacity, train=False, rng=rng, token_ids=ids)
      self.sow(nnx.Intermediate, "routing", decision)
    dispatcher = dispatch.get_dispatcher(self.router.family.dispatcher(cfg), cfg.permute_backend)

    def route_and_compute(tokens, ids, router_state, rng, weights):
      # Each device of the batch draws its own noise; a 'model' row draws the same.
      rng = jax.random.fold_in(rng, jax.lax.axis_index(parallel.BATCH_AXES))
      router = nnx.merge(router_def, router_state)
      # What router and experts both read: the tokens, or (transformers' Mixtral jitter) a perturbation of them.
      tokens = router.family.layer_inputs(cfg, tokens, train=train, rng=jax.random.fold_in(rng, 1))
      # Named scopes: what a profile (train.profile_steps) shows of the layer, by part.
      with jax.named_scope("router"):
        decision, stats = router(tokens, capacity=capacity, train=train, rng=rng, token_ids=ids)
      with jax.named_scope("dispatch"):
        expert_in = dispatcher.dispatch(decision, tokens)
      if split_hidden:  # The output bias joins one slice's partial sum only.
        bo = weights[-1]
        weights = (*weights[:-1], None if bo is None else bo * (jax.lax.axis_index("model") == 0))
      expert_out = _experts(expert_in, weights, cfg, num_shards)
      with jax.named_scope("combine"):
        output = dispatcher.combine(decision, expert_out)  # [G, S, d]
      if split_hidden:
        with jax.named_scope("all_reduce"):
          output = jax.lax.psum(output, "model")  # The slices of f summed: combine is linear in the expert outputs.
      with jax.named_scope("router"):
        aux = router.family.aux(cfg, decision, stats, parallel.BATCH)
      return output.astype(tokens.dtype), aux

    if cfg.remat == "moe" and train:  # Inside shard_map, where the names are seen (moejax.models.remat).
      route_and_compute = jax.checkpoint(
        route_and_compute, policy=jax.checkpoint_policies.save_only_these_names(EXPERT_OUTPUT, EXCHANGED)
      )
    y, aux = parallel.per_device(
      route_and_compute,
      mesh,
      sharded=(tokens, ids),
      replicated=(router_state, rng),
      experts=(weights,),
      expert_specs=(specs,),
    )
    y = y.reshape(b, l, d)
    if self.shared is not None:
      shared = self.shared(x)
      if self.shared_gate is not None:
        flat = x.reshape(b * l, d)
        gate = jax.nn.sigmoid(flat @ self.shared_gate[...].astype(x.dtype)).reshape(b, l, 1)  # [B, L, 1]
        shared = gate * shared
      y = y + shared
    return y, aux

  def update_balance(self, aux: dict[str, jax.Array]) -> None:
    """After a training step: the router family's rule-based state update (DeepSeek's bias) from `aux`.

    Kept out of the forward pass so that the forward pass stays pure.
    """
    self.router.family.update_state(self.cfg, self.router, aux)


def _experts(expert_in, weights, cfg, num_shards: int):
  """This device's share of the experts on what the dispatcher sent, exchanged over 'expert' if split.

  weights: this device's E/num_shards experts (all E when num_shards is 1).
  """
  wi, wo, wg, *biases = weights
  biases = None if biases[0] is None else tuple(biases)  # (bi, bg, bo) with moe.expert_bias.
  options = dict(
    impl=cfg.dropless_impl, block_size=cfg.dropless_block_size, permute_backend=cfg.permute_backend, biases=biases
  )
  experts, exchange = jax.named_scope("experts"), jax.named_scope("all_to_all")  # Profile scopes.
  if isinstance(expert_in, dispatch.Rows):
    if num_shards == 1:
      with experts:
        return dropless.dropless_expert_ffn(
          expert_in.tokens, expert_in.expert_index, expert_in.combine_weight, wi, wo, wg, cfg.activation, **options
        )
    rows_exchange = parallel.RowExchange(
      expert_in.expert_index, cfg.num_experts, num_shards, cfg.expert_exchange, cfg.permute_backend
    )
    with exchange:
      rows, local_id = rows_exchange.there(expert_in.tokens)  # [n·N, d] on the receiver (named EXCHANGED)
    with experts:
      ones = jnp.ones((rows.shape[0], 1), jnp.float32)
      out = dropless.dropless_expert_ffn(rows, local_id[:, None], ones, wi, wo, wg, cfg.activation, **options)
    with exchange:
      return rows_exchange.back(out, expert_in.combine_weight)
  if num_shards > 1:
    with exchange:
      expert_in = checkpoint_name(parallel.to_expert_devices(expert_in), EXCHANGED)  # [E/n, n·G, C, d]
  with experts:
    expert_out = checkpoint_name(capacity_expert_ffn(expert_in, wi, wo, wg, cfg.activation, biases), EXPERT_OUTPUT)
  if num_shards == 1:
    return expert_out
  with exchange:
    return checkpoint_name(parallel.from_expert_devices(expert_out), EXCHANGED)


def capacity_expert_ffn(expert_in, wi, wo, wg, activation: str, biases: tuple | None = None) -> jax.Array:
  """Each expert's FFN on its capacity buffers: [E, G, C, d] -> [E, G, C, d].

  Run as one [G·C, d] matrix per expert: XLA:CPU runs that 3-D batched matmul (and its weight
  gradient) much faster than the 4-D "egcd,edf" form (experiments/moe_layer_benchmark.py).
  biases: (bi [E, f], bg [E, f] or None, bo [E, d]), or None. An empty slot is a zero row whose
  output (its biases through the FFN) the combine weighs by 0.
  """
  e, g, c, d = expert_in.shape
  if biases is not None:
    biases = tuple(None if v is None else v[:, None, :] for v in biases)  # [E, 1, f] against [E, G·C, f]
  out = ffn_apply(expert_in.reshape(e, g * c, d), wi, wo, wg, activation, "ecd,edf->ecf", "ecf,efd->ecd", biases)
  return out.reshape(e, g, c, d)
