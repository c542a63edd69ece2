"""Memory, compile time and step time of each rematerialisation policy (model.remat, issue #16).

  python -m experiments.remat_memory [--out DIR] [--layers 8] [--d 256] [--seq 256] [--batch 8]
      [--dispatcher dropless|sort] [--repeats 3] [--quick]

For an MoE decoder (every FFN an MoE of 8 experts, top-2, GELU, float32, random weights) it
compiles the forward and backward pass of the training loss (the cross-entropy of the library's
`DecoderLM` in training mode plus the load-balance losses, `jax.value_and_grad` w.r.t. every
parameter) under each policy of `moejax.models.remat`, and reports the bytes JAX keeps from the forward
pass for the backward (the residuals of `jax.vjp`, from shapes), XLA's temporary bytes of the
compiled step (`memory_analysis`: its buffer assignment's working buffers), the compile time, and the best step time over --repeats runs, each as a ratio to 'none' from the
same run. Writes results.csv and results.md into --out (default
experiments/results/remat_memory/).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import optax
from flax import nnx

from experiments import framework
from moejax.config import base_config, override
from moejax.models.build import decoder_config
from moejax.models.decoder import DecoderLM
from moejax.models.remat import POLICIES

DEFAULT_OUT = os.path.join(framework.REPO, "experiments", "results", "remat_memory")
VOCAB = 256
COLUMNS = ("policy", "kept_mb", "x_kept", "temp_mb", "x_temp", "compile_s", "x_compile", "step_ms", "x_step")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=DEFAULT_OUT)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--d", type=int, default=256)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dispatcher", default="dropless", choices=("dropless", "sort"))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
  args = parser.parse_args(argv)
  if args.quick:
    args.layers, args.d, args.seq, args.batch, args.repeats = 2, 32, 16, 2, 1
  return args


def loss_and_grad(policy: str, args, **fields):
  """(jitted value_and_grad of the training loss, its parameters, the loss) of the study's MoE decoder
  under model.remat `policy`; fields: further config overrides (experiments/scan_layers.py's)."""
  cfg = override(
    base_config("lm"),
    {
      "model.num_layers": args.layers,
      "model.d_model": args.d,
      "model.num_heads": 4,
      "model.d_ff": 2 * args.d,
      "model.moe_every": 1,
      "model.remat": policy,
      "moe.num_experts": 8,
      "moe.top_k": 2,
      "moe.dispatcher": args.dispatcher,
      "train.seq_len": args.seq,
      **fields,
    },
  )
  graphdef, params, rest = nnx.split(DecoderLM(decoder_config(cfg, VOCAB), rngs=nnx.Rngs(0)), nnx.Param, ...)
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, VOCAB)

  def loss(params):
    logits, aux = nnx.merge(graphdef, params, rest)(tokens[:, :-1], train=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return ce + 0.01 * sum(a["load_balance_loss"] for a in aux)

  return jax.jit(jax.value_and_grad(loss)), params, loss


def residual_bytes(loss, params) -> int:
  """Bytes of what JAX keeps from the forward pass for the backward (the residuals of jax.vjp), from shapes."""
  residuals = jax.eval_shape(lambda p: jax.tree.leaves(jax.vjp(loss, p)[1]), params)
  return sum(r.size * r.dtype.itemsize for r in residuals)


def compile_and_time(fn, params, repeats: int) -> dict:
  """{lower_s, compile_s, hlo_chars, temp (XLA's temporary bytes), step_s (best of repeats), output} of jitted fn(params)."""
  start = time.perf_counter()
  lowered = fn.lower(params)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lower_s
  output = jax.block_until_ready(compiled(params))  # Warm-up, not timed.
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params))
    best = min(best, time.perf_counter() - start)
  return {
    "lower_s": lower_s,
    "compile_s": compile_s,
    "hlo_chars": len(compiled.as_text()),
    "temp": compiled.memory_analysis().temp_size_in_bytes,
    "step_s": best,
    "output": output,
  }


def measure(args) -> list[dict]:
  rows = []
  for policy in POLICIES:
    fn, params, loss = loss_and_grad(policy, args)
    kept = residual_bytes(loss, params)
    timed = compile_and_time(fn, params, args.repeats)
    compile_s, temp, best = timed["compile_s"], timed["temp"], timed["step_s"]
    rows.append(
      {"policy": policy, "kept_mb": kept / 1e6, "temp_mb": temp / 1e6, "compile_s": compile_s, "step_ms": 1e3 * best}
    )
    print(
      f"{policy}: kept {kept / 1e6:.1f} MB, temp {temp / 1e6:.1f} MB, compile {compile_s:.1f} s, step {1e3 * best:.1f} ms",
      flush=True,
    )
  base = rows[0]
  for row in rows:
    row["x_kept"] = row["kept_mb"] / base["kept_mb"]
    row["x_temp"] = row["temp_mb"] / base["temp_mb"]
    row["x_compile"] = row["compile_s"] / base["compile_s"]
    row["x_step"] = row["step_ms"] / base["step_ms"]
  return rows


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  start = time.perf_counter()
  rows = measure(args)
  header = [
    *framework.where_and_when(),
    f"model: {args.layers} MoE blocks, d={args.d}, 4 heads, 8 experts top-2 of hidden {2 * args.d}, "
    f"{args.dispatcher}; batch {args.batch} × {args.seq} tokens, float32; one device",
    f"value_and_grad of the training loss; best of {args.repeats}; wall time {time.perf_counter() - start:.0f} s",
  ]
  os.makedirs(args.out, exist_ok=True)
  framework.write_csv(os.path.join(args.out, "results.csv"), rows, header, COLUMNS, float_format=".4g")
  lines = ["# Rematerialisation policies (issue #16)", ""] + [f"- {h}" for h in header] + [""]
  lines += [
    "| policy | kept for backward MB | × none | XLA temp MB | × none | compile s | × none | step ms | × none |",
    "|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['policy']} | {r['kept_mb']:.1f} | {r['x_kept']:.2f} | {r['temp_mb']:.1f} | {r['x_temp']:.2f} "
      f"| {r['compile_s']:.2f} | {r['x_compile']:.2f} | {r['step_ms']:.1f} | {r['x_step']:.2f} |"
    )
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(header))
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
