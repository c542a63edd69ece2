"""The training loop: jitted train step, periodic eval, orbax checkpoints, resume, faults.

Determinism: the batch of step s is a pure function of (seed, s) and the parameters are
initialised from the seed, so a run resumed from its newest checkpoint reproduces the losses
of an unbroken run step for step (tests/test_train.py kills a run with SIGKILL to check).
SIGTERM/SIGINT save a checkpoint of the current step and exit cleanly; a NaN/inf loss stops
the run before anything is saved from the bad step, so the newest checkpoint stays good.
"""

from __future__ import annotations

import json
import os
import signal
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

from moejax import accounting
from moejax import config as config_lib
from moejax.layers.moe import make_mesh
from moejax.metric_writer import MetricWriter, Progress, format_duration
from moejax.models.decoder import DecoderLM

EXIT_OK, EXIT_NONFINITE = 0, 1
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
        init_value=0.0, peak_value=peak, warmup_steps=optim.warmup_steps,
        decay_steps=max(num_steps, optim.warmup_steps + 1), end_value=peak * optim.end_lr_fraction)
  else:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, peak, optim.warmup_steps), optax.constant_schedule(peak)],
        [optim.warmup_steps])
  adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
  if optim.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw), schedule
  return adamw, schedule


def moe_losses_and_metrics(moe_aux: list[dict], moe_cfg) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted sum of the MoE auxiliary losses (each summed over MoE layers) and per-layer metrics."""
  if not moe_aux:
    return jnp.zeros(()), {}
  weights = {"load_balance_loss": moe_cfg.load_balance_loss_weight, "z_loss": moe_cfg.z_loss_weight,
             "importance_loss": moe_cfg.importance_loss_weight, "load_loss": moe_cfg.load_loss_weight}
  metrics, total = {}, jnp.zeros(())
  for name, weight in weights.items():
    metrics[name] = sum(a[name] for a in moe_aux)
    total = total + weight * metrics[name]
  for i, aux in enumerate(moe_aux):
    prefix = f"moe_layer{i}/"
    for name, value in aux.items():
      if name == "fraction_dropped":
        for rank, dropped in enumerate(value):
          metrics[prefix + f"fraction_dropped_choice{rank + 1}"] = dropped
      elif name == "expert_load":
        metrics[prefix + "max_over_mean_load"] = value.max() / value.mean()
        metrics[prefix + "min_over_mean_load"] = value.min() / value.mean()
      elif value.ndim == 0:
        metrics[prefix + name] = value
  return total, metrics


def lm_loss(model: DecoderLM, batch: dict[str, jax.Array], cfg: ml_collections.ConfigDict, train: bool,
            rng: jax.Array | None = None):
  """Next-token cross-entropy plus the MoE auxiliary losses; returns (loss, metrics, moe_aux)."""
  logits, moe_aux = model(batch["inputs"], train=train, rng=rng)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
  aux_loss, metrics = moe_losses_and_metrics(moe_aux, cfg.moe)
  metrics["cross_entropy"] = ce
  metrics["loss"] = ce + aux_loss
  return metrics["loss"], metrics, moe_aux


class Trainer:
  """Holds the jitted steps and the sharded state of one run.

  state: 'step'; 'params' (nnx.Param); 'model_state' (other model variables, e.g. DeepSeek's
  routing bias, updated by the forward pass, not by gradients); 'opt_state'; 'steps_without_tokens'
  <int32>[MoE layers, E] for the dead-expert count.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, vocab_size: int):
    self.cfg = cfg
    num_data = jax.device_count() if cfg.mesh.data == -1 else cfg.mesh.data
    self.mesh = make_mesh(num_data)
    self.model_cfg = config_lib.decoder_config(cfg, vocab_size)
    model = DecoderLM(self.model_cfg, mesh=self.mesh, rngs=nnx.Rngs(params=cfg.seed))
    self.graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    self.num_moe_layers = sum(self.model_cfg.is_moe_layer(i) for i in range(self.model_cfg.num_layers))
    self.tx, self.schedule = make_optimizer(cfg.optim, cfg.train.num_steps)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
             "opt_state": self.tx.init(params),
             "steps_without_tokens": jnp.zeros((self.num_moe_layers, cfg.moe.num_experts), jnp.int32)}
    self.state = jax.device_put(state, self.replicated)
    self._noise_key = jax.random.key(cfg.seed + 1)  # Router noise of step s: fold_in(key, s).
    self._train_step = jax.jit(self._train_step_fn, donate_argnums=0)
    self._eval_step = jax.jit(self._eval_step_fn)

  def _train_step_fn(self, state, batch):
    def loss_fn(params):
      model = nnx.merge(self.graphdef, params, state["model_state"])
      loss, metrics, moe_aux = lm_loss(model, batch, self.cfg, train=True,
                                       rng=jax.random.fold_in(self._noise_key, state["step"]))
      return loss, (metrics, moe_aux)

    (_, (metrics, moe_aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    # Rule-based state (DeepSeek's routing bias) moves after the step, from that step's loads.
    model = nnx.merge(self.graphdef, state["params"], state["model_state"])
    for layer, aux in zip(model.moe_layers(), moe_aux):
      layer.update_balance(aux)
    model_state = nnx.state(model, nnx.Not(nnx.Param))
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["learning_rate"] = self.schedule(state["step"])
    idle = state["steps_without_tokens"]
    if moe_aux:
      load = jnp.stack([a["expert_load"] for a in moe_aux])  # [layers, E]
      idle = jnp.where(load > 0, 0, idle + 1)
      dead = (idle >= self.cfg.moe.dead_expert_steps).sum(axis=1)
      for i in range(self.num_moe_layers):
        metrics[f"moe_layer{i}/dead_experts"] = dead[i]
    return {"step": state["step"] + 1, "params": params, "model_state": model_state, "opt_state": opt_state,
            "steps_without_tokens": idle}, metrics

  def _eval_step_fn(self, params, model_state, batch):
    _, metrics, _ = lm_loss(nnx.merge(self.graphdef, params, model_state), batch, self.cfg, train=False)
    return metrics["cross_entropy"]

  def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Places this process's rows of the global batch on the 'data' axis."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}

  def train_step(self, batch) -> dict[str, jax.Array]:
    self.state, metrics = self._train_step(self.state, self.shard_batch(batch))
    return metrics

  def evaluate(self, eval_batches) -> float:
    losses = [self._eval_step(self.state["params"], self.state["model_state"], self.shard_batch(b))
              for b in eval_batches]
    return float(np.mean(jax.device_get(losses)))

  @property
  def step(self) -> int:
    return int(self.state["step"])


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
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True,
                                       cleanup_tmp_directories=True)  # Half-written saves of a killed run.
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def _restore(manager: ocp.CheckpointManager, trainer: Trainer) -> int:
  """Restores the newest checkpoint into trainer.state (onto its shardings); returns its step or 0."""
  step = manager.latest_step()
  if step is None:
    return 0
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, trainer.state)
  trainer.state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return step


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str, data) -> int:
  """Trains `cfg` in `workdir` on `data` (a moejax.data LMData), resuming if a checkpoint exists.

  Returns the process exit code: 0 when finished or interrupted cleanly, 1 on a non-finite loss.
  """
  t = cfg.train
  is_writer = jax.process_index() == 0
  trainer = Trainer(cfg, data.vocab_size)
  cost = accounting.decoder_cost(trainer.model_cfg)
  print(f"model: {cost.summary()}", flush=True)
  print(f"data: {data.info['dataset']} | unigram loss {data.info['unigram_loss']:.4f}"
        + (f" | Bayes floor {data.info['bayes_floor']:.4f}" if data.info.get("bayes_floor") is not None else ""),
        flush=True)
  print(f"mesh: {dict(trainer.mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s)",
        flush=True)

  manager = _checkpoint_manager(workdir, t.keep_checkpoints)
  start_step = _restore(manager, trainer)
  if start_step:
    print(f"resumed from the checkpoint at step {start_step}", flush=True)
  writer = MetricWriter(workdir, enabled=is_writer)
  eval_batches = list(data.eval_batches())
  tokens_per_step = t.batch_size * t.seq_len
  progress = Progress(t.num_steps, tokens_per_step, start_step)
  started = time.time()
  step, last_metrics, exit_code, eval_loss = start_step, {}, EXIT_OK, None

  def run_eval(step):
    loss = trainer.evaluate(eval_batches)
    scalars = {"cross_entropy": loss}
    if data.info.get("bayes_floor") is not None:
      scalars["gap_to_bayes_floor"] = loss - data.info["bayes_floor"]
    writer.write(step, "eval", scalars)
    print(f"eval at step {step}: loss {loss:.4f}"
          + (f" (Bayes floor {data.info['bayes_floor']:.4f}, gap {scalars['gap_to_bayes_floor']:.4f})"
             if "gap_to_bayes_floor" in scalars else ""), flush=True)
    return loss

  with _StopSignal() as stop:
    batches = data.train_batches(start_step)
    for step in range(start_step + 1, t.num_steps + 1):
      metrics = trainer.train_step(next(batches))
      loss = float(metrics["loss"])
      if not np.isfinite(loss):
        good = manager.latest_step()
        print(f"error: non-finite loss ({loss}) at step {step}; stopping without saving. "
              f"Newest good checkpoint: {'step ' + str(good) if good is not None else 'none'}.", flush=True)
        exit_code = EXIT_NONFINITE
        break
      if step == start_step + 1:
        progress.start(step)  # Exclude compilation from the rates.
      if step % t.log_every == 0 or step == t.num_steps:
        last_metrics = _scalars(metrics)
        writer.write(step, "train", last_metrics)
        print(progress.report(step, loss), flush=True)
      if t.eval_every and step % t.eval_every == 0 and step != t.num_steps:
        eval_loss = run_eval(step)
      if step % t.checkpoint_every == 0 or step == t.num_steps or stop.received:
        manager.save(step, args=ocp.args.StandardSave(trainer.state))
      if os.environ.get(_SIGKILL_AT_STEP_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
      if stop.received:
        print(f"{stop.received} received: saved a checkpoint at step {step}; "
              f"re-run the same command to resume.", flush=True)
        break
    else:
      if start_step >= t.num_steps:
        print(f"already trained to step {start_step} (train.num_steps = {t.num_steps})", flush=True)
      eval_loss = run_eval(t.num_steps)
      _write_summary(workdir, is_writer, step=max(start_step, t.num_steps), eval_loss=eval_loss,
                     last_metrics=last_metrics, data=data, cost=cost, wall=time.time() - started,
                     tokens=tokens_per_step * (t.num_steps - start_step))
  manager.wait_until_finished()
  manager.close()
  writer.close()
  return exit_code


def _write_summary(workdir, is_writer, *, step, eval_loss, last_metrics, data, cost, wall, tokens):
  floor = data.info.get("bayes_floor")
  summary = {
      "step": step,
      "eval_cross_entropy": eval_loss,
      "train_loss": last_metrics.get("loss"),
      "unigram_loss": data.info["unigram_loss"],
      "bayes_floor": floor,
      "gap_to_bayes_floor": None if floor is None else eval_loss - floor,
      "total_params": cost.total_params,
      "active_params_per_token": cost.active_params,
      "train_flops_per_token": cost.train_flops_per_token,
      "wall_time_s": wall,
      "tokens_this_run": tokens,
      "dataset": data.info["dataset"],
  }
  if is_writer:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  print(f"done in {format_duration(wall)}: eval loss {eval_loss:.4f} | unigram {data.info['unigram_loss']:.4f}"
        + (f" | Bayes floor {floor:.4f} (gap {eval_loss - floor:.4f})" if floor is not None else ""), flush=True)
