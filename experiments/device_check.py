"""The GPU check (issue #16): one script for one H100 or H200, meant to take under 8 minutes, one results file.

  python -m experiments.device_check [--out DIR] [--quick] [--lower_only]

Each part runs on its own (a failure is recorded, and the next part runs) and writes its figures
into <out>/device_check.json and a table into <out>/device_check.md:
  permute     the Pallas token permutation ('gpu' variant, Triton) compiled, its permute and
              unpermute equal to the XLA backend's, and their bandwidth (bytes read and written
              / time) against the bandwidth of a plain copy of the same bytes, measured here;
  moe_layer   `moejax.layers.moe.MoELayer` at Mixtral-like dims (d 4096, 8 experts of hidden
              14336, top-2, SwiGLU, bfloat16), dropless through `jax.lax.ragged_dot`, forward
              and backward, against a dense SwiGLU FFN of hidden K·f (the same FLOPs); and, if
              the tokamax package imports, tokamax's ragged_dot against jax's on the same
              grouped matmul;
  mfu         the train step of `moejax.train.Trainer` for a ~1B-parameter MoE decoder (bfloat16
              activations and parameters, float32 master weights): step time and model FLOPs
              utilisation, 6·(active FLOPs per token)·tokens / time, against the chip's
              published dense bfloat16 peak and against a bfloat16 matmul measured here.
--lower_only lowers every jitted function for CUDA at the full sizes without running it (what
tests/test_device_check.py does on a CPU machine: 47 s on the 2-core VM, 2026-12-04); --quick shrinks every size (a
smoke run). No data set is read: the MFU step trains on random tokens.

On the lent H200 (Python 3.12; jax, flax, optax, orbax, chex there) moejax needs ml-collections
as a wheel, and tokamax is tried if its wheel is carried too (0.0.12 is the Python 3.11 release;
the part records it as not installed otherwise). Here, once:
  echo /.whl/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0 [tokamax==0.0.12]
then one `run` with carry ['.whl'] and timeout_s 540:
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
  export PYTHONPATH=/tmp/site && PYTHONUNBUFFERED=1 python3 -m experiments.device_check --out $OUT
and commit the two files it returns under experiments/results/device_check/.

Device runs: the results files of each run are committed under experiments/results/device_check/
with the device and date (none yet: no device has been lent to a session since this was written).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
import types

import jax
import jax.numpy as jnp
import numpy as np

from experiments import framework
from moejax import dropless

DEFAULT_OUT = os.path.join(framework.REPO, "experiments", "results", "device_check")
# Dense bfloat16 peak FLOP/s by device_kind prefix (NVIDIA's data sheets, without sparsity).
PEAK_BF16 = {"NVIDIA H100 PCIe": 756e12, "NVIDIA H200 NVL": 835e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


def _best_time(fn, *args, repeats: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def _lower(fn, *args) -> int:
  """Lowers a jitted fn for CUDA; returns the size of its text (it lowered)."""
  return len(fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text())


def check_permute(args) -> dict:
  from moejax import kernels

  t, k, d = (256, 2, 128) if args.quick else (32768, 2, 4096)
  e = 8
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.bfloat16)
  expert = rng.integers(0, e, (t, k))
  order = np.argsort(expert.reshape(-1), kind="stable")  # Rows in expert order, as a dispatcher fills them.
  rank = np.empty(t * k, np.int64)
  rank[order] = np.arange(t * k)
  row_map = kernels.RowMap.from_rows(jnp.asarray(rank.reshape(t, k), jnp.int32), t * k)
  weight = jnp.asarray(rng.random((t, k)), jnp.float32)
  ops = {
    backend: (
      # interpret=False: the Triton kernel itself, also when lowering on a CPU machine.
      jax.jit(lambda x, m, b=backend: kernels.permute(x, m, backend=b, platform="gpu", interpret=False)),
      jax.jit(lambda y, m, w, b=backend: kernels.unpermute(y, m, w, backend=b, platform="gpu", interpret=False)),
    )
    for backend in ("xla", "pallas")
  }
  copy = jax.jit(lambda a: a + jnp.ones((), a.dtype))  # Reads and writes every element once.
  if args.lower_only:
    rows, out = jnp.zeros((t * k, d), jnp.bfloat16), {}
    for b, (p, u) in ops.items():
      for name, fn, a in (("permute", p, (x, row_map)), ("unpermute", u, (rows, row_map, weight))):
        text = fn.trace(*a).lower(lowering_platforms=("cuda",)).as_text()
        out[f"{b}_{name}_lowered_chars"] = len(text)
        if b == "pallas":  # The Triton kernel, not an interpreter's jax ops.
          out[f"pallas_{name}_is_triton"] = "xla.gpu.triton" in text
    return out
  out = {"tokens": t, "k": k, "d": d, "dtype": "bfloat16"}
  moved = {"permute": 2 * t * k * d * 2, "unpermute": (t * k * d + t * d) * 2}  # bytes read + written
  big = jnp.zeros((t * k, d), jnp.bfloat16)
  out["copy_GBps"] = 2 * big.size * 2 / _best_time(copy, big) / 1e9
  rows = ops["xla"][0](x, row_map)
  for b, (p, u) in ops.items():  # XLA first: its figures stand if the Pallas kernels fail to compile.
    try:
      if b == "pallas":
        diff = lambda a, ref: float(jnp.max(jnp.abs(a.astype(jnp.float32) - ref.astype(jnp.float32))))
        out["permute_max_abs_diff"] = diff(p(x, row_map), rows)
        out["unpermute_max_abs_diff"] = diff(u(rows, row_map, weight), ops["xla"][1](rows, row_map, weight))
      for name, fn, a in (("permute", p, (x, row_map)), ("unpermute", u, (rows, row_map, weight))):
        seconds = _best_time(fn, *a)
        out[f"{b}_{name}_ms"] = 1e3 * seconds
        out[f"{b}_{name}_GBps"] = moved[name] / seconds / 1e9
        out[f"{b}_{name}_of_copy"] = out[f"{b}_{name}_GBps"] / out["copy_GBps"]
    except Exception as err:  # noqa: BLE001 - recorded; the other backend's figures are kept.
      out[f"{b}_error"] = f"{type(err).__name__}: {err}"[:2000]
  return out


def check_moe_layer(args) -> dict:
  from flax import nnx

  from moejax.layers.ffn import ffn_apply
  from moejax.layers.moe import MoELayer
  from moejax.models.build import moe_config
  from moejax.config import base_config, override

  d, f, e, k, tokens = (64, 128, 8, 2, 256) if args.quick else (4096, 14336, 8, 2, 8192)
  cfg = override(
    base_config("lm"),
    {
      "model.d_model": d,
      "model.d_ff": f,
      "model.activation": "swiglu",
      "moe.num_experts": e,
      "moe.top_k": k,
      "moe.dispatcher": "dropless",
      "moe.dropless_impl": "ragged_dot",
      "train.seq_len": tokens,
    },
  )
  make = lambda: MoELayer(d, moe_config(cfg), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(nnx.eval_shape(make) if args.lower_only else make())  # Shapes only to lower.
  low = lambda p: jnp.bfloat16 if jnp.issubdtype(p.dtype, jnp.floating) else p.dtype
  if args.lower_only:
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, low(p)), params)
  else:
    params = jax.tree.map(lambda p: p.astype(low(p)), params)
  x = jax.random.normal(jax.random.key(1), (1, tokens, d), jnp.bfloat16)

  def moe_loss(params, x):
    y, aux = nnx.merge(graphdef, params)(x, train=True, rng=jax.random.key(2))
    return jnp.sum(y.astype(jnp.float32) ** 2) + aux["load_balance_loss"]

  wi = jax.random.normal(jax.random.key(3), (d, k * f), jnp.bfloat16) * d**-0.5
  wg = jax.random.normal(jax.random.key(4), (d, k * f), jnp.bfloat16) * d**-0.5
  wo = jax.random.normal(jax.random.key(5), (k * f, d), jnp.bfloat16) * (k * f) ** -0.5

  def dense_loss(w, x):
    y = ffn_apply(x[0], w[0], w[1], w[2], "swiglu", "td,df->tf", "tf,fd->td")
    return jnp.sum(y.astype(jnp.float32) ** 2)

  moe_step = jax.jit(jax.grad(moe_loss, argnums=(0, 1)))
  dense_step = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))
  if args.lower_only:
    return {
      "moe_lowered_chars": _lower(moe_step, params, x),
      "dense_lowered_chars": _lower(dense_step, (wi, wo, wg), x),
    }
  out = {"d": d, "f": f, "experts": e, "k": k, "tokens": tokens, "dtype": "bfloat16"}
  out["moe_ms"] = 1e3 * _best_time(moe_step, params, x)
  out["dense_same_flops_ms"] = 1e3 * _best_time(dense_step, (wi, wo, wg), x)
  out["moe_over_dense"] = out["moe_ms"] / out["dense_same_flops_ms"]
  # Whether XLA compiled ragged_dot as a grouped matmul here (1) or densely over every expert (~E).
  out["ragged_dot_flop_ratio"] = dropless.ragged_dot_flop_ratio(tokens * k, d, f, e, "bfloat16")
  try:
    out.update(_tokamax(tokens, k, d, f, e))
  except Exception as err:  # noqa: BLE001 - not installed, or not working with this jax: recorded.
    out["tokamax"] = f"{type(err).__name__}: {err}"[:500]
  return out


def _tokamax(tokens: int, k: int, d: int, f: int, e: int) -> dict:
  """tokamax's ragged_dot against jax's on the MoE layer's first grouped matmul (equal groups)."""
  import tokamax

  out = {}
  rows = jax.random.normal(jax.random.key(6), (tokens * k, d), jnp.bfloat16)
  weights = jax.random.normal(jax.random.key(7), (e, d, f), jnp.bfloat16)
  sizes = jnp.full((e,), tokens * k // e, jnp.int32)
  jax_ragged = jax.jit(lambda a, b, g: jax.lax.ragged_dot(a, b, g))
  tokamax_ragged = jax.jit(lambda a, b, g: tokamax.ragged_dot(a, b, g))
  out["tokamax_version"] = getattr(tokamax, "__version__", "?")
  out["jax_ragged_dot_ms"] = 1e3 * _best_time(jax_ragged, rows, weights, sizes)
  out["tokamax_ragged_dot_ms"] = 1e3 * _best_time(tokamax_ragged, rows, weights, sizes)
  out["tokamax_max_abs_diff"] = float(
    jnp.max(jnp.abs(tokamax_ragged(rows, weights, sizes).astype(jnp.float32) - jax_ragged(rows, weights, sizes)))
  )
  return out


def check_mfu(args) -> dict:
  from moejax import tasks
  from moejax.config import base_config, override
  from moejax.train import Trainer

  sizes = (
    {"model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.d_ff": 64, "train.seq_len": 32}
    if args.quick
    else {
      "model.num_layers": 8,
      "model.d_model": 2048,
      "model.num_heads": 16,
      "model.d_ff": 2816,
      "train.seq_len": 2048,
    }
  )
  vocab = 512 if args.quick else 32000
  cfg = override(
    base_config("lm"),
    {
      **sizes,
      "model.vocab_size": vocab,
      "model.moe_every": 1,
      "model.activation": "swiglu",
      "model.dtype": "bfloat16",
      "moe.num_experts": 8,
      "moe.top_k": 2,
      "moe.dispatcher": "dropless",
      "moe.dropless_impl": "ragged_dot",  # What 'auto' takes on a GPU, set so that the CPU lowers it too.
      "train.batch_size": 2 if args.quick else 8,
      "train.param_dtype": "bfloat16",
      "train.num_steps": 100,
      "mesh.data": 1,
    },
  )
  task = tasks.LMTask(cfg, types.SimpleNamespace(vocab_size=vocab))
  trainer = Trainer(cfg, task, initialize=not args.lower_only)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (cfg.train.batch_size, cfg.train.seq_len + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  cost = task.cost()
  out = {"total_params": cost.total_params, "active_params": cost.active_params, "tokens_per_step": tokens[:, 1:].size}
  if args.lower_only:
    abstract_batch = {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding) for k, v in batch.items()
    }
    out["train_step_lowered_chars"] = _lower(trainer._train_step, trainer.abstract_state, abstract_batch)
    return out
  for _ in range(2):  # Compile and warm.
    jax.block_until_ready(trainer.train_step(batch))
  times = []
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(trainer.train_step(batch))
    times.append(time.perf_counter() - start)
  step = min(times)
  flops = cost.train_flops_per_token * out["tokens_per_step"]
  out["step_ms"] = 1e3 * step
  out["model_tflops_per_s"] = flops / step / 1e12
  kind = jax.devices()[0].device_kind
  peak = next((v for prefix, v in PEAK_BF16.items() if kind.startswith(prefix)), None)
  out["mfu_of_published_peak"] = flops / step / peak if peak else None
  n = 512 if args.quick else 8192
  a = jnp.ones((n, n), jnp.bfloat16)
  matmul = jax.jit(lambda a: a @ a)
  out["measured_matmul_tflops_per_s"] = 2 * n**3 / _best_time(matmul, a) / 1e12
  out["mfu_of_measured_matmul"] = out["model_tflops_per_s"] / out["measured_matmul_tflops_per_s"]
  stats = jax.devices()[0].memory_stats() or {}  # The allocator's peak: the run's real memory figure.
  out["peak_bytes_in_use_GB"] = stats.get("peak_bytes_in_use", 0) / 1e9 or None
  return out


CHECKS = {"permute": check_permute, "moe_layer": check_moe_layer, "mfu": check_mfu}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=DEFAULT_OUT)
  parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
  parser.add_argument("--lower_only", action="store_true", help="lower for CUDA, run nothing (CPU tests)")
  parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated parts of {', '.join(CHECKS)}")
  args = parser.parse_args(argv)
  unknown = sorted(set(args.only.split(",")) - set(CHECKS))
  if unknown:
    print(f"error: --only: {unknown[0]!r} is not one of {', '.join(CHECKS)}", file=sys.stderr)
    sys.exit(2)
  device = jax.devices()[0]
  result = {
    "device": f"{device.device_kind} ({device.platform})",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "jax": jax.__version__,
    "python": platform.python_version(),
    "mode": "lower_only" if args.lower_only else ("quick" if args.quick else "full"),
  }
  os.makedirs(args.out, exist_ok=True)
  for name in args.only.split(","):
    start = time.perf_counter()
    try:
      result[name] = CHECKS[name](args)
    except Exception as err:  # noqa: BLE001 - one part failing must not lose the others' figures.
      result[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    result[name]["seconds"] = time.perf_counter() - start
    print(f"{name}: {json.dumps({k: v for k, v in result[name].items() if k != 'traceback'})}", flush=True)
    _write(result, args.out)  # After every part: a run stopped at its time limit keeps what it measured.
  return result


def _write(result: dict, out: str) -> None:
  with open(os.path.join(out, "device_check.json"), "w") as f:
    json.dump(result, f, indent=1)
  lines = [f"# GPU check: {result['device']}, {result['date']}, jax {result['jax']} ({result['mode']})", ""]
  for name in CHECKS:
    if name in result:
      lines += [f"## {name}", "", "| figure | value |", "|:---|---:|"]
      figures = [(k, v) for k, v in result[name].items() if k != "traceback"]
      lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in figures]
      lines.append("")
  with open(os.path.join(out, "device_check.md"), "w") as f:
    f.write("\n".join(lines))


if __name__ == "__main__":
  main(sys.argv[1:])
