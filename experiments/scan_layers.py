"""Compile time, step time and memory of scanning the blocks (model.scan_layers) against the unrolled loop.

  python -m experiments.scan_layers [--out DIR] [--layers 16] [--d 256] [--seq 256] [--batch 8]
      [--dispatcher dropless|sort] [--remat none|full|dots|moe] [--repeats 3] [--quick]

For an MoE decoder (every FFN an MoE of 8 experts, top-2, GELU, float32, random weights: one
unit of one block, scanned --layers times) it compiles the forward and backward pass of the
training loss (the cross-entropy of the library's `DecoderLM` in training mode plus the
load-balance losses, `jax.value_and_grad` w.r.t. every parameter) with model.scan_layers False
and True, and reports the length of the compiled program's HLO text, the time to trace and lower
it (`lower`: Python and JAX) and XLA's compile time (`compile`), XLA's temporary bytes of the compiled step (`memory_analysis`: its buffer
assignment's working buffers), and the best step time over --repeats runs, each as a ratio to
the unrolled loop from the same run, and the loss each computes (equal up to rounding). Writes
results.csv and results.md into --out (default experiments/results/scan_layers/).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


from experiments import framework, remat_memory
from moejax.config.schema import REMAT_POLICIES

DEFAULT_OUT = os.path.join(framework.REPO, "experiments", "results", "scan_layers")
COLUMNS = (
  "scan_layers",
  "hlo_kchars",
  "x_hlo",
  "lower_s",
  "x_lower",
  "compile_s",
  "x_compile",
  "temp_mb",
  "x_temp",
  "step_ms",
  "x_step",
  "loss",
)


RATIOS = {
  "hlo_kchars": "x_hlo",
  "lower_s": "x_lower",
  "compile_s": "x_compile",
  "temp_mb": "x_temp",
  "step_ms": "x_step",
}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=DEFAULT_OUT)
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--d", type=int, default=256)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dispatcher", default="dropless", choices=("dropless", "sort"))
  parser.add_argument("--remat", default="none", choices=REMAT_POLICIES)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
  args = parser.parse_args(argv)
  if args.quick:
    args.layers, args.d, args.seq, args.batch, args.repeats = 2, 32, 8, 2, 1
  return args


def measure(args) -> list[dict]:
  rows = []
  for scan_layers in (False, True):
    fn, params, _ = remat_memory.loss_and_grad(args.remat, args, **{"model.scan_layers": scan_layers})
    timed = remat_memory.compile_and_time(fn, params, args.repeats)
    lower_s, compile_s, hlo, temp = timed["lower_s"], timed["compile_s"], timed["hlo_chars"], timed["temp"]
    loss, best = timed["output"][0], timed["step_s"]
    rows.append(
      {
        "scan_layers": scan_layers,
        "hlo_kchars": hlo / 1e3,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "temp_mb": temp / 1e6,
        "step_ms": 1e3 * best,
        "loss": float(loss),
      }
    )
    print(
      f"scan_layers={scan_layers}: HLO {hlo / 1e3:.0f}k chars, lower {lower_s:.1f} s, compile {compile_s:.1f} s, "
      f"temp {temp / 1e6:.1f} MB, step {1e3 * best:.1f} ms, loss {float(loss):.6f}",
      flush=True,
    )
  base = rows[0]
  for row in rows:
    for column in ("hlo_kchars", "lower_s", "compile_s", "temp_mb", "step_ms"):
      row[RATIOS[column]] = row[column] / base[column]
  return rows


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  start = time.perf_counter()
  rows = measure(args)
  header = [
    *framework.where_and_when(),
    (
      f"model: {args.layers} MoE blocks, d={args.d}, 4 heads, 8 experts top-2 of hidden {2 * args.d}, "
      f"{args.dispatcher}, remat {args.remat}; batch {args.batch} × {args.seq} tokens, float32; one device"
    ),
    f"value_and_grad of the training loss; best of {args.repeats}; wall time {time.perf_counter() - start:.0f} s",
  ]
  os.makedirs(args.out, exist_ok=True)
  framework.write_csv(os.path.join(args.out, "results.csv"), rows, header, COLUMNS, float_format=".4g")
  lines = ["# Scan over layers (model.scan_layers, issue #16)", ""] + [f"- {h}" for h in header] + [""]
  lines += [
    (
      "| scan_layers | HLO k chars | × unrolled | lower s | × unrolled | compile s | × unrolled "
      "| XLA temp MB | × unrolled | step ms | × unrolled | loss |"
    ),
    "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['scan_layers']} | {r['hlo_kchars']:.0f} | {r['x_hlo']:.2f} | {r['lower_s']:.2f} | {r['x_lower']:.2f} "
      f"| {r['compile_s']:.2f} | {r['x_compile']:.2f} "
      f"| {r['temp_mb']:.1f} | {r['x_temp']:.2f} | {r['step_ms']:.1f} | {r['x_step']:.2f} | {r['loss']:.6f} |"
    )
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(header))
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
