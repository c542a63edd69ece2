"""The memory planner on every preset of configs/architectures.py, at a training setup of its size.

  python -m experiments.plan_presets [--out DIR] [--only mixtral_8x7b,dbrx] [--timeout 600]

For each preset it runs `python -m moejax.plan` in a process of its own (the fake device count
is fixed when JAX starts), writing <out>/<label>.json, then <out>/presets.md: per device, the
state (parameters, Adam moments), gradients and copies, the activations of the analytic
formula and XLA:CPU's temp, both peaks, and whether the step fits (`moejax.plan`); then the
remat policies on the Mixtral-8x7B setup, with and without scan_layers. All of it took 23 minutes
on the 2-core VM (2026-12-05; DeepSeek-V3 on 1024 fake devices about 3 minutes a row).

Every setup trains on sequences of 4096 tokens, 4M tokens a step (1024 sequences, in as many
micro-batches as make each device run one sequence at a time), with FSDP (mesh.fsdp: parameters
and Adam moments also split over 'data'), remat 'full' and model.scan_layers (it compiles faster:
Mixtral-8x7B's 32 blocks in 15-22 s scanned, 61-80 s unrolled; and XLA:CPU's temp follows the
remat policy with it, not without: the second table, `REMAT`). float32 master weights and
moments, bfloat16 activations (the presets' model.dtype). moejax has no pipeline parallelism, so
where a release trained with it (DeepSeek), the devices here hold every layer.

Meshes: published where a release says (the device count, or its expert parallelism), else
chosen: a power-of-two count of 80 GB GPUs roughly in proportion to the model's size, the
'expert' axis at 8 (4 where E = 60 or 32). `SETUPS` records which. Two more rows for DeepSeek-V3:
capacity buffers instead of dropless, and the report's 64-way expert parallelism (where moejax's
FSDP, over a 'data' axis of 4, leaves each device a quarter of the dense weights, and a dropless
receiver reserves 64·T·K rows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from experiments import framework

DEFAULT_OUT = os.path.join(framework.REPO, "experiments", "results", "plan")
COMMON = {
  "train.seq_len": 4096,
  "train.batch_size": 1024,
  "mesh.fsdp": True,
  "model.remat": "full",
  "model.scan_layers": True,
}
# label -> (preset, mesh (data, expert, model), device, overrides, where the setup comes from)
SETUPS = {
  "mixtral_8x7b": ("mixtral_8x7b", (8, 8, 1), "h100-80gb", {"train.microbatches": 16}, "chosen"),
  "mixtral_8x22b": ("mixtral_8x22b", (16, 8, 1), "h100-80gb", {"train.microbatches": 8}, "chosen"),
  "olmoe_1b_7b": (
    "olmoe_1b_7b",
    (32, 8, 1),
    "h100-80gb",
    {"train.microbatches": 4},
    "OLMoE paper: 256 H100s, 4M-token batches of 4096-token sequences (its parallelism differs)",
  ),
  "qwen1_5_moe_a2_7b": ("qwen1_5_moe_a2_7b", (16, 4, 1), "h100-80gb", {"train.microbatches": 16}, "chosen (E = 60)"),
  "qwen2_57b_a14b": ("qwen2_57b_a14b", (16, 8, 1), "h100-80gb", {"train.microbatches": 8}, "chosen"),
  "qwen3_30b_a3b": ("qwen3_30b_a3b", (16, 8, 1), "h100-80gb", {"train.microbatches": 8}, "chosen"),
  "qwen3_235b_a22b": ("qwen3_235b_a22b", (32, 8, 1), "h100-80gb", {"train.microbatches": 4}, "chosen"),
  "deepseek_v2_lite": ("deepseek_v2_lite", (8, 8, 1), "h800", {"train.microbatches": 16}, "chosen"),
  "deepseek_v2": (
    "deepseek_v2",
    (32, 8, 1),
    "h800",
    {"train.microbatches": 4},
    "DeepSeek-V2 paper: H800s, 8-way expert parallelism (with 16-way pipeline parallelism, not here)",
  ),
  "deepseek_v3": (
    "deepseek_v3",
    (128, 8, 1),
    "h800",
    {},
    "DeepSeek-V3 report: 2048 H800s; here 1024 and 8-way expert parallelism, for moejax's FSDP splits over 'data' only",
  ),
  "deepseek_v3 capacity 1.25": (
    "deepseek_v3",
    (128, 8, 1),
    "h800",
    {"moe.dispatcher": "sort", "moe.capacity_factor": 1.25},
    "as deepseek_v3, with capacity buffers (moe.dispatcher 'sort', capacity factor 1.25) instead of dropless",
  ),
  "deepseek_v3 EP 64": (
    "deepseek_v3",
    (4, 64, 1),
    "h800",
    {"train.microbatches": 4},
    "the report's 64-way expert parallelism (there with 16-way pipeline parallelism, which moejax lacks)",
  ),
  "dbrx": ("dbrx", (32, 8, 1), "h100-80gb", {"train.microbatches": 4}, "chosen (DBRX was trained on 3072 H100s)"),
  "arctic": ("arctic", (32, 8, 1), "h100-80gb", {"train.microbatches": 4}, "chosen"),
  "grok_1": ("grok_1", (32, 8, 1), "h100-80gb", {"train.microbatches": 4}, "chosen"),
  "gpt_oss_120b": ("gpt_oss_120b", (16, 8, 1), "h100-80gb", {"train.microbatches": 8}, "chosen"),
  "gpt_oss_20b": ("gpt_oss_20b", (8, 4, 1), "h100-80gb", {"train.microbatches": 32}, "chosen"),
}

# The remat policies, with and without scan_layers, at the mixtral_8x7b row's setup (its 'full' +
# scan row is that row): does XLA:CPU's temp follow the policy where the formula says it should?
REMAT = {
  f"mixtral_8x7b remat {policy}{'' if scan else ' unrolled'}": (
    "mixtral_8x7b",
    (8, 8, 1),
    "h100-80gb",
    {"train.microbatches": 16, "model.remat": policy, "model.scan_layers": scan},
    "as the mixtral_8x7b row",
  )
  for scan, policies in ((True, ("none", "dots", "moe")), (False, ("none", "full")))
  for policy in policies
}
ALL = {**SETUPS, **REMAT}


def command(label: str, out: str) -> list[str]:
  preset, (data, expert, model), device, overrides, _ = ALL[label]
  fields = {**COMMON, **overrides}
  return [
    sys.executable,
    "-m",
    "moejax.plan",
    f"--config=configs/architectures.py:{preset}",
    f"--mesh=data={data},expert={expert},model={model}",
    f"--device={device}",
    f"--json={os.path.join(out, _file(label))}",
    *(f"--config.{k}={v}" for k, v in fields.items()),
  ]


def _file(label: str) -> str:
  return label.replace(" ", "_").replace(".", "") + ".json"


GiB = 2**30


def _g(n: float) -> str:
  return f"{n / GiB:.1f}"


def markdown(rows: dict, header: list[str]) -> str:
  """presets.md: the presets' table, then the remat policies' (rows: label -> plan JSON, or why none)."""
  lines = ["# Memory plans of the presets (`python -m experiments.plan_presets`)", ""]
  lines += [f"- {h}" for h in header] + [""]
  lines += [
    (
      "GiB per device. State: parameters + Adam moments (exact, from the shardings). Grad + copies: float32 "
      "gradients (twice with micro-batches) and the copies of `moejax.plan.estimate`. Activations: the formula "
      "(kept + one block's working set + logits). XLA temp: XLA:CPU's buffer assignment (not a GPU's). Fits: "
      "peak ≤ 90% of the device's memory by both accounts (yes), by neither (no), or by one (uncertain)."
    ),
    "",
    (
      "| preset | devices | mesh d×e×m | seq/device/µbatch | expert rows/device | state | grad + copies | "
      "activations | XLA temp | peak analytic | peak XLA:CPU | usable | fits | compile s | setup |"
    ),
    "|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|---:|:---|",
  ]
  for label, plan in rows.items():
    if label not in SETUPS:
      continue
    source = SETUPS[label][4]
    if isinstance(plan, str):
      lines.append(f"| {label} | | | | | | | | | | | | {plan} | | {source} |")
      continue
    s, m, a, c, st = plan["setup"], plan["mesh"], plan["analytic"], plan["compiled"], plan["state"]
    copies = sum(v for k, v in a.items() if k.startswith("copies_"))
    lines.append(
      f"| {label} | {m['data'] * m['expert'] * m['model']} × {plan['device']} | {m['data']}×{m['expert']}×{m['model']} "
      f"| {s['sequences_per_device_microbatch']:g} | {s['expert_rows_per_device']:,.0f} "
      f"| {_g(st['params'] + st['opt_state'])} | {_g(a['gradients'] + copies)} | {_g(a['activations'])} "
      f"| {_g(c['temp'])} | {_g(a['peak'])} | {_g(c['peak'])} | {_g(plan['usable_bytes'])} | {plan['fits']['verdict']} "
      f"| {plan['compile_seconds']:.0f} | {source} |"
    )
  remat = {label: plan for label, plan in rows.items() if label in REMAT or label == "mixtral_8x7b"}
  if remat:
    lines += [
      "",
      "## Remat policies (mixtral_8x7b, 64 × h100-80gb, data 8 × expert 8, FSDP, 16 micro-batches of one sequence)",
      "",
      "| model.remat | scan_layers | activations (formula) | kept (formula) | XLA temp | temp − grads − copies | compile s |",
      "|:---|:---|---:|---:|---:|---:|---:|",
    ]
    for label, plan in remat.items():
      if isinstance(plan, str):
        lines.append(f"| {label} | | | | {plan} | | |")
        continue
      s, a, c = plan["setup"], plan["analytic"], plan["compiled"]
      lines.append(
        f"| {s['remat']} | {'on' if s['scan_layers'] else 'off'} | {_g(a['activations'])} | {_g(a['activations_kept'])} "
        f"| {_g(c['temp'])} | {_g(c['activations_derived'])} | {plan['compile_seconds']:.0f} |"
      )
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=DEFAULT_OUT)
  parser.add_argument("--only", default="", help="comma-separated labels of SETUPS and REMAT (default: all)")
  parser.add_argument("--timeout", type=int, default=600, help="seconds per preset")
  args = parser.parse_args(argv)
  labels = [x for x in args.only.split(",") if x] or list(ALL)
  unknown = sorted(set(labels) - set(ALL))
  if unknown:
    print(f"error: --only: unknown labels {unknown}; choose from {', '.join(ALL)}", file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()
  rows = {}
  for label in labels:
    began = time.perf_counter()
    cmd = command(label, args.out)
    try:
      result = subprocess.run(
        cmd,
        check=False,
        cwd=framework.REPO,
        capture_output=True,
        text=True,
        timeout=args.timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
      )
      ok = result.returncode == 0
      outcome = "" if ok else (result.stderr.strip().splitlines() or ["failed"])[-1][:200]
    except subprocess.TimeoutExpired:
      ok, outcome = False, f"not planned: compile took over {args.timeout} s"
    print(f"{label}: {time.perf_counter() - began:.0f} s{'' if ok else ' ' + outcome}", flush=True)
    if ok:
      with open(os.path.join(args.out, _file(label))) as f:
        rows[label] = json.load(f)
    else:
      rows[label] = outcome
  header = [
    *framework.where_and_when(),
    (
      f"command: python -m experiments.plan_presets{' --only ' + args.only if args.only else ''}; "
      f"wall time {time.perf_counter() - start:.0f} s"
    ),
    "each row: python -m moejax.plan --config=configs/architectures.py:<preset> --mesh=... --device=... "
    + " ".join(f"--config.{k}={v}" for k, v in COMMON.items())
    + " (+ the row's micro-batches, and its own overrides)",
  ]
  with open(os.path.join(args.out, "presets.md"), "w") as f:
    f.write(markdown(rows, header))
  print("\n".join(header))
  return 0


if __name__ == "__main__":
  sys.exit(main())
