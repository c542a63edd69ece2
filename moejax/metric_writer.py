"""Where training metrics go: TensorBoard event files, a JSON-lines log, and the console.

`metrics.jsonl` holds one JSON object per logged step ({"step", "split", name: value, ...});
after a resume, steps between the checkpoint and the interruption appear twice and the later
line is the one to keep (`read_metrics` does that).
"""

from __future__ import annotations

import json
import math
import os
import time


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class MetricWriter:
  """Writes scalars to TensorBoard (tensorboardX) and metrics.jsonl; only process 0 writes."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      from tensorboardX import SummaryWriter  # Local: only the writing process needs it.

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(f"{split}/{name}", value, step)
    row = {"step": step, "split": split, **{k: _json_float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def _json_float(value: float):
  value = float(value)
  return value if math.isfinite(value) else str(value)


def read_metrics(workdir: str, split: str = "train") -> dict[int, dict]:
  """{step: row} of metrics.jsonl for one split; for a step logged twice the last row wins."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if row["split"] == split:
        rows[row["step"]] = row
  return dict(sorted(rows.items()))


class Progress:
  """Console line: step, loss, steps/s, tokens/s and ETA, measured since the last report."""

  def __init__(self, total_steps: int, tokens_per_step: int, first_step: int):
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self._last_step = first_step
    self._last_time = None

  def start(self, step: int) -> None:
    """Start the clock after `step` (called once the first step has compiled)."""
    self._last_step, self._last_time = step, time.perf_counter()

  def report(self, step: int, loss: float, extra: str = "") -> str:
    now = time.perf_counter()
    if self._last_time is None or step == self._last_step:
      rate_text = "compiling"
    else:
      steps_per_s = (step - self._last_step) / (now - self._last_time)
      eta = (self.total_steps - step) / steps_per_s
      rate_text = (
        f"{steps_per_s:.2f} steps/s | {steps_per_s * self.tokens_per_step:,.0f} tokens/s | ETA {format_duration(eta)}"
      )
    self._last_step, self._last_time = step, now
    return f"step {step}/{self.total_steps} | loss {loss:.4f} | {rate_text}{extra}"
