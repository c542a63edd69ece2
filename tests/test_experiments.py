"""Every experiment of issue #6 runs end to end at the 'smoke' scale, so none can rot.

Each trains all its variants (one seed; two for fine_grained, the cheapest, so that ± std is exercised)
for a few steps of a tiny model, then writes the CSV, Markdown, LaTeX and plots; the tables are
checked against the runs' own summary.json files.
"""

import csv
import importlib
import importlib.util
import json

import numpy as np
import pytest

from experiments import framework

EXPERIMENTS = [
  "routing_families",
  "capacity_factor",
  "num_experts",
  "vision",
  "load_balancing",
  "fine_grained",
  "upcycling",
  "finetune",
]
# Smoke runs in the default suite: one of each kind (an LM comparison with a baseline, the ViT,
# runs that start from another variant's checkpoint, eval curves with freezing and LoRA). The
# others are marked slow: their framework path is one of these, each of their variants is a preset
# that tests/test_router_training.py trains, and test_paper_scale_configs_are_valid checks their
# configs; CI runs them too (-m slow).
SMOKE_BY_DEFAULT = ("capacity_factor", "vision", "upcycling", "finetune")


@pytest.mark.parametrize(
  "name", [n if n in SMOKE_BY_DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in EXPERIMENTS]
)
def test_experiment_runs_at_smoke_scale(tmp_path, name, monkeypatch, capsys):
  monkeypatch.setenv("MOEJAX_DATA_DIR", str(tmp_path.parent / "tfds"))  # Shared by the experiments.
  experiment = importlib.import_module(f"experiments.{name}").EXPERIMENT
  seeds = "0,1" if name == "fine_grained" else "0"
  out = tmp_path / "out"
  # No copying from sibling tests' runs: each test trains its own variants.
  common = ["--scale", "smoke", "--out", str(out), "--seeds", seeds, "--reuse-from", ""]
  assert framework.main(experiment, common) == 0
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
  assert len(rows) == len(experiment.variants) * len(seeds.split(","))
  for row in rows:
    summary = json.loads((out / "runs" / row["variant"] / f"seed{row['seed']}" / "summary.json").read_text())
    assert summary["step"] == framework.SMOKE_LM["train.num_steps"]
    for field in ("eval_cross_entropy", "total_params", "train_flops_per_token"):
      assert float(row[field]) == pytest.approx(summary[field])
  report = (out / "results.md").read_text()
  assert all(f"| {v.label} |" in report for v in experiment.variants)
  assert "Published:" in report
  tex = (out / "results.tex").read_text()
  assert tex.startswith(r"\begin{tabular}") and r"\bottomrule" in tex
  if name == "fine_grained":  # Two seeds: mean ± std, and the std is a sample std.
    dense = [float(r["eval_cross_entropy"]) for r in rows if r["variant"] == "dense"]
    assert f"{np.mean(dense):.4f} ± {np.std(dense, ddof=1):.4f}" in report
    assert r"\pm" in tex
  if importlib.util.find_spec("matplotlib") is not None:
    for picture in ("loss_vs_step.png", "loss_vs_flops.png", "loss_vs_time.png", "expert_load.png"):
      assert (out / picture).stat().st_size > 0, picture
  # Running again trains nothing: every run is skipped.
  mtimes = {p: p.stat().st_mtime for p in out.glob("runs/*/*/summary.json")}
  assert framework.main(experiment, common) == 0
  assert {p: p.stat().st_mtime for p in out.glob("runs/*/*/summary.json")} == mtimes
  if name == "capacity_factor":  # A changed setting never reuses (or overwrites) the runs of another.
    capsys.readouterr()
    assert framework.main(experiment, common + ["--set", "model.d_ff=48"]) == 2
    err = capsys.readouterr().err
    assert "--out:" in err and "model.d_ff=64->48" in err and err.count("\n") == 1
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/*/summary.json")} == mtimes


def test_bad_arguments_are_refused(capsys):
  experiment = importlib.import_module("experiments.capacity_factor").EXPERIMENT
  with pytest.raises(SystemExit) as exit_info:
    framework.main(experiment, ["--only", "cf9"])
  assert exit_info.value.code == 2
  assert "unknown variant(s) cf9" in capsys.readouterr().err
  for bad, says in (
    (["--set", "mesh.expert"], "--set takes FIELD=VALUE"),
    (["--set", "seed=3"], "the seeds come from --seeds"),
  ):
    with pytest.raises(SystemExit) as exit_info:
      framework.main(experiment, bad)
    assert exit_info.value.code == 2 and says in capsys.readouterr().err
  for bad, says in (
    (["--set", "model.no_such=1"], "unknown config field"),
    (["--set", "nogroup.x=1"], "unknown config field"),
    (["--set", "model.d_ff=wide"], "model.d_ff: --set value 'wide' does not fit"),
  ):
    assert framework.main(experiment, ["--scale", "smoke", "--only", "dense", "--out", "/nonexistent"] + bad) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err


def test_steps_to_reach_and_smoothing_by_hand():
  curve = {"step": np.array([10.0, 20, 30, 40, 50, 60]), "loss": np.array([5.0, 4, 3, 2, 1, 1])}
  # Trailing means over 5 logs: 5, 4.5, 4, 3.5, 3, 2.2.
  np.testing.assert_allclose(framework._smooth(curve["loss"]), [5, 4.5, 4, 3.5, 3, 2.2])
  assert framework.steps_to_reach(curve, 3.5) == 40
  assert np.isnan(framework.steps_to_reach(curve, 1.0))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_paper_scale_configs_are_valid(name):
  """The accelerator-scale configs are never trained here; they must at least stay valid configs."""
  from moejax import config as config_lib
  from moejax.count_params import cost_of

  experiment = importlib.import_module(f"experiments.{name}").EXPERIMENT
  assert "paper" in experiment.scales
  for variant in experiment.variants:
    cfg = framework.run_config(experiment, variant, "paper", seed=0)
    config_lib.validate(cfg, num_devices=8)
    if cfg.task == "lm":  # A paper-scale LM is bigger than its quick-scale counterpart.
      quick = framework.run_config(experiment, variant, "quick", seed=0)
      assert cost_of(cfg).active_params > 10 * cost_of(quick).active_params


def test_a_finished_run_of_the_same_config_is_copied_not_retrained(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("MOEJAX_DATA_DIR", str(tmp_path / "tfds"))
  first = importlib.import_module("experiments.capacity_factor").EXPERIMENT
  second = importlib.import_module("experiments.routing_families").EXPERIMENT
  common = ["--scale", "smoke", "--only", "dense", "--seeds", "0", "--reuse-from", str(tmp_path / "results")]
  assert framework.main(first, common + ["--out", str(tmp_path / "results" / "a" / "smoke")]) == 0
  trained = tmp_path / "results" / "a" / "smoke" / "runs" / "dense" / "seed0"
  capsys.readouterr()
  assert framework.main(second, common + ["--out", str(tmp_path / "results" / "b" / "smoke")]) == 0
  copy = tmp_path / "results" / "b" / "smoke" / "runs" / "dense" / "seed0"
  assert "copied, not trained again" in capsys.readouterr().out
  assert (copy / "copied_from.txt").read_text().strip() == "../../../../../a/smoke/runs/dense/seed0"
  for name in ("config.json", "metrics.jsonl", "summary.json"):
    assert (copy / name).read_bytes() == (trained / name).read_bytes()
  assert not (copy / "checkpoints").exists()
  # Another config is trained, not copied.
  assert (
    framework.main(second, common + ["--out", str(tmp_path / "results" / "c" / "smoke"), "--set", "model.d_ff=48"]) == 0
  )
  assert "copied" not in capsys.readouterr().out
  assert (tmp_path / "results" / "c" / "smoke" / "runs" / "dense" / "seed0" / "checkpoints").is_dir()


def test_set_values_take_the_field_type_and_are_recorded():
  experiment = importlib.import_module("experiments.vision").EXPERIMENT
  variant = experiment.variant("dense")
  cfg = framework.run_config(
    experiment,
    variant,
    "paper",
    0,
    {"data.tfds.name": 2024, "optim.learning_rate": "inf", "model.num_layers": 2, "mesh.fsdp": True},
  )
  assert cfg.data.tfds.name == "2024" and cfg.optim.learning_rate == float("inf")
  assert cfg.model.num_layers == 2 and cfg.mesh.fsdp is True
  header = framework.header_lines(experiment, "paper", (0,), {"data.tfds.name": "cifar10"})
  assert "settings changed with --set: data.tfds.name='cifar10'" in header


def test_config_flags_are_accepted_as_for_moejax_main():
  experiment = importlib.import_module("experiments.capacity_factor").EXPERIMENT
  args = framework.parse_args(
    experiment, ["--config.mesh.expert=8", "--config.model.d_ff", "48", "--set", "data.tfds.name=c4"]
  )
  assert args.set == {"mesh.expert": 8, "model.d_ff": 48, "data.tfds.name": "c4"}
