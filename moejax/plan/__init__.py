"""Memory planner: will a config's train step fit on a mesh of a given accelerator?

  python -m moejax.plan --config configs/architectures.py:mixtral_8x7b \\
      --mesh data=8,expert=8,model=1 --device h100-80gb [--config.model.remat=full ...] [--json PATH]

Nothing is allocated. The command makes D·X·Mo fake CPU devices (jax_num_cpu_devices, set
before JAX starts its backend), builds the `moejax.train.Trainer` of the config on that mesh
without weights (`initialize=False`: `nnx.eval_shape`), lowers its jitted train step for the
abstract state and batch (shapes, dtypes and NamedShardings) and compiles it ahead of time. The
train step is the one training runs: its micro-batches (train.microbatches), parameter dtype
(train.param_dtype), remat policy (model.remat), scan over layers, FSDP and tensor parallelism
are all the config's; only its metrics are left out (`state_update`: thousands of per-expert
scalars that cost compile time, not memory).

Two accounts, per device, side by side:
  compiled   `compiled.memory_analysis()` of XLA:CPU's compilation. Its arguments are split
             exactly into parameters, optimizer state, the rest of the state and the batch: the
             bytes of each array / its number of shards (`NamedSharding.shard_shape`); the sum is
             checked against XLA's argument size. Its temp is XLA:CPU's buffer assignment: the
             step's working buffers (gradients, copies, activations) as XLA:CPU schedules and
             fuses them. That is NOT what a GPU's or a TPU's compiler would allocate: XLA:CPU
             moves dropless rows with the 'padded' exchange (it has no ragged_all_to_all), runs
             dropless experts as the 'blocks' loop rather than ragged_dot, and its own fusion
             and scheduling decide how long each buffer lives. With the blocks unrolled XLA:CPU's temp barely moves with the remat
             policy (experiments/remat_memory.py; on Mixtral-8x7B's step the planner sees 538
             GiB under 'full' against 550 under 'none'); with model.scan_layers it does (33
             against 511 GiB), each scan step's buffers living only as long as the step
             (experiments/results/plan/presets.md, 2026-12-05). Gradients + copies +
             activations is temp; the planner shows activations as temp less the analytic
             gradients and copies.
  analytic   `moejax.plan.estimate`: the same state bytes, float32 gradients, the parameter
             copies, and activations by a per-block formula under the remat policy, for the
             target's program (its 'auto' exchange resolved for a GPU/TPU).
Peak = arguments + temp + outputs not aliased to a donated argument (the state is donated, so
the new state reuses its buffers). "Fits" compares each peak with the device's memory times
`devices.USABLE_FRACTION`; the verdict is 'yes' when both fit, 'no' when neither does, and
'uncertain' when they disagree (neither is a GPU's or a TPU's allocator, and the planner does
not pick one over the other).
"""

from __future__ import annotations

import dataclasses
import math
import time
import types

# Pure Python, as this package's top level is: the CLI reads the devices before JAX starts.
from moejax.plan.devices import DEVICES, USABLE_FRACTION, Device, platform

MESH_AXES = ("data", "expert", "model")  # moejax.parallel's, named here without importing JAX.


@dataclasses.dataclass
class Plan:
  """A memory plan: bytes per device (`moejax.plan.report` formats them in GiB)."""

  config: str
  device: str
  device_bytes: int
  usable_bytes: int
  mesh: dict  # {'data': D, 'expert': X, 'model': Mo}
  setup: dict  # batch, seq_len, microbatches, sequences per device per micro-batch, remat, ...
  state: dict  # Exact, from the shardings: params, opt_state, other_state, batch.
  compiled: dict  # XLA:CPU memory_analysis: argument, output, alias, temp; peak; activations (derived).
  analytic: dict  # gradients, copies, activations (kept, working), peak.
  fits: dict  # {'analytic': bool, 'compiled': bool, 'verdict': 'yes' | 'no' | 'uncertain'}
  compile_seconds: float
  activation_terms: dict = dataclasses.field(default_factory=dict)  # Analytic kept bytes by term.

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def shard_bytes(leaf) -> int:
  """Bytes one device holds of an abstract array with a NamedSharding (its shard's shape)."""
  shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
  return math.prod(shape) * leaf.dtype.itemsize


def tree_bytes(tree) -> int:
  """Σ shard_bytes over the abstract arrays of tree (nnx Variables unwrapped)."""
  import jax

  return sum(shard_bytes(leaf) for leaf in jax.tree.leaves(tree) if hasattr(leaf, "sharding"))


def data_stand_in(cfg) -> types.SimpleNamespace:
  """What an LM task reads of its data to build the model: the vocabulary (`moejax.tasks.vocab_size_without_data`, as moejax.count_params counts it)."""
  from moejax import tasks

  return types.SimpleNamespace(vocab_size=tasks.vocab_size_without_data(cfg), info={})


def abstract_batch(cfg, sharding) -> dict:
  """The LM batch as abstract arrays: inputs and targets <int32>[batch, seq_len], split over the batch axes."""
  import jax
  import jax.numpy as jnp

  shape = (cfg.train.batch_size, cfg.train.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in ("inputs", "targets")}


def make_plan(cfg, device: Device, config_name: str = "") -> Plan:
  """The memory plan of cfg's train step on its mesh (cfg.mesh.data/expert/model, all ≥ 1) of `device`s.

  Needs jax.device_count() ≥ D·X·Mo (the CLI makes that many fake CPU devices); raises ConfigError
  for a config the mesh or the task cannot take. Bytes in the Plan are per device.
  """
  import jax

  from moejax import config as config_lib
  from moejax import routers, tasks, train
  from moejax.errors import ConfigError
  from moejax.plan import estimate

  if cfg.task != "lm":
    raise ConfigError("task", f"the planner plans decoder language models ('lm'), not {cfg.task!r}")
  mesh = {"data": cfg.mesh.data, "expert": cfg.mesh.expert, "model": cfg.mesh.model}
  config_lib.validate(cfg, math.prod(mesh.values()), 1)
  task = tasks.make_task(cfg, data_stand_in(cfg), mesh["data"] * mesh["expert"])
  trainer = train.Trainer(cfg, task, initialize=False)
  batch = abstract_batch(cfg, trainer.batch_sharding)
  abstract = trainer.abstract_state
  state = {
    "params": tree_bytes(abstract["params"]),
    "opt_state": tree_bytes(abstract["opt_state"]),
    "other_state": tree_bytes({k: v for k, v in abstract.items() if k not in ("params", "opt_state")}),
    "batch": tree_bytes(batch),
  }
  xla, compile_seconds = _compiled_account(trainer, batch)
  analytic, acts, shape = _analytic_account(cfg, task, trainer, device)
  analytic["peak"] += sum(state.values())
  step_buffers = analytic["gradients"] + sum(v for k, v in analytic.items() if k.startswith("copies_"))
  xla["activations_derived"] = xla["temp"] - step_buffers
  usable = device.usable_bytes
  fit_a, fit_c = analytic["peak"] <= usable, xla["peak"] <= usable
  verdict = "yes" if fit_a and fit_c else "no" if not (fit_a or fit_c) else "uncertain"
  setup = {
    "batch_size": cfg.train.batch_size,
    "seq_len": cfg.train.seq_len,
    "microbatches": cfg.train.microbatches,
    "sequences_per_device_microbatch": shape.sequences,
    "remat": cfg.model.remat,
    "scan_layers": bool(cfg.model.scan_layers),
    "fsdp": bool(cfg.mesh.fsdp),
    "param_dtype": cfg.train.param_dtype,
    "dtype": cfg.model.dtype,
    "dispatcher": routers.get(cfg.moe.router).dispatcher(cfg.moe),
    "expert_rows_per_device": estimate.moe_rows(task.model_cfg.moe, shape)[0] if trainer.num_moe_layers else 0,
    "total_params": sum(leaf.size for leaf in jax.tree.leaves(abstract["params"])),
    "state_matches_xla_arguments": sum(state.values()) == xla["argument"],
  }
  return Plan(
    config=config_name,
    device=device.name,
    device_bytes=device.memory_bytes,
    usable_bytes=usable,
    mesh=mesh,
    setup=setup,
    state=state,
    compiled=xla,
    analytic=analytic,
    fits={"analytic": fit_a, "compiled": fit_c, "verdict": verdict},
    compile_seconds=compile_seconds,
    activation_terms=acts.per_term,
  )


def _compiled_account(trainer, batch) -> tuple[dict, float]:
  """(XLA:CPU's sizes of the compiled step: argument, output, alias, temp, peak; seconds to compile)."""
  start = time.perf_counter()
  compiled = state_update(trainer).lower(trainer.abstract_state, batch).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  xla = {
    "argument": memory.argument_size_in_bytes,
    "output": memory.output_size_in_bytes,
    "alias": memory.alias_size_in_bytes,
    "temp": memory.temp_size_in_bytes,
  }
  xla["peak"] = xla["argument"] + xla["temp"] + xla["output"] - xla["alias"]
  return xla, seconds


def _analytic_account(cfg, task, trainer, device: Device):
  """({gradients, copies_*, activations*, peak without the state}, the Activations, the estimate.Shape)."""
  import jax.numpy as jnp

  from moejax.plan import estimate

  mesh = trainer.mesh.shape
  shape = estimate.Shape(
    sequences=cfg.train.batch_size / (mesh["data"] * mesh["expert"] * cfg.train.microbatches),
    seq_len=cfg.train.seq_len,
    activation_bytes=jnp.dtype(cfg.model.dtype).itemsize,
    model_devices=mesh["model"],
    expert_devices=mesh["expert"],
    rules=cfg.mesh.rules.to_dict(),
    platform=platform(device),
  )
  acts = estimate.activations(task.model_cfg, shape, cfg.model.remat)
  copies = _copies(cfg, trainer, mesh["data"])
  gradients = estimate.gradient_bytes(_float_bytes(trainer.abstract_state["params"]), cfg.train.microbatches)
  analytic = {
    "gradients": gradients,
    **{f"copies_{k}": v for k, v in copies.items()},
    "activations_kept": acts.kept,
    "activations_working": acts.working,
    "activations": acts.total,
    "peak": gradients + sum(copies.values()) + acts.total,
  }
  return analytic, acts, shape


def state_update(trainer):
  """The trainer's train step without its metrics: (state, batch) -> new state, jitted as the trainer does.

  The metrics are scalars, but DeepSeek-V3 has 58 × 256 of them (a load per expert per layer),
  and XLA:CPU's compile time grows with them: on a 20-block DeepSeek-V3 (8 devices, 2-core VM,
  2026-12-05) 136 s with, 37 s without, XLA's temp equal within 16 KB. Without outputs they are
  dead code, so XLA compiles what the state needs (the expert loads that count dead experts stay).
  """
  import jax

  return jax.jit(
    lambda state, batch: trainer._train_step_fn(state, batch)[0],
    donate_argnums=0,
    out_shardings=trainer.state_sharding,
  )


def _float_bytes(params) -> int:
  """Per-device bytes of the floating parameters as float32 (their gradients' size)."""
  import jax
  import jax.numpy as jnp

  leaves = [leaf for leaf in jax.tree.leaves(params) if jnp.issubdtype(leaf.dtype, jnp.floating)]
  return sum(shard_bytes(leaf) // leaf.dtype.itemsize * 4 for leaf in leaves)


def _copies(cfg, trainer, num_data: int) -> dict:
  """Per-device bytes of the step's parameter copies (estimate.py's 'copies'), by kind."""
  import jax
  import jax.numpy as jnp

  params = trainer.abstract_state["params"]
  low = cfg.train.param_dtype != "float32"
  itemsize = jnp.dtype(cfg.train.param_dtype).itemsize

  def differentiated(path, leaf) -> int:
    """Bytes of the copy the forward pass reads of this leaf (low precision but routers and tables)."""
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    if low and not {"router", "embed", "position_embed"} & names:
      return shard_bytes(leaf) // leaf.dtype.itemsize * itemsize
    return shard_bytes(leaf)

  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  copies = {"low_precision": sum(differentiated(p, leaf) for p, leaf in flat) if low else 0}
  blocks = params["blocks"]
  per_block = [jax.tree_util.tree_flatten_with_path(blocks[i])[0] for i in range(len(blocks))]
  if cfg.mesh.fsdp and num_data > 1:
    gathered = max(sum(differentiated(p, leaf) * _data_shards(leaf) for p, leaf in block) for block in per_block)
    copies["fsdp_gathered"] = 2 * gathered  # The weights and their gradient before the reduce-scatter.
  else:
    copies["fsdp_gathered"] = 0
  scanned = _scanned_blocks(cfg, trainer)
  copies["scan_stacked"] = sum(
    differentiated(p, leaf) + shard_bytes(leaf) // leaf.dtype.itemsize * 4 for i in scanned for p, leaf in per_block[i]
  )
  return copies


def _data_shards(leaf) -> int:
  """How many ways the leaf is split over 'data' (1 or D)."""
  spec = leaf.sharding.spec
  axes = [a for entry in spec if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))]
  return leaf.sharding.mesh.shape["data"] if "data" in axes else 1


def _scanned_blocks(cfg, trainer) -> list[int]:
  """The blocks model.scan_layers runs in its scan (`moejax.models.scan.plan`); [] when off."""
  if not cfg.model.scan_layers:
    return []
  from flax import nnx

  from moejax.models import scan

  model = nnx.merge(trainer.graphdef, trainer.abstract_state["params"], trainer.abstract_state["model_state"])
  s, p = scan.plan(list(model.blocks))
  return list(range(s, len(model.blocks))) if p else []


__all__ = ["DEVICES", "MESH_AXES", "USABLE_FRACTION", "Device", "Plan", "make_plan", "shard_bytes", "tree_bytes"]
