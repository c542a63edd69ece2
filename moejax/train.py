"""The training loop: jitted train step, periodic eval, orbax checkpoints, resume, faults.

Determinism: the batch of step s is a pure function of (seed, train.data_offset + s) and the parameters are
initialised from the seed, so a run resumed from its newest checkpoint reproduces the losses
of an unbroken run step for step (tests/test_train.py kills a run with SIGKILL to check).

Read-backs: the host waits for the device only on the steps that need a value from it: log
steps (the metrics), eval steps, checkpoint steps and the last step (and once after the first
step, to start the clock after compilation). On other steps it only dispatches, running ahead.

Faults, each handled without a read-back or collective on the other steps:
- SIGTERM/SIGINT save a checkpoint and exit cleanly. One process stops after the step the
  signal arrived at. Several must stop, and save (a collective), at one step, but a signal may
  reach them between different steps: they compare flags (one host allgather) on log and
  checkpoint steps only, which every process computes alike from the step number, so a signal
  waits for the next such step (log_every steps at most).
- A NaN/inf loss or gradient norm: `_note_nonfinite`, a tiny jitted function dispatched after
  each step, carries the first such step on device, outside the checkpointed state (resume and
  the checkpoint format do not change). The host reads it on every step it reads back anyway,
  always before a save; if set, the run stops with exit code 1 and saves nothing, so the
  newest checkpoint predates the bad step (the steps trained after it, up to log_every, are lost).
- A checkpoint that does not restore (a truncated or garbled file): the newest one that does is
  used; the newer ones are moved aside to checkpoints/corrupt/<step> (out of orbax's step list,
  so it neither resumes from nor deletes them) with one warning line each. If none restores:
  one line on stderr, exit code 2, nothing moved or deleted. With several processes, all try
  the same steps in the same order and read the same files, so we assume a corrupt file fails
  on all of them alike; they check that they restored the same step, and process 0 moves.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import config as config_lib
from moejax import accumulation, finetune, lora, tasks, weights
from moejax.metric_writer import MetricWriter, Progress, format_duration
from moejax.models import scan
from moejax.parallel import BATCH_AXES, expert_param, make_mesh, state_sharding, undivided

EXIT_OK, EXIT_NONFINITE, EXIT_UNRESTORABLE = 0, 1, 2  # 2 as for bad input (main.py).
# Fault injection for tests/test_train.py: SIGKILL this process right after step N (after its
# checkpoint save is issued, so a kill at a checkpoint step lands mid-write). Unset in real runs.
_SIGKILL_AT_STEP_ENV = "MOEJAX_TEST_SIGKILL_AT_STEP"


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int):
  """AdamW with linear warm-up then cosine decay (or constant), after global-norm clipping.

  Returns:
    (the optax transformation, the learning-rate schedule step -> rate).
  """
  peak = optim.learning_rate
  if optim.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=optim.warmup_steps,
      decay_steps=max(num_steps, optim.warmup_steps + 1),
      end_value=peak * optim.end_lr_fraction,
    )
  else:
    schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, peak, optim.warmup_steps), optax.constant_schedule(peak)], [optim.warmup_steps]
    )
  adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
  if optim.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw), schedule
  return adamw, schedule


class Trainer:
  """Holds the jitted steps and the sharded state of one run.

  state: 'step'; 'params' (nnx.Param); 'model_state' (other model variables, e.g. DeepSeek's
  routing bias, updated after each step by `MoELayer.update_balance`, not by gradients); 'opt_state'; 'steps_without_tokens'
  <int32>[MoE layers, E] for the dead-expert count; with LoRA (`moejax.lora`), 'lora': the
  adapters {path...: {'a', 'b'}}, and the optimizer's tree is {'params', 'lora'}.

  The state is never built whole on one device or host: `abstract_state` (shapes, dtypes and
  shardings) comes from `nnx.eval_shape`, and `initialize` draws the parameters under jit straight
  into their shardings, taking the arrays it is given (`moejax.init.load`, already in their
  shardings, donated) in place of the drawn ones. With initialize=False the caller restores a
  checkpoint into `abstract_state` or calls `initialize` itself.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, task, initialize: bool = True):
    self.cfg, self.task = cfg, task
    self.mesh = make_mesh(*config_lib.mesh_shape(cfg, jax.device_count()))
    self.tx, self.schedule = make_optimizer(cfg.optim, cfg.train.num_steps)
    abstract_model = nnx.eval_shape(lambda: task.make_model(self.mesh, nnx.Rngs(params=cfg.seed)))
    self.num_moe_layers = len(abstract_model.moe_layers())
    # With model.scan_layers: (s, p), the unrolled prefix and the scanned period (moejax.models.scan).
    self.scan_plan = scan.plan(abstract_model.blocks) if cfg.model.get("scan_layers") else None
    self.graphdef, abstract_params, abstract_model_state = nnx.split(abstract_model, nnx.Param, ...)
    self.abstract_params = abstract_params
    flat_params = {path: tuple(v.get_value().shape) for path, v in nnx.to_flat_state(abstract_params)}
    self.adapters = lora.shapes(cfg.lora, flat_params) if lora.enabled(cfg) else {}
    # Which base parameters get no gradient and no update: the frozen groups, or, with LoRA, all but lora.train's.
    self.param_labels = finetune.labels(cfg, abstract_params)
    self.router_frozen = finetune.router_frozen(self.param_labels)
    abstract_adapters = jax.eval_shape(self._initial_adapters) if self.adapters else None
    self.tx = finetune.with_frozen(self.tx, self.param_labels, abstract_adapters)
    self.batch_sharding = NamedSharding(self.mesh, P(BATCH_AXES))
    unsharded = {
      "step": jax.ShapeDtypeStruct((), jnp.int32),
      "params": abstract_params,
      "model_state": abstract_model_state,
      "opt_state": jax.eval_shape(
        self.tx.init, self._trainable({"params": abstract_params, "lora": abstract_adapters})
      ),
      # One row even without MoE layers: orbax cannot save an empty array.
      "steps_without_tokens": jax.ShapeDtypeStruct((max(self.num_moe_layers, 1), cfg.moe.num_experts), jnp.int32),
    }
    if self.adapters:
      unsharded["lora"] = abstract_adapters
    self.state_sharding = state_sharding(self.mesh, unsharded, fsdp=cfg.mesh.fsdp, rules=cfg.mesh.rules.to_dict())
    self._initialize = jax.jit(self._initial_state, donate_argnums=0, out_shardings=self.state_sharding)
    self.abstract_state = jax.eval_shape(self._initialize, {"params": {}, "model_state": {}})
    self.state = None
    self._noise_key = jax.random.key(cfg.seed + 1)  # Router noise of step s: fold_in(key, s).
    self._train_step = jax.jit(
      self._train_step_fn, donate_argnums=0, out_shardings=(self.state_sharding, NamedSharding(self.mesh, P()))
    )
    self._eval_step = jax.jit(self._eval_step_fn)
    if initialize:
      self.initialize()

  def initialize(self, loaded: dict | None = None) -> None:
    """Step 0: parameters from the seed, but those in `loaded` ({'params' | 'model_state': {path: array}})."""
    loaded = loaded or {}
    self.state = self._initialize({"params": loaded.get("params", {}), "model_state": loaded.get("model_state", {})})

  def _initial_state(self, loaded):
    """The state at step 0 (run under jit: arrays drawn into their shardings; those replaced by `loaded` never drawn)."""
    model = self.task.make_model(self.mesh, nnx.Rngs(params=self.cfg.seed))
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    params, model_state = _with(params, loaded["params"]), _with(model_state, loaded["model_state"])
    adapters = self._initial_adapters() if self.adapters else None
    state = {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "model_state": model_state,
      "opt_state": self.tx.init(self._trainable({"params": params, "lora": adapters})),
      "steps_without_tokens": jnp.zeros((max(self.num_moe_layers, 1), self.cfg.moe.num_experts), jnp.int32),
    }
    if self.adapters:
      state["lora"] = adapters
    return state

  def _initial_adapters(self) -> dict:
    """The LoRA adapters at step 0 ({path...: {'a', 'b'}}, nnx.Params; a routed expert's split over 'expert')."""
    drawn = lora.init(self.adapters, self.cfg.seed + 2)
    wrap = lambda path, array: expert_param(array) if len(self.adapters[path][0]) == 3 else nnx.Param(array)
    return lora.nest({path: {k: wrap(path, v) for k, v in ab.items()} for path, ab in drawn.items()})

  def _trainable(self, state) -> object:
    """What the optimizer updates: the parameters, or with LoRA {'params', 'lora'}."""
    return {"params": state["params"], "lora": state["lora"]} if self.adapters else state["params"]

  def model_params(self, trainable) -> nnx.State:
    """The parameters the model runs with: frozen ones behind stop_gradient (no gradient is formed for them), adapters merged."""
    params = trainable["params"] if self.adapters else trainable
    if self.param_labels is not None:
      frozen = lambda p, label: jax.lax.stop_gradient(p) if label == "frozen" else p
      params = jax.tree.map(frozen, params, self.param_labels)
    if not self.adapters:
      return params
    flat = dict(nnx.to_flat_state(params))
    adapters = lora.unnest(trainable["lora"])
    s = lora.scale(self.cfg.lora)
    for path in self.adapters:
      a, b = (adapters[weights.key(path)][k] for k in ("a", "b"))
      flat[path] = flat[path].replace(lora.merged(flat[path].get_value(), _value(a), _value(b), s))
    return nnx.from_flat_state(flat)

  def trained_params(self) -> int:
    """How many numbers the optimizer updates: the unfrozen parameters and the LoRA adapters."""
    flat = jax.tree_util.tree_flatten_with_path(self.abstract_state["params"])[0]
    frozen = finetune.frozen_names(self.param_labels)
    count = sum(leaf.size for path, leaf in flat if ".".join(finetune._names(path)) not in frozen)
    return count + sum(math.prod(a) + math.prod(b) for a, b in self.adapters.values())

  def model(self, state=None) -> nnx.Module:
    """The model as the state computes it (LoRA adapters merged); the current state by default."""
    state = self.state if state is None else state
    return nnx.merge(self.graphdef, self.model_params(self._trainable(state)), state["model_state"])

  def _loss(self, trainable, model_state, batch, rng):
    model = nnx.merge(self.graphdef, self.model_params(trainable), model_state)
    loss, metrics, moe_aux = self.task.loss(model, batch, train=True, rng=rng)
    return loss, (metrics, moe_aux)

  def _gradients(self, trainable, model_state, batch, rng):
    """(gradients in the parameters' dtypes, metrics, MoE aux) of the batch: at once, or with
    train.microbatches = M > 1 as the mean over M equal micro-batches run one after another
    (gradient accumulation); with train.param_dtype 'bfloat16', of a bfloat16 copy of the
    parameters (`_low_precision`), the gradients cast up.

    Micro-batch m takes rows m, M + m, 2M + m, ... so that each device's rows of it are its own
    rows of the batch (no data moves between devices); router noise m draws with fold_in(rng, m).
    Metrics and aux are means over the micro-batches, but extremes (a name ending in _min/_max,
    min_/max_selected_gate) are the extremes over them, and each layer's max/min-over-mean load
    is taken from its mean load (`moejax.accumulation`).
    """
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    master = trainable
    if self.cfg.train.param_dtype != "float32":  # Differentiated: the low-precision copy, made once a step.
      trainable = _low_precision(trainable, jnp.dtype(self.cfg.train.param_dtype))
    up = lambda grads: jax.tree.map(lambda g, p: g.astype(p.dtype), grads, master)  # For the float32 update.
    m = self.cfg.train.microbatches
    if m == 1:
      (_, (metrics, moe_aux)), grads = grad_fn(trainable, model_state, batch, rng)
      return up(grads), metrics, moe_aux
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1), batch)

    def one(i, micro_batch):
      (_, (metrics, moe_aux)), grads = grad_fn(trainable, model_state, micro_batch, jax.random.fold_in(rng, i))
      return up(grads), metrics, moe_aux  # Summed in the master weights' dtype.

    shapes = jax.eval_shape(one, 0, jax.tree.map(lambda x: x[0], micro))
    reduce = accumulation.MicroBatchReduce(shapes)

    def accumulate(total, xs):
      return reduce.add(total, one(*xs)), None

    total, _ = jax.lax.scan(accumulate, reduce.start(), (jnp.arange(m), micro))
    return reduce.finish(total, m)

  def _train_step_fn(self, state, batch):
    trainable = self._trainable(state)
    rng = jax.random.fold_in(self._noise_key, state["step"])
    grads, metrics, moe_aux = self._gradients(trainable, state["model_state"], batch, rng)
    # Rule-based state (DeepSeek's routing bias) moves after the step, from that step's loads.
    model = nnx.merge(self.graphdef, self.model_params(trainable), state["model_state"])
    if not self.router_frozen:  # A frozen router's balancing bias (DeepSeek-V3's) stays put too.
      for layer, aux in zip(model.moe_layers(), moe_aux):
        layer.update_balance(aux)
    model_state = nnx.state(model, nnx.Not(nnx.Param))
    updates, opt_state = self.tx.update(grads, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics["grad_norm"] = optax.tree_utils.tree_norm(grads)
    metrics["learning_rate"] = self.schedule(state["step"])
    idle = state["steps_without_tokens"]
    if moe_aux:
      load = jnp.stack([a["expert_load"] for a in moe_aux])  # [layers, E]
      idle = jnp.where(load > 0, 0, idle + 1)
      dead = (idle >= self.cfg.moe.dead_expert_steps).sum(axis=1)
      for i in range(self.num_moe_layers):
        metrics[f"moe_layer{i}/dead_experts"] = dead[i]
    new = {
      "step": state["step"] + 1,
      "params": trainable["params"] if self.adapters else trainable,
      "model_state": model_state,
      "opt_state": opt_state,
      "steps_without_tokens": idle,
    }
    if self.adapters:
      new["lora"] = trainable["lora"]
    return new, metrics

  def _eval_step_fn(self, trainable, model_state, batch):
    return self.task.eval_metrics(nnx.merge(self.graphdef, self.model_params(trainable), model_state), batch)

  def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Places this process's rows of the global batch on the 'data' axis."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}

  def train_step(self, batch) -> dict[str, jax.Array]:
    self.state, metrics = self._train_step(self.state, self.shard_batch(batch))
    return metrics

  def evaluate(self, eval_batches) -> dict[str, float]:
    """The task's eval metrics averaged over the (equal-sized) eval batches."""
    trainable = self._trainable(self.state)
    per_batch = [self._eval_step(trainable, self.state["model_state"], self.shard_batch(b)) for b in eval_batches]
    per_batch = jax.device_get(per_batch)
    return {k: float(np.mean([m[k] for m in per_batch])) for k in per_batch[0]}


def _value(x):
  return x.get_value() if isinstance(x, nnx.Variable) else x


def _low_precision(tree, dtype):
  """A copy of tree with every floating array in dtype, but the routers' (routing stays float32) and
  the lookup tables' (an embedding's gradient sums over every occurrence of a token: float32)."""

  def cast(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if {"router", "embed", "position_embed"} & set(names) or not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf
    return leaf.astype(dtype)

  return jax.tree_util.tree_map_with_path(cast, tree)


def _with(state: nnx.State, arrays: dict) -> nnx.State:
  """`state` with the variables at the paths of `arrays` holding those arrays (cast to their dtype)."""
  if not arrays:
    return state
  flat = dict(nnx.to_flat_state(state))
  for path, array in arrays.items():
    flat[path] = flat[path].replace(array.astype(flat[path].get_value().dtype))
  return nnx.from_flat_state(flat)


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag checked between steps (restored on exit)."""

  def __init__(self):
    self.received = None

  def __enter__(self):
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def _handle(self, signum, frame):
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def _checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True
  )  # Half-written saves of a killed run.
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


class _Unrestorable(Exception):
  """There are checkpoints but none restores (or the processes disagree); the message says which and why."""


def _restore(manager: ocp.CheckpointManager, trainer: Trainer, say) -> int:
  """Restores the newest checkpoint that restores into trainer.state (onto its shardings); returns its step or 0.

  Newer checkpoints that fail to restore are moved aside to <checkpoints>/corrupt/<step> (by
  process 0), each with a warning line, and the manager is reloaded without them. Raises
  _Unrestorable, having moved nothing, when there are checkpoints but none restores, or when
  the processes restored different steps.
  """
  abstract = trainer.abstract_state
  failures = {}  # step -> why, newest first.
  restored, state = 0, None  # Saved steps start at 1.
  for step in sorted(manager.all_steps(), reverse=True):
    weights.silence_abandoned_reads()
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # noqa: BLE001 - narrowed by weights.unreadable_file_error; the rest re-raised.
      cause = weights.unreadable_file_error(e)
      if cause is None:
        raise
      failures[step] = weights.why(cause)
      continue
    restored = step
    break
  if jax.process_count() > 1:  # Before any raise: every process must reach this collective.
    from jax.experimental import multihost_utils

    steps = multihost_utils.process_allgather(np.int32(restored)).tolist()
    if len(set(steps)) > 1:
      raise _Unrestorable(
        f"the processes restored different checkpoints (steps {steps} in process order; "
        f"0: none): their views of {manager.directory} differ; nothing was moved or deleted"
      )
  if failures and not restored:
    raise _Unrestorable(
      f"no checkpoint in {manager.directory} restores ("
      + "; ".join(f"step {s}: {why}" for s, why in failures.items())
      + "); nothing was moved or deleted: repair them, or move them away to start afresh"
    )
  if failures:
    _move_aside(manager, failures, restored, say)
  if restored:
    trainer.state = state
  return restored


def _move_aside(manager: ocp.CheckpointManager, failures: dict[int, str], restored: int, say) -> None:
  """Moves the failed steps to <checkpoints>/corrupt/ (process 0), then every process reloads the manager."""
  root = str(manager.directory)
  if jax.process_index() == 0:
    os.makedirs(os.path.join(root, "corrupt"), exist_ok=True)
    for step, why in failures.items():
      target, n = os.path.join(root, "corrupt", str(step)), 1
      while os.path.exists(target):  # The same step went bad before: keep both.
        n += 1
        target = os.path.join(root, "corrupt", f"{step}.{n}")
      os.rename(os.path.join(root, str(step)), target)  # The manager's default step names: the plain number.
      say(
        f"warning: checkpoint at step {step} does not restore ({why}); moved it to "
        f"{os.path.relpath(target, os.path.dirname(root))}; resuming from step {restored}"
      )
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("moejax: corrupt checkpoints moved aside")
  manager.reload()


@jax.jit
def _note_nonfinite(first, step, loss, grad_norm):
  """`first` ({"step", "loss", "grad_norm"}; step 0 = none yet) with this step's values if they are the first NaN/inf.

  Runs on device after each train step, so the host need not read the loss back to guard it.
  `first` is None before the first step; the carry then takes the metrics' (replicated) sharding.
  """
  if first is None:
    first = {
      "step": jnp.zeros((), jnp.int32),
      "loss": jnp.zeros((), jnp.float32),
      "grad_norm": jnp.zeros((), jnp.float32),
    }
  # A finite loss with non-finite gradients has already poisoned the parameters.
  new = (first["step"] == 0) & ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
  values = {"step": step, "loss": loss, "grad_norm": grad_norm}
  return {k: jnp.where(new, values[k].astype(v.dtype), v) for k, v in first.items()}


def _agreed_stop(received: str | None, shared_step: bool) -> str | None:
  """The signal that stops every process after this step, or None.

  One process: its own signal, at any step, with no collective. Several: a signal may reach
  them between different steps, and all must stop (and save, a collective) at the same one, so
  they compare flags (a host allgather) on `shared_step`s only: steps that every process
  computes alike from the step number (log and checkpoint steps). Other steps return None.
  """
  if jax.process_count() == 1:
    return received
  if not shared_step:
    return None
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.int32(received is not None))
  return received or ("a signal (on another process)" if np.any(flags) else None)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
  """The metrics read back to the host (a sync: log steps only)."""
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, data, task=None, init_plan=None) -> int:
  """Trains `cfg` in `workdir` on `data` (from `tasks.make_data`), resuming if a checkpoint exists.

  task: the `tasks.make_task` of cfg and data, if the caller has built it. A new run (no checkpoint
  in the workdir) with init.checkpoint set takes its parameters from there (`moejax.init`;
  init_plan: its `plan`, if the caller has made it).

  Returns the process exit code: 0 when finished or interrupted cleanly, 1 on a non-finite loss,
  2 when there are checkpoints but none restores (one line on stderr; nothing moved or deleted).
  """
  t = cfg.train
  is_writer = jax.process_index() == 0
  say = (lambda *a: print(*a, flush=True)) if is_writer else (lambda *a: None)  # Process 0 speaks.
  task = task or tasks.make_task(cfg, data)  # moejax.main builds it (and refuses a misfit) first.
  trainer = Trainer(cfg, task, initialize=False)
  cost = task.cost()
  baselines = task.baselines()
  say(f"model: {cost.summary()}")
  say(f"data: {data.info['dataset']} | " + " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in baselines.items()))
  say(
    f"mesh: {dict(trainer.mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s), "
    f"{jax.process_count()} process(es)"
  )
  if (note := accumulation.microbatch_note(cfg)) is not None:
    say(note)
  whole = undivided(trainer.mesh, trainer.abstract_params, cfg.mesh.rules.to_dict())
  if whole:
    say(f"note: mesh.rules: these dimensions stay whole (the mesh axis does not divide them): {'; '.join(whole)}")
  if trainer.scan_plan is not None:
    s, p = trainer.scan_plan
    say(scan.note(s, p, cfg.model.num_layers))

  manager = _checkpoint_manager(workdir, t.keep_checkpoints)
  try:
    start_step = _restore(manager, trainer, say)
  except _Unrestorable as e:
    print(f"error: {e}", file=sys.stderr, flush=True)  # Every process, as for bad input.
    manager.close()
    return EXIT_UNRESTORABLE
  if start_step:
    say(f"resumed from the checkpoint at step {start_step}")
  else:
    loaded = None
    if cfg.init.checkpoint:
      from moejax import init

      init_plan = init_plan or init.plan(cfg.init, init.shapes(trainer.abstract_state), seed=cfg.seed)
      say(init_plan.summary())
      loaded = init.load(init_plan, trainer.abstract_state)
      if is_writer:  # The checkpoint actually taken (init.step 0 resolves to a step) and what of it.
        with open(os.path.join(workdir, "init.json"), "w") as f:
          json.dump(init_plan.record(), f, indent=1)
    trainer.initialize(loaded)
  writer = MetricWriter(workdir, enabled=is_writer)
  eval_batches = list(data.eval_batches())
  tokens_per_step = t.batch_size * task.tokens_per_example
  progress = Progress(t.num_steps, tokens_per_step, start_step)
  started = time.time()
  step, last_metrics, exit_code, eval_scalars = start_step, {}, EXIT_OK, {}

  def run_eval(step):
    scalars = trainer.evaluate(eval_batches)
    scalars.update(task.derived_eval(scalars))
    writer.write(step, "eval", scalars)
    say(f"eval at step {step}: " + " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in scalars.items()))
    return scalars

  # One directory per process: processes on one host would otherwise write the same file.
  where = "profile" if jax.process_count() == 1 else os.path.join("profile", f"process{jax.process_index()}")
  profile = _Profile(t.profile_start, t.profile_steps, os.path.join(workdir, where), start_step, say)
  with _StopSignal() as stop:
    batches = data.train_batches(t.data_offset + start_step)
    nonfinite = None  # On device: the first NaN/inf step (see _note_nonfinite).
    for step in range(start_step + 1, t.num_steps + 1):
      profile.before(step, trainer.state)
      metrics = trainer.train_step(next(batches))
      profile.after(step, metrics)
      # The step number from the state, a global array like the metrics (a host int is not one).
      nonfinite = _note_nonfinite(nonfinite, trainer.state["step"], metrics["loss"], metrics["grad_norm"])
      if step == start_step + 1:
        jax.block_until_ready(metrics)
        progress.start(step)  # Exclude compilation from the rates.
      logs = step % t.log_every == 0 or step == t.num_steps
      evals = bool(t.eval_every) and step % t.eval_every == 0 and step != t.num_steps
      stopping = _agreed_stop(stop.received, shared_step=logs or step % t.checkpoint_every == 0)
      saves = step % t.checkpoint_every == 0 or step == t.num_steps or bool(stopping)
      if logs or evals or saves:  # Steps that wait for the device anyway; always before a save.
        bad = jax.device_get(nonfinite)
        if bad["step"]:
          good = manager.latest_step()
          seen = f" (seen at step {step})" if bad["step"] != step else ""
          say(
            f"error: non-finite loss ({float(bad['loss'])}) or gradient norm ({float(bad['grad_norm'])}) "
            f"at step {int(bad['step'])}; stopping without saving{seen}. "
            f"Newest good checkpoint: {'step ' + str(good) if good is not None else 'none'}."
          )
          exit_code = EXIT_NONFINITE
          break
      if logs:
        last_metrics = _scalars(metrics)
        last_metrics["wall_time_s"] = time.time() - started  # Since this run (not the workdir) started.
        writer.write(step, "train", last_metrics)
        say(progress.report(step, last_metrics["loss"]))
      if evals:
        eval_scalars = run_eval(step)
      if saves:
        manager.save(step, args=ocp.args.StandardSave(trainer.state))
      if os.environ.get(_SIGKILL_AT_STEP_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
      if stopping:
        say(f"{stopping} received: saved a checkpoint at step {step}; re-run the same command to resume.")
        break
    else:
      if start_step >= t.num_steps:
        say(f"already trained to step {start_step} (train.num_steps = {t.num_steps})")
      eval_scalars = run_eval(max(start_step, t.num_steps))
      summary = {
        "step": max(start_step, t.num_steps),
        **{f"eval_{k}": v for k, v in eval_scalars.items()},
        "train_loss": last_metrics.get("loss"),
        **baselines,
        "total_params": cost.total_params,
        "trained_params": trainer.trained_params(),
        "active_params_per_token": cost.active_params,
        "train_flops_per_token": cost.train_flops_per_token,
        "wall_time_s": time.time() - started,
        "tokens_this_run": tokens_per_step * (t.num_steps - start_step),
        "dataset": data.info["dataset"],
      }
      if is_writer:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
          json.dump(summary, f, indent=2)
      say(
        f"done in {format_duration(summary['wall_time_s'])}: "
        + " | ".join(f"eval {k.replace('_', ' ')} {v:.4f}" for k, v in eval_scalars.items())
        + " | "
        + " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in baselines.items())
      )
  profile.close()
  manager.wait_until_finished()
  manager.close()
  writer.close()
  return exit_code


class _Profile:
  """A jax.profiler trace of steps first .. first + count - 1 (train.profile_start, train.profile_steps) in `directory`.

  Every process writes its own trace (profile/process<i> with several processes). A run that
  resumes past those steps says it does not trace them; one that stops inside the range closes
  the trace at the stop. A resumed run compiles again at its first step.
  """

  def __init__(self, first: int, count: int, directory: str, start_step: int, say):
    self.first, self.last, self.directory, self.active = first, first + count - 1, directory, False
    if first and start_step >= first:
      say(f"train.profile_start = {first}: not traced, this run resumes after step {start_step}")
      self.first = 0

  def before(self, step: int, state) -> None:
    if self.first and step == self.first:
      jax.block_until_ready(state)  # The earlier steps' device work stays out of the trace.
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, metrics) -> None:
    if self.active and step == self.last:
      jax.block_until_ready(metrics)  # The traced steps' device work, all of it.
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
