"""Smoke test of `python -m experiments.moe_layer_benchmark --quick`: files and columns, no timings."""

import importlib.util
import math

import pytest

from experiments import moe_layer_benchmark as bench


def test_quick_benchmark_writes_reports(tmp_path, capsys):
  bench.main(["--quick", "--out", str(tmp_path)])

  rows = bench.read_csv(tmp_path / "results.csv")
  assert list(rows[0]) == list(bench.COLUMNS)
  args = bench.parse_args(["--quick"])
  moe = [r for r in rows if r["variant"] in bench.MOE_VARIANTS]
  dense = [r for r in rows if r["variant"] in bench.DENSE_VARIANTS]
  # One row per (E, k, tokens) and MoE variant; one per (k, tokens) and dense baseline.
  assert len(moe) == len(args.experts) * len(args.top_k) * len(args.tokens) * len(bench.MOE_VARIANTS)
  assert len(dense) == len(args.top_k) * len(args.tokens) * len(bench.DENSE_VARIANTS)
  ratio_columns = ("ms", "ratio_to_dense_active", "ratio_to_dense_padded", "ratio_to_einsum", "routing_share")
  for row in moe:
    for column in ratio_columns:
      value = float(row[column])
      assert math.isfinite(value) and value > 0, (row, column)
  for row in dense:
    assert row["E"] == "" and row["ratio_to_einsum"] == "" and row["routing_share"] == ""
    for column in ratio_columns[:3]:
      value = float(row[column])
      assert math.isfinite(value) and value > 0, (row, column)
  # einsum against itself.
  assert all(float(r["ratio_to_einsum"]) == 1.0 for r in moe if r["variant"] == "einsum")

  header = [line for line in open(tmp_path / "results.csv") if line.startswith("#")]
  assert any("device:" in line for line in header) and any("jax " in line for line in header)
  report = (tmp_path / "results.md").read_text()
  assert "| tokens | k | E | variant |" in report and "jax " in report
  if importlib.util.find_spec("matplotlib") is not None:  # Not a declared dependency.
    assert (tmp_path / "ratios.png").stat().st_size > 0
  printed = capsys.readouterr().out
  assert "Issue-#4 CPU targets:" in printed and "dropless" in printed


def test_quick_serving_study_writes_reports(tmp_path):
  """`python -m experiments.inference --quick`: a row per (phase, length, batch, variant), and the
  decode roofline's byte counts by hand."""
  from experiments import inference

  inference.main(["--quick", "--out", str(tmp_path)])
  rows = bench.read_csv(tmp_path / "results.csv")
  args = inference.parse_args(["--quick"])
  assert list(rows[0]) == list(inference.COLUMNS)
  assert len(rows) == 2 * len(args.lengths) * len(args.batches) * len(inference.VARIANTS)
  for row in rows:
    assert float(row["ms"]) > 0 and float(row["tokens_per_s"]) > 0
  # Decode with B = 1 and 4 (K = 2: N = 2, 8 <= 4·E): the auto path gathers; prefill of 4·4 = 16 tokens (32) too.
  paths = {(r["phase"], r["batch"], r["variant"]): r["expert_path"] for r in rows}
  assert paths["decode", "4", "moe_dropless"] == "gather" and paths["decode", "4", "moe_blocks"] == "blocks"
  assert paths["decode", "1", "moe_capacity"] == "capacity" and paths["decode", "1", "dense_total"] == ""
  # One routed expert of the quick MoE: GELU wi [d, f] and wo [f, d], no biases.
  model = inference.build("moe_blocks", args, 8)
  other, per_expert = inference._param_split(model)
  assert per_expert == 2 * args.d * args.f
  # Experts hit by B·K uniform choices, by hand: 2 at B = 1; 8·(1 - (3/4)^4) = 5.46875 at B = 4.
  for batch, hit in ((1, 2.0), (4, 5.46875)):
    line = inference.roofline("moe_blocks", model, batch, 8, 1.0, 1.0)
    assert math.isclose(line["weights"], 4 * (other + args.layers * hit * per_expert))
    assert line["cache"] == 4 * 2 * args.layers * batch * 8 * args.d  # k and v of every block, float32
    gathered = inference.roofline("moe_dropless", model, batch, 8, 1.0, 1.0)  # + a copy written and read a choice
    assert math.isclose(gathered["weights"], 4 * (other + args.layers * (hit + 2 * 2 * batch) * per_expert))
  capacity = inference.roofline("moe_capacity", model, 1, 8, 1.0, 1.0)
  assert capacity["weights"] == 4 * (other + args.layers * inference.E * per_expert)
  report = (tmp_path / "results.md").read_text()
  assert "## Decode" in report and "measured / predicted" in report


def test_quick_remat_memory_writes_reports(tmp_path):
  """`python -m experiments.remat_memory --quick`: a row per policy, ratios to 'none' from the same run."""
  from experiments import remat_memory
  from moejax.models.remat import POLICIES

  rows = remat_memory.main(["--quick", "--out", str(tmp_path)])
  assert [r["policy"] for r in rows] == list(POLICIES) and rows[0]["x_temp"] == 1.0
  assert all(r["temp_mb"] > 0 and r["compile_s"] > 0 and r["step_ms"] > 0 for r in rows)
  kept = {r["policy"]: r["kept_mb"] for r in rows}
  assert kept["full"] < kept["dots"] < kept["none"] and kept["full"] < kept["moe"] < kept["none"]
  assert "| policy | kept for backward MB |" in (tmp_path / "results.md").read_text()


def test_quick_scan_layers_writes_reports(tmp_path):
  """`python -m experiments.scan_layers --quick`: unrolled then scanned (2 blocks: the scan's program
  is not shorter at this size), the same loss, ratios to the unrolled run."""
  from experiments import scan_layers

  rows = scan_layers.main(["--quick", "--out", str(tmp_path)])
  assert [r["scan_layers"] for r in rows] == [False, True] and rows[0]["x_hlo"] == 1.0
  assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-6)
  assert rows[1]["x_hlo"] == pytest.approx(rows[1]["hlo_kchars"] / rows[0]["hlo_kchars"])
  assert "| scan_layers | HLO k chars |" in (tmp_path / "results.md").read_text()
