"""Peak host memory of starting a run on 8 fake devices: the state is built sharded, never whole.

  python -m experiments.init_memory [--layers 4] [--d_model 1024] [--d_ff 2048] [--experts 16]

An MoE decoder of a few GB of float32 parameters on 8 fake CPU devices (mesh data 2 × expert 4 with
FSDP: experts split 8 ways, the other weights 2 ways), whose device memory is this host's. Each way of starting runs in a fresh
process and prints the peak resident memory above its start (VmHWM, reset once JAX is loaded):
  eager       what moejax did before issue #14: the model built whole on the default device, the
              optimizer state from it, then device_put into the shardings (the baseline)
  seed        `Trainer`: parameters and optimizer state drawn under jit into their shardings
  checkpoint  `Trainer` from `init.checkpoint` (a weights checkpoint of the same model, written
              first by this script): each array read into its sharding, the rest under jit
The training state (parameters and AdamW's two moments) is 3× the parameters: a start that holds
nothing else peaks near that, not at a multiple of it.

Measured on 2026-12-04 on the 2-core development machine (24 GiB; jax 0.10.2, orbax 0.12.8): see
README "Starting a run from weights", which quotes the table this prints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from experiments import memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(args, data_dir: str, checkpoint: str = ""):
  from moejax.config import common, override

  cfg = common.small_lm()
  override(
    cfg,
    {
      "model.num_layers": args.layers,
      "model.d_model": args.d_model,
      "model.num_heads": 8,
      "model.d_ff": args.d_ff,
      "model.moe_every": 1,
      "moe.num_experts": args.experts,
      "moe.top_k": 2,
      "mesh.expert": 4,  # and 'data' 2, with FSDP: experts split 8 ways, other weights 2 ways.
      "mesh.fsdp": True,
      "train.batch_size": 8,
      "train.seq_len": 16,
      "data.data_dir": data_dir,
      "data.markov.num_train": 64,
      "data.markov.num_validation": 16,
      "init.checkpoint": checkpoint,
    },
  )
  return cfg


def _start(mode: str, args, data_dir: str, checkpoint: str) -> None:
  """Starts the run's state one way in this process; prints its peak memory above the start (JSON)."""
  import jax

  jax.config.update("jax_num_cpu_devices", 8)
  from flax import nnx

  from moejax import config as config_lib
  from moejax import init, tasks
  from moejax.train import Trainer

  cfg = make_config(args, data_dir, checkpoint if mode == "checkpoint" else "")
  config_lib.validate(cfg, jax.device_count())
  task = tasks.make_task(cfg, tasks.make_data(cfg), jax.device_count())
  jax.block_until_ready(jax.numpy.zeros(8))  # The backend is up.
  start = memory.reset_peak()
  if mode == "eager":
    trainer = Trainer(cfg, task, initialize=False)  # Only for its optimizer and shardings.
    model = task.make_model(trainer.mesh, nnx.Rngs(params=cfg.seed))
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    state = {
      "step": jax.numpy.zeros((), jax.numpy.int32),
      "params": params,
      "model_state": model_state,
      "opt_state": trainer.tx.init(params),
      "steps_without_tokens": jax.numpy.zeros((cfg.model.num_layers, cfg.moe.num_experts), jax.numpy.int32),
    }
    state = jax.device_put(state, trainer.state_sharding)
    del model, params
  elif mode == "seed":
    trainer = Trainer(cfg, task)
    state = trainer.state
  else:
    trainer = Trainer(cfg, task, initialize=False)
    plan = init.plan(cfg.init, init.shapes(trainer.abstract_state))
    trainer.initialize(init.load(plan, trainer.abstract_state))
    state = trainer.state
  jax.block_until_ready(state)
  params = sum(x.nbytes for x in jax.tree.leaves(state["params"]))
  total = sum(x.nbytes for x in jax.tree.leaves(state))
  # What the 8 devices hold: each shard, replicas included (arrays the mesh does not split are on every device).
  held = sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards)
  print(json.dumps({"peak_above_start": memory.peak() - start, "params": params, "state": total, "held": held}))


def _write_checkpoint(args, data_dir: str, directory: str) -> None:
  """A weights checkpoint of the model (random arrays of its shapes), written layer by layer."""
  import jax
  import numpy as np
  from flax import nnx

  from moejax import tasks, weights

  cfg = make_config(args, data_dir)
  task = tasks.make_task(cfg, tasks.make_data(cfg))
  model = nnx.eval_shape(lambda: task.make_model(None, nnx.Rngs(0)))
  flat = {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  rng = np.random.default_rng(0)
  writer = weights.PartWriter(directory)
  groups = {}
  for path, value in flat.items():
    groups.setdefault(path[:2] if path[0] == "blocks" else path[:1], {})[path] = value
  for group in groups.values():
    writer.add({p: (rng.standard_normal(v.shape, dtype=np.float32) * 0.02) for p, v in group.items()})
  writer.finalize()
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg.to_dict(), f)
  del jax


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--d_model", type=int, default=1024)
  parser.add_argument("--d_ff", type=int, default=2048)
  parser.add_argument("--experts", type=int, default=16)
  parser.add_argument("--modes", default="eager,seed,checkpoint")
  parser.add_argument("--tmp", default=None)
  parser.add_argument("--_start", nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._start:
    _start(*args._start[:1], args, *args._start[1:])
    return
  with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
    data_dir, checkpoint = os.path.join(tmp, "tfds"), os.path.join(tmp, "weights")
    if "checkpoint" in args.modes:
      _write_checkpoint(args, data_dir, checkpoint)
    passed = [f"--{k}={v}" for k, v in vars(args).items() if k in ("layers", "d_model", "d_ff", "experts")]
    results = {}
    for mode in args.modes.split(","):
      out = subprocess.run(
        [sys.executable, "-m", "experiments.init_memory", *passed, "--_start", mode, data_dir, checkpoint],
        capture_output=True,
        text=True,
        cwd=REPO,
      )
      if out.returncode:
        raise SystemExit(f"{mode}: {out.stderr[-3000:]}")
      results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
  gb = lambda n: f"{n / 1e9:.2f} GB"
  any_run = next(iter(results.values()))
  print(
    f"parameters {gb(any_run['params'])} (float32), training state {gb(any_run['state'])}, held by the 8 fake "
    f"devices (replicas included) {gb(any_run['held'])}"
  )
  print("| start | peak above start | / parameters | / what the devices hold |")
  print("|:---|---:|---:|---:|")
  for mode, r in results.items():
    peak = r["peak_above_start"]
    print(f"| {mode} | {gb(peak)} | {peak / r['params']:.2f} | {peak / r['held']:.2f} |")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
