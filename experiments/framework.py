"""Declarative multi-seed experiments: train every (variant, seed), then tables and plots.

An experiment file in `experiments/` defines one `Experiment` and ends with

  if __name__ == "__main__":
    sys.exit(framework.main(EXPERIMENT))

so that `python -m experiments.<name> [--scale quick|paper|smoke] [--out DIR] [--seeds 0,1,2]
[--only LABELS] [--config.FIELD=VALUE ...]` (`--set FIELD=VALUE` is the same)
trains every variant for every seed into `<out>/runs/<variant>/seed<k>/` (a normal moejax
workdir: metrics.jsonl, checkpoints, summary.json), skipping runs that already finished,
resuming runs that were interrupted, and copying a run whose exact config another experiment
has already finished (under --reuse-from, default experiments/results: the experiments share
baselines), then writes into `<out>/`:

  results.csv         one row per (variant, seed): final losses, steps to the baseline's loss,
                      parameters, FLOPs, wall time, expert balance
  results.md          mean ± std over seeds per variant, and what the paper found
  results.tex         the same table as a LaTeX tabular (booktabs)
  loss_vs_step.png, loss_vs_flops.png, loss_vs_time.png   train loss (mean over seeds, ± std band)
  expert_load.png     share of tokens per expert over training, per MoE layer (seed 0 of each MoE variant)

Scales: 'smoke' (a few steps of a tiny model: what the test suite runs, so no experiment rots),
'quick' (2 CPU cores, about 15 minutes or less per experiment) and 'paper' (accelerators).
Default output: experiments/results/<name>/<scale>.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import datetime
import glob
import importlib.util
import json
import os
import platform
import shutil
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALES = ("smoke", "quick", "paper")
SMOOTH = 5  # Train losses are averaged over this many logged steps before comparing runs.

# The 'quick' scale of the LM experiments: the configs/lm_routers.py model (4 blocks, d = 96), 250
# steps of 16 sequences of 64 tokens: about 40 s per run on 2 CPU cores, so 3 seeds of 6
# variants fit in about 15 minutes. Eval once, at the end.
QUICK_LM = {
  "train.batch_size": 16,
  "train.num_steps": 250,
  "train.log_every": 5,
  "train.eval_every": 0,
  "train.checkpoint_every": 250,
}
# The 'paper' scale of the LM experiments: a 12-block d = 768 decoder on C4 (prepared with TFDS,
# byte-tokenized), 100k steps of 256 × 512 tokens; for an accelerator pod (set mesh.* too).
PAPER_LM = {
  "model.num_layers": 12,
  "model.d_model": 768,
  "model.num_heads": 12,
  "model.d_ff": 3072,
  "train.seq_len": 512,
  "train.batch_size": 256,
  "train.num_steps": 100_000,
  "data.source": "tfds",
  "data.tfds.name": "c4",
  "train.log_every": 100,
  "train.eval_every": 5000,
  "train.checkpoint_every": 5000,
}

# A tiny model for the 'smoke' scale (overrides, applied after the experiment's own).
SMOKE_LM = {
  "model.num_layers": 2,
  "model.d_model": 32,
  "model.num_heads": 2,
  "model.d_ff": 64,
  "train.seq_len": 16,
  "train.batch_size": 8,
  "train.num_steps": 3,
  "train.log_every": 1,
  "train.eval_every": 0,
  "train.checkpoint_every": 3,
  "optim.warmup_steps": 1,
  "data.markov.vocab_size": 16,
  "data.markov.num_train": 64,
  "data.markov.num_validation": 16,
  "data.num_eval_batches": 1,
}
SMOKE_VIT = {
  "model.num_layers": 2,
  "model.d_model": 32,
  "model.num_heads": 2,
  "model.d_ff": 64,
  "train.batch_size": 8,
  "train.num_steps": 3,
  "train.log_every": 1,
  "train.eval_every": 0,
  "train.checkpoint_every": 3,
  "optim.warmup_steps": 1,
  "data.num_eval_batches": 1,
}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One arm of an experiment: a config file (with its preset) and overrides."""

  label: str
  config: str  # 'configs/<file>.py[:preset]', relative to the repository
  overrides: dict = dataclasses.field(default_factory=dict)
  note: str = ""  # Shown in the table (e.g. "not causal: sees the future").
  # The label of an earlier variant whose final checkpoint (same seed, same --out) this one starts
  # from (init.checkpoint; e.g. upcycling, fine-tuning). That variant is always trained here, not
  # copied from another experiment: its checkpoint is needed.
  init_from: str = ""
  per_scale: dict = dataclasses.field(default_factory=dict)  # scale -> overrides after `overrides` (e.g. steps)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What to train and how to report it."""

  name: str
  title: str
  variants: tuple[Variant, ...]
  scales: dict  # scale -> overrides applied to every variant (smoke: on top of SMOKE_LM / SMOKE_VIT)
  seeds: tuple[int, ...] = (0, 1, 2)
  baseline: str | None = None  # label whose final loss defines "steps to reach it"
  paper: str = ""  # What the literature found, for the table's note.
  found: str = ""  # What the quick scale found here, and where it disagrees with the paper.
  metric: str = "eval_cross_entropy"  # summary.json field the table leads with
  # Runs evaluate during training (train.eval_every): the table adds the best eval and how far the
  # final one is above it (over-fitting), and eval_vs_step.png plots the eval curves.
  eval_curves: bool = False

  def variant(self, label: str) -> Variant:
    return next(v for v in self.variants if v.label == label)


def load_config(spec: str):
  """get_config(arg) of 'configs/file.py[:arg]' (as --config does)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(f"_moejax_config_{abs(hash(path))}", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


_NOTED: set = set()  # (variant, field) whose unread --config setting was reported.


def run_dir(out: str, label: str, seed: int) -> str:
  return os.path.join(out, "runs", label, f"seed{seed}")


def run_config(
  experiment: Experiment, variant: Variant, scale: str, seed: int, extra: dict | None = None, out: str = ""
):
  """The full config of one run; `extra` (--set) is applied last, to every variant.

  out: the experiment's output directory, where a variant with `init_from` finds its source run.
  """
  from moejax.config import ConfigError, override, schema

  cfg = load_config(variant.config)
  values = dict(experiment.scales.get(scale, {}))
  if scale == "smoke":
    values = {**(SMOKE_LM if cfg.task == "lm" else SMOKE_VIT), **values}
  values.update(variant.overrides)
  values.update(variant.per_scale.get(scale, {}))
  if scale == "smoke":  # Whatever the variant sets, smoke runs stay tiny.
    values.update(
      {
        k: v
        for k, v in (SMOKE_LM if cfg.task == "lm" else SMOKE_VIT).items()
        if k.startswith(("train.", "data.")) or k == "optim.warmup_steps"
      }
    )
  values["seed"] = seed
  source = None
  if variant.init_from:
    labels = [v.label for v in experiment.variants]
    if variant.init_from not in labels[: labels.index(variant.label)]:
      raise ValueError(f"variant {variant.label}: init_from {variant.init_from!r} is not a variant listed before it")
    values["init.checkpoint"] = os.path.abspath(run_dir(out or ".", variant.init_from, seed))
    source = run_config(experiment, experiment.variant(variant.init_from), scale, seed, extra, out)
  cfg = override(cfg, values)
  if source is not None and cfg.data.to_dict() == source.data.to_dict() and cfg.seed == source.seed:
    # The same data as the run it continues: go on to the batches that run has not seen.
    cfg.train.data_offset = source.train.data_offset + source.train.num_steps
  for field, value in (extra or {}).items():
    try:
      override(cfg, {field: _as_type_of(cfg, field, value)})
    except KeyError:
      raise ConfigError(field, "unknown config field (--set)") from None
    except (TypeError, ValueError):
      raise ConfigError(field, f"--set value {value!r} does not fit the field's type") from None
  # A setting for every run that this run does not read (a moe.* field for the dense baseline, an
  # option of another router family) stays at its default here, and says so: the run could not use it.
  unread = schema.inactive_fields(cfg)
  defaults, current = schema.flatten(schema.base_config(cfg.task)), schema.flatten(cfg)
  for field in extra or {}:
    if field in unread and current[field] != defaults[field]:
      override(cfg, {field: defaults[field]})
      if (variant.label, field) not in _NOTED:
        _NOTED.add((variant.label, field))
        print(
          f"note: {variant.label}: --config.{field} is not used by this run ({unread[field]}); left at its default",
          flush=True,
        )
  return cfg


def _as_type_of(cfg, field: str, value):
  """value, or its text where the field holds a string (e.g. a dataset named 2024), or a float
  where it holds a float (nan, inf)."""
  node = cfg
  for part in field.split("."):
    node = node[part]
  if isinstance(node, str) and not isinstance(value, str):
    return str(value)
  if isinstance(node, float) and isinstance(value, str):
    return float(value)
  return value


def finished_twin(cfg, search_root: str, exclude: str = "") -> str | None:
  """A finished run in <search_root>/<experiment>/<scale>/runs/<label>/<seed>/ of `cfg`, or None.

  "Of cfg": every field the run reads is equal (`moejax.config.differences`).

  The experiments share baselines (the quick-scale dense model is one config in four of them):
  such a run is trained once and copied.
  """
  from moejax import config as config_lib

  want = cfg.to_dict()
  for config_path in sorted(glob.glob(os.path.join(search_root, "*", "*", "runs", "*", "*", "config.json"))):
    run = os.path.dirname(config_path)
    if exclude and os.path.abspath(run) == os.path.abspath(exclude):
      continue
    try:
      with open(config_path) as f:
        saved = json.load(f)
      with open(os.path.join(run, "summary.json")) as f:
        finished = json.load(f).get("step") == cfg.train.num_steps
    except (OSError, ValueError):  # Unreadable or unfinished: not a twin.
      continue
    if finished and not config_lib.differences(saved, want):  # Every field the run reads is equal.
      return run
  return None


def _same_source(old: str, new: str) -> bool:
  """Whether two init.checkpoint paths name the same runs/<label>/seed<k> (under different --out or clones)."""
  tail = lambda path: os.path.normpath(path).split(os.sep)[-3:]
  return bool(old) and bool(new) and tail(old) == tail(new) and tail(new)[0] == "runs"


def train_run(cfg, workdir: str, reuse_from: str | None = None) -> str:
  """Trains (or resumes) one run: 'trained', 'copied' (see reuse_from) or 'skipped' (finished earlier).

  reuse_from: a results root (see `finished_twin`); a finished run there with exactly this
  config is copied into `workdir` (metrics, summary, config; not its checkpoints) instead of
  trained again.
  """
  import jax

  from moejax import config as config_lib
  from moejax import tasks, train

  resolved = cfg.to_dict()
  saved_path = os.path.join(workdir, "config.json")
  if os.path.exists(saved_path):
    # A run started from another variant's (init_from) names it by absolute path: the same run in a
    # clone elsewhere, or with --out moved, is the same source (runs/<label>/seed<k> under --out).
    with open(saved_path) as f:
      saved_source = json.load(f).get("init", {}).get("checkpoint", "")
    if _same_source(saved_source, resolved["init"]["checkpoint"]):
      resolved["init"]["checkpoint"] = saved_source
  differ, _ = config_lib.differences_from_saved(workdir, resolved)
  if differ:
    raise config_lib.ConfigError(
      "--out",
      f"{workdir} holds a run of another config ({', '.join(differ[:3])}); use another --out, or delete that run",
    )
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    if summary.get("step") == cfg.train.num_steps:
      return "skipped"
  config_lib.validate(cfg, jax.device_count())
  twin = (
    None
    if os.path.exists(os.path.join(workdir, "config.json")) or not reuse_from
    else (finished_twin(cfg, reuse_from, exclude=workdir))
  )
  if twin:
    shutil.copytree(twin, workdir, ignore=shutil.ignore_patterns("checkpoints"), dirs_exist_ok=True)
    with open(os.path.join(workdir, "copied_from.txt"), "w") as f:
      f.write(f"{os.path.relpath(twin, workdir)}\n")
    print(f"the finished run {twin} has exactly this config: copied, not trained again", flush=True)
    return "copied"
  data = tasks.make_data(cfg)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
  code = train.train_and_evaluate(cfg, workdir, data)
  if code != 0:
    raise RuntimeError(f"training in {workdir} stopped with status {code}")
  return "trained"


# ----------------------------------------------------------------------------- analysis


def _curve(workdir: str, metric: str = "eval_cross_entropy") -> dict[str, np.ndarray]:
  """Train curves of one run: step, loss, wall time, per-layer expert loads."""
  from moejax.metric_writer import read_metrics

  rows = [row for _, row in sorted(read_metrics(workdir).items())]
  curve = {
    "step": np.array([r["step"] for r in rows], float),
    "loss": np.array([r.get("cross_entropy", r["loss"]) for r in rows], float),
    "time": np.array([r.get("wall_time_s", np.nan) for r in rows], float),
  }
  layers = sorted({k.split("/")[0] for r in rows[:1] for k in r if k.startswith("moe_layer") and "/load_e" in k})
  for layer in layers:
    experts = sorted(k for k in rows[0] if k.startswith(layer + "/load_e"))
    curve[layer] = np.array([[r[k] for k in experts] for r in rows], float)  # [steps, E]
  evals = [row for _, row in sorted(read_metrics(workdir, split="eval").items())]
  curve["eval_step"] = np.array([r["step"] for r in evals], float)
  curve["eval"] = np.array([r.get(metric.removeprefix("eval_"), np.nan) for r in evals], float)
  balance = [k for k in rows[-1] if k.endswith("/max_over_mean_load")]
  curve["max_over_mean_load"] = float(np.mean([rows[-1][k] for k in balance])) if balance else float("nan")
  return curve


def _best(evals: np.ndarray, metric: str) -> float:
  """The best of a run's evals: the lowest loss, or the highest accuracy."""
  if not evals.size:
    return float("nan")
  return float(np.max(evals) if "accuracy" in metric else np.min(evals))


def _smooth(values: np.ndarray) -> np.ndarray:
  """Trailing mean over SMOOTH logged steps."""
  out = np.empty_like(values)
  for i in range(len(values)):
    out[i] = values[max(0, i - SMOOTH + 1) : i + 1].mean()
  return out


def steps_to_reach(curve: dict, target: float) -> float:
  """First logged step whose smoothed train loss is <= target; nan if never."""
  hit = np.flatnonzero(_smooth(curve["loss"]) <= target)
  return float(curve["step"][hit[0]]) if hit.size else float("nan")


COLUMNS = (
  "variant",
  "seed",
  "eval_cross_entropy",
  "eval_accuracy",
  "final_train_loss",
  "steps_to_baseline",
  "speedup_vs_baseline",
  "total_params",
  "trained_params",
  "active_params_per_token",
  "train_flops_per_token",
  "tokens",
  "wall_time_s",
  "max_over_mean_load",
  "best_eval",
)


def collect(experiment: Experiment, out: str, scale: str, seeds) -> tuple[list[dict], dict]:
  """results.csv rows and the curves, from the runs' workdirs."""
  rows, curves = [], {}
  for variant in experiment.variants:
    for seed in seeds:
      workdir = run_dir(out, variant.label, seed)
      with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
      curves[variant.label, seed] = curve = _curve(workdir, experiment.metric)
      rows.append(
        {
          "variant": variant.label,
          "seed": seed,
          "eval_cross_entropy": summary.get("eval_cross_entropy", float("nan")),
          "eval_accuracy": summary.get("eval_accuracy", float("nan")),
          "final_train_loss": float(_smooth(curve["loss"])[-1]),
          "total_params": summary["total_params"],
          "trained_params": summary.get("trained_params", summary["total_params"]),
          "active_params_per_token": summary["active_params_per_token"],
          "train_flops_per_token": summary["train_flops_per_token"],
          "tokens": summary["tokens_this_run"],
          "wall_time_s": summary["wall_time_s"],
          "max_over_mean_load": curve["max_over_mean_load"],
          "best_eval": _best(curve["eval"], experiment.metric),
        }
      )
  if experiment.baseline:
    for row in rows:
      base = next(r for r in rows if r["variant"] == experiment.baseline and r["seed"] == row["seed"])
      steps = steps_to_reach(curves[row["variant"], row["seed"]], base["final_train_loss"])
      base_steps = steps_to_reach(curves[experiment.baseline, row["seed"]], base["final_train_loss"])
      row["steps_to_baseline"] = steps
      row["speedup_vs_baseline"] = base_steps / steps if steps == steps else float("nan")
  else:
    for row in rows:
      row["steps_to_baseline"] = row["speedup_vs_baseline"] = float("nan")
  return rows, curves


def _mean_std(values) -> tuple[float, float]:
  values = np.asarray([v for v in values if v == v], float)  # nan (never reached): left out
  if not values.size:
    return float("nan"), float("nan")
  return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else float("nan")


def _pm(values, digits: int, latex: bool = False, missing_means: str = "–") -> str:
  """'mean ± std' of the finite values, '(n/N)' when some are nan; missing_means if all are."""
  mean, std = _mean_std(values)
  if mean != mean:
    return missing_means
  missing = sum(1 for v in values if v != v)
  sign = r"\pm" if latex else "±"
  text = f"{mean:.{digits}f} {sign} {std:.{digits}f}" if std == std else f"{mean:.{digits}f}"  # 1 value: no std
  text = f"${text}$" if latex else text
  return text + (f" ({len(values) - missing}/{len(values)})" if missing else "")


def _fields(experiment: Experiment, rows: list[dict]):
  """(header, getter(rows, latex) -> str) pairs of the table's columns."""
  metric = experiment.metric
  digits = 4 if "cross_entropy" in metric else 3
  fields = [
    (metric.replace("_", " "), lambda rs, tex: _pm([r[metric] for r in rs], digits, tex)),
    ("final train loss", lambda rs, tex: _pm([r["final_train_loss"] for r in rs], 4, tex)),
  ]
  if experiment.eval_curves:
    fields += [
      ("best eval", lambda rs, tex: _pm([r["best_eval"] for r in rs], digits, tex)),
      ("final vs best", lambda rs, tex: _pm([abs(r[metric] - r["best_eval"]) for r in rs], digits, tex)),
    ]
  if experiment.baseline:
    fields.append(
      (
        f"speed-up vs {experiment.baseline}",
        lambda rs, tex: _pm([r["speedup_vs_baseline"] for r in rs], 2, tex, missing_means="never"),
      )
    )
  fields += [
    ("params", lambda rs, tex: f"{rs[0]['total_params'] / 1e6:.2f}M"),
  ]
  if any(r["trained_params"] != r["total_params"] for r in rows):
    fields.append(("trained", lambda rs, tex: f"{rs[0]['trained_params'] / 1e6:.3f}M"))
  fields += [
    ("active/token", lambda rs, tex: f"{rs[0]['active_params_per_token'] / 1e6:.2f}M"),
    ("train GFLOPs/token", lambda rs, tex: f"{rs[0]['train_flops_per_token'] / 1e9:.4f}"),
    ("max/mean load", lambda rs, tex: _pm([r["max_over_mean_load"] for r in rs], 2, tex)),
    ("wall s", lambda rs, tex: f"{np.mean([r['wall_time_s'] for r in rs]):.0f}"),
  ]
  return fields


def header_lines(experiment: Experiment, scale: str, seeds, settings: dict | None = None) -> list[str]:
  import jax

  device = jax.devices()[0]
  changed = [f"settings changed with --set: {', '.join(f'{k}={v!r}' for k, v in settings.items())}"] if settings else []
  return (
    [f"experiment: {experiment.name} ({experiment.title}), scale {scale}, seeds {list(seeds)}"]
    + changed
    + [
      f"device: {device.platform} ({getattr(device, 'device_kind', '')}), {jax.device_count()} device(s), "
      f"{os.cpu_count()} CPU cores",
      f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
      f"jax {jax.__version__}, python {platform.python_version()}",
    ]
  )


def markdown(experiment: Experiment, rows, scale: str, seeds, settings: dict | None = None) -> str:
  fields = _fields(experiment, rows)
  lines = [f"# {experiment.title}", ""] + [f"- {h}" for h in header_lines(experiment, scale, seeds, settings)] + [""]
  lines.append(
    "Mean ± std over seeds (sample std); train loss smoothed over the last "
    f"{SMOOTH} logged steps."
    + (
      f" Speed-up: the {experiment.baseline} run's steps to its final "
      "train loss / this variant's (same seed; 'never': not reached)."
      if experiment.baseline
      else ""
    )
  )
  lines += [
    "",
    "| variant | " + " | ".join(h for h, _ in fields) + " | note |",
    "|:---|" + "---:|" * len(fields) + ":---|",
  ]
  for variant in experiment.variants:
    mine = [r for r in rows if r["variant"] == variant.label]
    lines.append(f"| {variant.label} | " + " | ".join(get(mine, False) for _, get in fields) + f" | {variant.note} |")
  if experiment.paper:
    lines += ["", f"Published: {experiment.paper}"]
  if experiment.found and scale == "quick" and not settings:  # Recorded for the default settings only.
    lines += ["", f"Found here (quick scale, recorded in experiments/{experiment.name}.py): {experiment.found}"]
  return "\n".join(lines) + "\n"


def latex(experiment: Experiment, rows) -> str:
  fields = _fields(experiment, rows)
  escape = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("±", r"$\pm$")
  lines = [
    r"\begin{tabular}{l" + "r" * len(fields) + "}",
    r"\toprule",
    "variant & " + " & ".join(escape(h) for h, _ in fields) + r" \\",
    r"\midrule",
  ]
  for variant in experiment.variants:
    mine = [r for r in rows if r["variant"] == variant.label]
    lines.append(escape(variant.label) + " & " + " & ".join(get(mine, True) for _, get in fields) + r" \\")
  lines += [r"\bottomrule", r"\end{tabular}"]
  return "\n".join(lines) + "\n"


def where_and_when() -> list[str]:
  """The header lines of a benchmark's results: the device, the date, jax's and Python's versions."""
  import jax

  device = jax.devices()[0]
  return [
    f"device: {device.device_kind} ({device.platform}), {os.cpu_count()} CPU cores, {platform.node()}",
    f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
    f"jax {jax.__version__}, python {platform.python_version()}",
  ]


def write_csv(path: str, rows: list[dict], header: list[str], columns=COLUMNS, float_format: str = "") -> None:
  """A CSV of `columns` (missing ones empty) after '# ' header lines; floats in float_format if given."""
  with open(path, "w", newline="") as f:
    for line in header:
      f.write(f"# {line}\n")
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      values = {k: row.get(k, "") for k in columns}
      writer.writerow(
        {k: format(v, float_format) if float_format and isinstance(v, float) else v for k, v in values.items()}
      )


def plots(experiment: Experiment, rows, curves, out: str, seeds) -> list[str]:
  """Writes the PNGs; returns their names ([] without matplotlib)."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return []
  written = []
  by = {r["variant"]: r for r in rows}
  tokens_per_step = {label: by[label]["tokens"] / max(1.0, curves[label, seeds[0]]["step"][-1]) for label in by}
  axes_of = {
    "step": ("training step", lambda label, c: c["step"]),
    "flops": (
      "training FLOPs (active)",
      lambda label, c: c["step"] * tokens_per_step[label] * by[label]["train_flops_per_token"],
    ),
    "time": ("wall-clock seconds", lambda label, c: c["time"]),
  }
  for name, (xlabel, x_of) in axes_of.items():
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for variant in experiment.variants:
      runs = [curves[variant.label, s] for s in seeds]
      n = min(len(c["loss"]) for c in runs)
      losses = np.stack([_smooth(c["loss"])[:n] for c in runs])
      x = np.nanmean(np.stack([x_of(variant.label, c)[:n] for c in runs]), axis=0)
      mean, std = losses.mean(0), losses.std(0)
      ax.plot(x, mean, label=variant.label)
      ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"train loss (smoothed over {SMOOTH} logs)")
    if name == "flops":
      ax.set_xscale("log")
    ax.set_title(experiment.title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"loss_vs_{name}.png"), dpi=120)
    plt.close(fig)
    written.append(f"loss_vs_{name}.png")
  if experiment.eval_curves:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for variant in experiment.variants:
      runs = [curves[variant.label, s] for s in seeds]
      n = min(len(c["eval"]) for c in runs)
      if n < 2:  # A run evaluated once (e.g. a pretraining source): no curve.
        continue
      evals = np.stack([c["eval"][:n] for c in runs])
      mean, std = evals.mean(0), evals.std(0)
      line = ax.plot(runs[0]["eval_step"][:n], mean, label=f"{variant.label} eval")[0]
      ax.fill_between(runs[0]["eval_step"][:n], mean - std, mean + std, alpha=0.15, color=line.get_color())
      train = np.stack([_smooth(c["loss"])[: len(runs[0]["loss"])] for c in runs]).mean(0)
      ax.plot(runs[0]["step"], train, ls=":", color=line.get_color(), lw=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy (eval: solid, train: dotted)")
    ax.set_title(experiment.title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "eval_vs_step.png"), dpi=120)
    plt.close(fig)
    written.append("eval_vs_step.png")
  moe = [v for v in experiment.variants if any(k.startswith("moe_layer") for k in curves[v.label, seeds[0]])]
  if moe:
    layers = max(sum(k.startswith("moe_layer") for k in curves[v.label, seeds[0]]) for v in moe)
    fig, grid = plt.subplots(len(moe), layers, figsize=(3.2 * layers, 2.2 * len(moe)), squeeze=False)
    for i, variant in enumerate(moe):
      curve = curves[variant.label, seeds[0]]
      names = sorted(k for k in curve if k.startswith("moe_layer"))
      for j in range(layers):
        ax = grid[i, j]
        if j >= len(names):
          ax.axis("off")
          continue
        load = curve[names[j]]  # [steps, E], shares summing to 1
        image = ax.imshow(
          load.T * load.shape[1],
          aspect="auto",
          cmap="viridis",
          vmin=0,
          vmax=2,
          extent=(curve["step"][0], curve["step"][-1], load.shape[1] - 0.5, -0.5),
        )
        ax.set_title(f"{variant.label} {names[j]}", fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("expert", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=grid, shrink=0.6, label="load / mean load")
    fig.savefig(os.path.join(out, "expert_load.png"), dpi=110)
    plt.close(fig)
    written.append("expert_load.png")
  return written


# ----------------------------------------------------------------------------- command line


def _config_flags_as_set(argv: list[str]) -> list[str]:
  """moejax.main's `--config.a.b=v` (or `--config.a.b v`) as the equivalent `--set a.b=v`."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config.") and "=" in arg:
      out += ["--set", arg[len("--config.") :]]
    elif arg.startswith("--config.") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
      out += ["--set", f"{arg[len('--config.') :]}={argv[i + 1]}"]
      i += 1
    else:
      out.append(arg)
    i += 1
  return out


def parse_args(experiment: Experiment, argv=None) -> argparse.Namespace:
  argv = _config_flags_as_set(sys.argv[1:] if argv is None else list(argv))
  parser = argparse.ArgumentParser(
    description=experiment.title,
    epilog="--config.FIELD=VALUE sets a field of every run, as for moejax.main (the same as --set FIELD=VALUE).",
  )
  parser.add_argument("--scale", default="quick", choices=SCALES)
  parser.add_argument("--out", help=f"output directory (default experiments/results/{experiment.name}/<scale>)")
  parser.add_argument("--seeds", help=f"comma-separated seeds (default {','.join(map(str, experiment.seeds))})")
  parser.add_argument("--only", help="comma-separated variant labels to train (tables need all of them)")
  parser.add_argument(
    "--reuse-from",
    default=os.path.join(REPO, "experiments", "results"),
    metavar="DIR",
    help="copy a finished run of exactly the same config from DIR/<experiment>/<scale>/runs/ "
    "instead of training it again (default: experiments/results; '' turns this off)",
  )
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help="set a config field of every run, after the scale's and the variant's own settings "
    "(repeatable), e.g. --config.data.tfds.name=cifar10 --config.mesh.expert=8 (or "
    "--set mesh.expert=8); use a new --out for results of a changed setting",
  )
  args = parser.parse_args(argv)
  args.out = args.out or os.path.join(REPO, "experiments", "results", experiment.name, args.scale)
  try:
    args.seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else experiment.seeds
  except ValueError:
    parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
  labels = [v.label for v in experiment.variants]
  args.only = args.only.split(",") if args.only else labels
  unknown = [label for label in args.only if label not in labels]
  if unknown:
    parser.error(f"--only: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(labels)}")
  args.set = dict(_field_value(parser, item) for item in args.set)
  if "seed" in args.set:
    parser.error("--set seed=...: the seeds come from --seeds")
  return args


def _field_value(parser: argparse.ArgumentParser, item: str) -> tuple[str, object]:
  """'group.field=value' -> (field, value): numbers, booleans and lists as Python literals, else a string."""
  field, sep, text = item.partition("=")
  if not sep or not field or " " in field:
    parser.error(f"--set takes FIELD=VALUE (e.g. mesh.expert=8), got {item!r}")
  if text.lower() in ("true", "false"):
    return field, text.lower() == "true"
  try:
    return field, ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return field, text


def main(experiment: Experiment, argv=None) -> int:
  """Trains what is missing, then writes the tables and plots; returns an exit status."""
  from moejax.config import ConfigError

  args = parse_args(experiment, argv)
  started = time.time()
  runs = [(v, s) for v in experiment.variants if v.label in args.only for s in args.seeds]
  try:
    configs = [(v, s, run_config(experiment, v, args.scale, s, args.set, out=args.out)) for v, s in runs]
    sources = {v.init_from for v in experiment.variants if v.init_from}
    missing = [
      f"{v.label} starts from {v.init_from}"
      for v, s, _ in configs
      if v.init_from
      and v.init_from not in args.only
      and not os.path.isdir(os.path.join(run_dir(args.out, v.init_from, s), "checkpoints"))
    ]
    if missing:
      raise ValueError(f"--only: {missing[0]}, which is neither selected nor trained (with checkpoints) in {args.out}")
  except (ConfigError, ValueError, KeyError) as e:
    print(f"error: {experiment.name}: {e}", file=sys.stderr)
    return 2
  done = {"trained": 0, "copied": 0, "skipped": 0}
  for i, (variant, seed, cfg) in enumerate(configs):
    workdir = run_dir(args.out, variant.label, seed)
    print(f"[{i + 1}/{len(configs)}] {variant.label} seed {seed} -> {workdir}", flush=True)
    try:  # A source of other variants is trained here, not copied: they need its checkpoint.
      done[train_run(cfg, workdir, reuse_from=None if variant.label in sources else args.reuse_from)] += 1
    except ConfigError as e:
      print(f"error: {experiment.name} {variant.label}: {'' if e.field == '--out' else 'config '}{e}", file=sys.stderr)
      return 2
  if len(args.only) < len(experiment.variants):
    print("trained the selected variants; run without --only for the tables")
    return 0
  rows, curves = collect(experiment, args.out, args.scale, args.seeds)
  header = header_lines(experiment, args.scale, args.seeds, args.set) + [
    f"this command trained {done['trained']} and copied {done['copied']} of {len(configs)} runs (the others had "
    f"finished) in {time.time() - started:.0f} s; each run's wall time is in its summary.json (a copied run, "
    "with copied_from.txt, keeps its original's)"
  ]
  write_csv(os.path.join(args.out, "results.csv"), rows, header)
  report = markdown(experiment, rows, args.scale, args.seeds, args.set)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(report)
  with open(os.path.join(args.out, "results.tex"), "w") as f:
    f.write(latex(experiment, rows))
  pictures = plots(experiment, rows, curves, args.out, args.seeds)
  print(report)
  print(
    f"wrote results.csv, results.md, results.tex{', ' + ', '.join(pictures) if pictures else ''} to {args.out} "
    f"in {time.time() - started:.0f} s"
  )
  return 0
