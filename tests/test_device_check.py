"""The GPU check script (experiments/device_check.py) lowers every part for CUDA at its full sizes.

Run on CPU, so nothing is timed; the figures come from a run on a lent GPU (the script's docstring).
"""

import json


def test_every_part_lowers_for_cuda_at_full_size(tmp_path):
  from experiments import device_check

  result = device_check.main(["--lower_only", "--out", str(tmp_path)])
  assert result["mode"] == "lower_only"
  for part in device_check.CHECKS:
    figures = result[part]
    assert "error" not in figures, figures.get("traceback")
    assert any(k.endswith("_lowered_chars") for k in figures), (part, figures)
  assert result["permute"]["pallas_permute_is_triton"] and result["permute"]["pallas_unpermute_is_triton"]
  # The ~1B-parameter MoE of the MFU part, as counted by moejax.accounting.
  assert 1.0e9 < result["mfu"]["total_params"] < 1.6e9 and result["mfu"]["active_params"] < 0.6e9
  assert json.loads((tmp_path / "device_check.json").read_text())["mfu"]["tokens_per_step"] == 8 * 2048
  assert "## permute" in (tmp_path / "device_check.md").read_text()
