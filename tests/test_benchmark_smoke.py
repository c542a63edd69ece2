"""Smoke test of `python -m experiments.moe_layer_benchmark --quick`: files and columns, no timings."""

import importlib.util
import math

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
