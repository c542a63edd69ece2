"""Parallelism beside the layers: the mesh, parameter shardings, and the expert-parallel exchanges.

Legend: E experts, n devices on the 'expert' axis, G groups, C capacity, d model dim, T tokens,
K choices per token, N = T·K choices of one device.

The devices form a ('data', 'expert', 'model') mesh. Batches, and the MoE layers' token groups,
are split over 'data' and 'expert' (`BATCH_AXES`); the devices of one 'model' row see the same
tokens. Expert weights are split over 'expert' (E/n experts per device); with FSDP other weights
are also split over 'data'.

Tensor parallelism ('model' > 1, Megatron's layout): the layers name the dimensions of their
weights with logical axes (`LOGICAL_AXES`: attention heads, key/value heads, the dense FFN's and
the experts' hidden dimension, the vocabulary), and the config's `mesh.rules` maps each to
'model' or to nothing (replicated). `state_sharding` reads the names through
`nnx.get_partition_spec` (for the optimizer moments too) and applies the rules; a dimension the
'model' axis does not divide stays whole (e.g. 2 key/value heads on 4 devices). Attention and
dense FFNs then run under jit's sharding propagation; the MoE layer's experts run inside its
shard_map, each 'model' device computing its slice of the hidden dimension f for every expert it
holds, and the slices' partial outputs are summed over 'model' after the combine (which is
linear in them), so the exchange over 'expert' is unchanged.

Inside the MoE layer (per device, in `jax.shard_map`), tokens reach the device holding their
expert in one of two ways:
  capacity buffers  [E, G, C, d] -> all_to_all over 'expert' -> [E/n, n·G, C, d] on the expert's
                    device, and back (`to_expert_devices`, `from_expert_devices`). Every router's
                    capacity path ends in such buffers.
  dropless rows     each choice goes to its expert's device (`RowExchange`): 'padded' sends N rows
                    per destination, a plain all_to_all that runs on CPU too; 'ragged' sends
                    exactly the routed rows with `jax.lax.ragged_all_to_all` (GPU/TPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import kernels
from moejax.kernels.varying import _zeros_varying_like
from moejax.routers.base import BatchReduce

# The name (jax.ad_checkpoint.checkpoint_name) of what an exchange over 'expert' delivers: what
# model.remat 'moe' keeps, so that no all_to_all is redone in the backward pass.
EXCHANGED = "moe_all_to_all"
MESH_AXES = ("data", "expert", "model")
BATCH_AXES = ("data", "expert")  # Tokens are split over these; a 'model' row shares its tokens.
EXCHANGES = ("auto", "padded", "ragged")
BATCH = BatchReduce(BATCH_AXES)  # Means and sums over the batch (every token once), for per-device code.
# The logical axes layers name their weights' dimensions with, besides 'expert' (always split over
# 'expert'); mesh.rules maps each to 'model' or '' (replicated). Defaults: everything over 'model'.
LOGICAL_AXES = ("heads", "kv_heads", "mlp", "expert_mlp", "vocab")
DEFAULT_RULES = {name: "model" for name in LOGICAL_AXES}


def make_mesh(num_data: int = 1, num_expert: int = 1, num_model: int = 1, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'expert', 'model') mesh over the first num_data·num_expert·num_model devices.

  Devices are taken in `jax.devices()` order (process by process) with 'model' the fastest
  axis, then 'expert': the devices of a 'model' row are neighbours (tensor parallelism talks
  most, in every layer), then those of an 'expert' row; on one host when they fit on it.
  """
  devices = jax.devices() if devices is None else devices
  n = num_data * num_expert * num_model
  grid = np.asarray(devices[:n]).reshape(num_data, num_expert, num_model)
  return jax.sharding.Mesh(grid, MESH_AXES)


def batch_devices(mesh: jax.sharding.Mesh) -> int:
  """How many ways the batch is split: the devices on 'data' × 'expert'."""
  return mesh.shape["data"] * mesh.shape["expert"]


def single_device_mesh() -> jax.sharding.Mesh:
  return make_mesh(devices=jax.devices()[:1])


def param(value: jax.Array, *axes: str | None) -> nnx.Param:
  """A weight whose dimensions are named by logical axes (`LOGICAL_AXES`, 'expert' or None), one per dimension."""
  if len(axes) != value.ndim:
    raise ValueError(f"{len(axes)} axis names {axes} for a weight of shape {value.shape}")
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def expert_param(value: jax.Array, *axes: str | None) -> nnx.Param:
  """An [E, ...] expert weight, split over 'expert' on E; axes: the logical names of the other dimensions."""
  return param(value, "expert", *(axes or (None,) * (value.ndim - 1)))


def mesh_spec(logical: tuple, shape: tuple[int, ...], mesh: jax.sharding.Mesh, rules: dict | None = None) -> P:
  """The PartitionSpec of an array of `shape` whose dimensions have the logical names `logical`.

  'expert' maps to 'expert', a name of `LOGICAL_AXES` through rules (default `DEFAULT_RULES`; ''
  or None: replicated), None stays None. A dimension the mesh axis does not divide stays whole,
  and an axis of one device is left out (the same layout, without a trivial axis in the spec).
  """
  rules = DEFAULT_RULES if rules is None else rules
  axes = []
  for name, size in zip(logical, shape):
    axis = "expert" if name == "expert" else (rules.get(name) or None) if name is not None else None
    axes.append(axis if axis is not None and mesh.shape[axis] > 1 and size % mesh.shape[axis] == 0 else None)
  return P(*axes)


def undivided(mesh: jax.sharding.Mesh, params, rules: dict | None = None) -> list[str]:
  """'name: size' of each logical axis of `params` (an nnx State of Params) that rules map to a mesh
  axis of several devices which does not divide it, so it stays whole (`mesh_spec`); sorted, one per pair."""
  rules = DEFAULT_RULES if rules is None else rules
  found = set()
  for _, variable in nnx.to_flat_state(params):
    names = variable.get_metadata().get("out_sharding") or ()
    for name, size in zip(names, variable.get_value().shape):
      axis = "expert" if name == "expert" else rules.get(name) if name else None
      if axis and mesh.shape[axis] > 1 and size % mesh.shape[axis]:
        found.add(f"{name}: {size} on {mesh.shape[axis]} '{axis}' devices")
  return sorted(found)


def state_sharding(mesh: jax.sharding.Mesh, state, *, fsdp: bool = False, rules: dict | None = None):
  """NamedShardings for a train state (params, optimizer state, ...) on a ('data', 'expert', 'model') mesh.

  Each array takes the partition spec of its variable's `out_sharding` metadata, logical axis
  names mapped by `mesh_spec` with rules (expert weights: 'expert' on E; with tensor
  parallelism heads and hidden dimensions over 'model'; optimizer moments inherit their
  parameter's), unannotated arrays are replicated. With fsdp, each array is also split over
  'data' on its largest dimension that the data axis divides and the spec leaves free, and jit
  gathers it where it is used.
  """
  num_data = mesh.shape["data"]
  is_variable = lambda x: isinstance(x, nnx.Variable)
  unwrap = lambda x: x.get_value() if is_variable(x) else x

  def sharding(leaf, spec):
    leaf, spec = unwrap(leaf), unwrap(spec)
    if not hasattr(leaf, "ndim"):  # No array (optax's MaskedNode of a frozen parameter): a prefix of nothing.
      return NamedSharding(mesh, P())
    # An array of fewer dimensions than its variable's spec (a factored optimizer moment) is replicated.
    logical = list(spec) + [None] * (leaf.ndim - len(spec)) if len(spec) <= leaf.ndim else [None] * leaf.ndim
    axes = list(mesh_spec(tuple(logical), leaf.shape, mesh, rules))
    if fsdp and num_data > 1:
      free = [i for i in range(leaf.ndim) if axes[i] is None and leaf.shape[i] % num_data == 0]
      if free:
        axes[max(free, key=lambda i: leaf.shape[i])] = "data"
    return NamedSharding(mesh, P(*axes))

  # One NamedSharding per variable or array: a prefix of the state's tree, as jit and device_put take.
  return jax.tree.map(sharding, state, nnx.get_partition_spec(state), is_leaf=is_variable)


def per_device(fn, mesh: jax.sharding.Mesh, *, sharded, replicated, experts, expert_specs):
  """jax.shard_map of fn(*sharded, *replicated, *experts) over every device of the mesh.

  sharded: arrays split on their first axis over the batch axes (token groups); replicated:
  trees every device sees whole; experts: trees of [E, ...] arrays, each split as the
  PartitionSpec at its place in expert_specs (a tree like experts: 'expert' on E, with tensor
  parallelism 'model' on the hidden dimension). fn returns (per-device output split like
  `sharded`, a tree replicated over the mesh); both must be the same on every 'model' device.
  """
  spec = lambda tree, s: jax.tree.map(lambda _: s, tree)
  in_specs = tuple(P(BATCH_AXES) for _ in sharded) + tuple(spec(t, P()) for t in replicated) + tuple(expert_specs)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=(P(BATCH_AXES), P()))(
    *sharded, *replicated, *experts
  )


def to_expert_devices(buffers: jax.Array) -> jax.Array:
  """[E, G, C, d] capacity buffers -> [E/n, n·G, C, d]: each device gets its experts' buffers from its row."""
  return jax.lax.all_to_all(buffers, "expert", split_axis=0, concat_axis=1, tiled=True)


def from_expert_devices(buffers: jax.Array) -> jax.Array:
  """The inverse of `to_expert_devices`: [E/n, n·G, C, d] -> [E, G, C, d]."""
  return jax.lax.all_to_all(buffers, "expert", split_axis=1, concat_axis=0, tiled=True)


def resolve_exchange(exchange: str) -> str:
  """'padded' or 'ragged' for moe.expert_exchange ('auto': ragged on GPU/TPU, padded on CPU)."""
  if exchange not in EXCHANGES:
    raise ValueError(f"expert_exchange must be one of {EXCHANGES}, got {exchange!r}")
  if exchange == "auto":
    return "ragged" if jax.default_backend() in ("gpu", "tpu") else "padded"
  return exchange


class RowExchange:
  """Dropless choices to the devices of their experts and back, for one routing.

  With n devices on 'expert' (E/n experts each), each of this device's N = T·K choices goes to
  the device holding its expert, with that device's local expert id; a receiver holds at most
  n·N rows (every choice of every device of its row). Rows that hold no choice carry the local
  id E/n, which `moejax.dropless.dropless_expert_ffn` skips.
    'padded'  N rows per destination, a plain all_to_all (any backend, CPU included): sends
              n·N rows whatever the routing.
    'ragged'  the choices sorted by destination, `jax.lax.ragged_all_to_all` (GPU/TPU; XLA:CPU
              has no lowering): sends exactly N rows.
  """

  def __init__(
    self, expert_index: jax.Array, num_experts: int, n_shards: int, exchange: str, permute_backend: str = "auto"
  ):
    """expert_index: <int32>[T, K] chosen experts (global ids) of this device's tokens; n_shards: n."""
    t, k = expert_index.shape
    n = t * k
    self.local_experts = num_experts // n_shards
    self.permute_backend = permute_backend
    flat = expert_index.reshape(-1)
    destination = flat // self.local_experts
    sent_before = jnp.cumsum(jax.nn.one_hot(destination, n_shards, dtype=jnp.int32), axis=0)
    rank = sent_before[jnp.arange(n), destination] - 1  # among the choices for the same device
    if resolve_exchange(exchange) == "padded":
      self.row_map = kernels.RowMap.from_rows((destination * n + rank).reshape(t, k), n_shards * n)
      self._there = self._back = lambda x, fill: jax.lax.all_to_all(
        x, "expert", split_axis=0, concat_axis=0, tiled=True
      )
    else:
      send_sizes = sent_before[-1]  # [n]
      input_offsets = jnp.cumsum(send_sizes) - send_sizes
      self.row_map = kernels.RowMap.from_rows((input_offsets[destination] + rank).reshape(t, k), n)
      self._there, self._back = _ragged_exchange(send_sizes, input_offsets, n, n_shards * n)
    local_id = jnp.concatenate([flat % self.local_experts, jnp.full((1,), self.local_experts, flat.dtype)])
    self._local_id = local_id[self.row_map.choice_of_row]  # empty rows: no expert

  def there(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(rows [R, d], local expert id <int32>[R]) on the receiving devices, from tokens [T, d]."""
    rows = kernels.permute(tokens, self.row_map, backend=self.permute_backend)
    exchanged = self._there(rows, 0), self._there(self._local_id, self.local_experts)
    return tuple(checkpoint_name(x, EXCHANGED) for x in exchanged)

  def back(self, rows: jax.Array, combine_weight: jax.Array) -> jax.Array:
    """[T, d] Σ_k combine_weight[t, k] · the computed row of choice (t, k), from the receivers' rows."""
    returned = checkpoint_name(self._back(rows, 0), EXCHANGED)
    return kernels.unpermute(returned, self.row_map, combine_weight, backend=self.permute_backend)


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
