"""End-to-end training through the CLI: loss falls, bit-exact resume after SIGKILL, SIGTERM, NaN, bad checkpoints."""

import json
import os
import signal
import time

import numpy as np
import pytest

from cli_util import TINY, run_cli, start_cli
from moejax.metric_writer import read_metrics


def test_deepseek_v3_pieces_train_from_the_cli(tmp_path, data_dir):
  # MLA with YaRN, multi-token prediction, V3's group-limited sigmoid routing with its bias.
  workdir = tmp_path / "run"
  result = run_cli(
    workdir, "--config.train.num_steps=30", data_dir=data_dir, config="configs/lm_architectures.py:deepseek_v3"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = list(read_metrics(workdir).values())
  losses = [row["loss"] for row in rows]
  assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
  assert all(row["mtp_loss"] > 0 for row in rows)  # λ·MTP is in the loss.


def _checkpoint_steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def test_training_reduces_loss_and_writes_the_workdir(tmp_path, data_dir):
  workdir = tmp_path / "run"
  result = run_cli(
    workdir,
    "--config.train.num_steps=40",
    "--config.train.eval_every=20",
    "--config.train.checkpoint_every=20",
    "--config.train.keep_checkpoints=1",
    data_dir=data_dir,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "parameters:" in out and "active per token" in out and "training FLOPs per token" in out
  assert "steps/s" in out and "tokens/s" in out and "ETA" in out
  losses = [row["loss"] for row in read_metrics(workdir).values()]
  assert len(losses) == 40
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["eval_cross_entropy"] < summary["unigram_loss"]
  assert summary["eval_gap_to_bayes_floor"] == pytest.approx(summary["eval_cross_entropy"] - summary["bayes_floor"])
  assert summary["eval_gap_to_bayes_floor"] > 0  # Nothing beats the Bayes-optimal predictor.
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["train"]["num_steps"] == 40 and saved["moe"]["num_experts"] == 4
  assert _checkpoint_steps(workdir) == [40]  # keep_checkpoints=1 keeps only the newest.
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir / "tensorboard"))
  # Re-running a finished run resumes at its end and trains nothing more.
  again = run_cli(
    workdir,
    "--config.train.num_steps=40",
    "--config.train.eval_every=20",
    "--config.train.checkpoint_every=20",
    "--config.train.keep_checkpoints=1",
    data_dir=data_dir,
  )
  assert again.returncode == 0 and "already trained to step 40" in again.stdout


def test_resume_after_sigkill_is_bit_exact(tmp_path, data_dir):
  common = ("--config.train.num_steps=16", "--config.train.checkpoint_every=4")
  unbroken = tmp_path / "unbroken"
  assert run_cli(unbroken, *common, data_dir=data_dir).returncode == 0
  broken = tmp_path / "broken"
  # Killed right after issuing the step-8 save: that checkpoint may be half written.
  killed = run_cli(broken, *common, data_dir=data_dir, env={"MOEJAX_TEST_SIGKILL_AT_STEP": "8"})
  assert killed.returncode == -signal.SIGKILL
  newest = max(_checkpoint_steps(broken))
  assert newest in (4, 8)
  # Killed again between checkpoints, after resuming from the newest complete one.
  killed = run_cli(broken, *common, data_dir=data_dir, env={"MOEJAX_TEST_SIGKILL_AT_STEP": "11"})
  assert killed.returncode == -signal.SIGKILL
  assert f"resumed from the checkpoint at step {newest}" in killed.stdout
  newest = max(_checkpoint_steps(broken))
  resumed = run_cli(broken, *common, data_dir=data_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from the checkpoint at step {newest}" in resumed.stdout
  assert not [n for n in os.listdir(broken / "checkpoints") if "tmp" in n]  # Half-written ones are gone.
  a, b = read_metrics(unbroken), read_metrics(broken)
  assert list(a) == list(b) == list(range(1, 17))
  for step in a:  # Same float, bit for bit, at every step.
    assert a[step]["loss"] == b[step]["loss"], step
    assert a[step]["grad_norm"] == b[step]["grad_norm"], step
  assert read_metrics(unbroken, "eval") == read_metrics(broken, "eval")


def test_sigterm_saves_and_exits_cleanly(tmp_path, data_dir):
  workdir = tmp_path / "run"
  proc = start_cli(
    workdir, "--config.train.num_steps=100000", "--config.train.checkpoint_every=1000", data_dir=data_dir
  )
  deadline = time.time() + 120
  while time.time() < deadline:
    if (workdir / "metrics.jsonl").exists() and len(read_metrics(workdir)) >= 3:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  assert "SIGTERM received: saved a checkpoint at step" in out
  saved_step = int(out.split("saved a checkpoint at step ")[1].split(";")[0])
  assert _checkpoint_steps(workdir) == [saved_step]
  assert saved_step >= 3


def test_nonfinite_loss_stops_and_keeps_good_checkpoints(tmp_path, data_dir):
  workdir = tmp_path / "run"
  # An absurd learning rate makes the weights overflow within a few steps.
  result = run_cli(
    workdir,
    "--config.train.num_steps=50",
    "--config.train.checkpoint_every=1",
    "--config.optim.learning_rate=1e30",
    "--config.optim.grad_clip_norm=0",
    "--config.optim.warmup_steps=0",
    data_dir=data_dir,
  )
  assert result.returncode == 1
  line = [l for l in result.stdout.splitlines() if "non-finite loss" in l][0]
  bad_step = int(line.split(" at step ")[1].split(";")[0])
  assert _checkpoint_steps(workdir) and max(_checkpoint_steps(workdir)) < bad_step
  assert f"Newest good checkpoint: step {max(_checkpoint_steps(workdir))}" in line
  assert not (workdir / "summary.json").exists()


# Corrupt-checkpoint runs: a constant learning rate, so that a run of 8 steps may be resumed to 12.
CORRUPT_RUN = ("--config.optim.schedule=constant", "--config.train.checkpoint_every=4")


@pytest.fixture(scope="module")
def unbroken_12_steps(tmp_path_factory, data_dir):
  """read_metrics of 12 unbroken CORRUPT_RUN steps: the reference for a resume."""
  workdir = tmp_path_factory.mktemp("unbroken") / "run"
  result = run_cli(workdir, *CORRUPT_RUN, "--config.train.num_steps=12", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return read_metrics(workdir)


def _garble(path):
  path.write_bytes(b"\x00not a checkpoint\xff" * 8)


def _truncate(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _metadata_file(step_dir):
  """The tree metadata orbax reads first on restore: without it, nothing restores."""
  [path] = step_dir.glob("**/_METADATA")
  return path


def _largest_array_file(step_dir):
  """The largest file of array data (tensorstore's OCDBT chunks): a parameter or moment tensor."""
  return max((p for p in step_dir.glob("**/d/*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize(
  "corrupt",
  [
    pytest.param(lambda step_dir: _garble(_metadata_file(step_dir)), id="garbled_metadata"),
    pytest.param(lambda step_dir: _truncate(_largest_array_file(step_dir)), id="truncated_array_data"),
  ],
)
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, data_dir, unbroken_12_steps, corrupt):
  workdir = tmp_path / "run"
  first = run_cli(workdir, *CORRUPT_RUN, "--config.train.num_steps=8", data_dir=data_dir)
  assert first.returncode == 0, first.stderr[-3000:]
  assert _checkpoint_steps(workdir) == [4, 8]
  corrupt(workdir / "checkpoints" / "8")
  resumed = run_cli(workdir, *CORRUPT_RUN, "--config.train.num_steps=12", data_dir=data_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  [warning] = [line for line in resumed.stdout.splitlines() if line.startswith("warning:")]
  assert warning.startswith("warning: checkpoint at step 8 does not restore (")
  assert warning.endswith("moved it to checkpoints/corrupt/8; resuming from step 4")
  assert "resumed from the checkpoint at step 4" in resumed.stdout
  assert "Traceback" not in resumed.stderr
  # Kept for inspection, out of orbax's step list (so neither resumed from nor deleted); 8 trained again.
  assert (workdir / "checkpoints" / "corrupt" / "8" / "_CHECKPOINT_METADATA").is_file()
  assert _checkpoint_steps(workdir) == [4, 8, 12]
  got = read_metrics(workdir)  # Steps 5-8 were logged twice: the resumed run's rows win.
  assert list(got) == list(unbroken_12_steps) == list(range(1, 13))
  for step in got:  # Same float, bit for bit, at every step.
    assert got[step]["loss"] == unbroken_12_steps[step]["loss"], step
    assert got[step]["grad_norm"] == unbroken_12_steps[step]["grad_norm"], step


def test_no_checkpoint_restores_exits_2_and_keeps_them(tmp_path, data_dir):
  workdir = tmp_path / "run"
  first = run_cli(workdir, *CORRUPT_RUN, "--config.train.num_steps=8", data_dir=data_dir)
  assert first.returncode == 0, first.stderr[-3000:]
  _truncate(_metadata_file(workdir / "checkpoints" / "4"))
  _garble(_metadata_file(workdir / "checkpoints" / "8"))
  files = {p: p.read_bytes() for p in (workdir / "checkpoints").glob("**/*") if p.is_file()}
  again = run_cli(workdir, *CORRUPT_RUN, "--config.train.num_steps=12", data_dir=data_dir)
  assert again.returncode == 2
  [line] = again.stderr.strip().splitlines()
  assert line.startswith("error: no checkpoint in ") and "step 8: UnicodeDecodeError" in line, line
  assert "step 4: JSONDecodeError" in line, line
  assert "resumed" not in again.stdout and "step 1/" not in again.stdout
  # Nothing moved, deleted or overwritten.
  assert {p: p.read_bytes() for p in (workdir / "checkpoints").glob("**/*") if p.is_file()} == files


def test_nonfinite_between_log_steps_is_caught_before_the_next_save(tmp_path, data_dir):
  """The loss is read back only every 10 steps; the first bad step is carried on device until then."""
  workdir = tmp_path / "run"
  result = run_cli(
    workdir,
    "--config.train.num_steps=50",
    "--config.train.log_every=10",
    "--config.train.checkpoint_every=10",
    "--config.optim.learning_rate=1e30",
    "--config.optim.grad_clip_norm=0",
    "--config.optim.warmup_steps=0",
    data_dir=data_dir,
  )
  assert result.returncode == 1
  [line] = [l for l in result.stdout.splitlines() if "non-finite loss" in l]
  bad_step = int(line.split(" at step ")[1].split(";")[0])
  assert 1 <= bad_step < 10 and "stopping without saving (seen at step 10)" in line, line
  assert _checkpoint_steps(workdir) == [] and "Newest good checkpoint: none" in line
  assert not (workdir / "metrics.jsonl").exists() or not read_metrics(workdir)  # Step 10 was not logged.


def test_text_bytes_run_records_its_corpus(tmp_path, data_dir):
  workdir = tmp_path / "run"
  # The tiny settings without the Markov data's: refused (not read) when the source is text.
  tiny = [arg for arg in TINY if not arg.startswith("--config.data.markov.")]
  result = run_cli(
    workdir,
    *tiny,
    "--config.train.num_steps=3",
    "--config.data.source=text_bytes",
    "--config.data.text.max_bytes=200000",
    data_dir=data_dir,
    config="configs/text_bytes.py",
    tiny=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  manifest = json.loads((workdir / "data_manifest.json").read_text())
  assert manifest["digest"] and manifest["files"]
  assert all(len(f["sha256"]) == 64 and f["path"].endswith(".py") for f in manifest["files"])
  assert sum(f["bytes"] for f in manifest["files"]) <= 200000
  assert "Bayes floor" not in result.stdout  # Real text has no known floor.


def _tensorboard_scalars(logdir):
  """{tag: [(step, value)]} read from TFRecord-framed event files (length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2

  scalars = {}
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      length = int.from_bytes(data[offset : offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_tensorboard_events_hold_the_logged_metrics(tmp_path, data_dir):
  workdir = tmp_path / "run"
  result = run_cli(workdir, "--config.train.num_steps=4", "--config.train.eval_every=2", data_dir=data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  scalars = _tensorboard_scalars(workdir / "tensorboard")
  logged = read_metrics(workdir)
  assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [r["loss"] for r in logged.values()], rtol=1e-6)
  assert {
    "train/load_balance_loss",
    "train/z_loss",
    "train/moe_layer0/fraction_dropped_choice2",
    "eval/cross_entropy",
    "eval/gap_to_bayes_floor",
  } <= set(scalars)


def test_models_and_config_import_without_tfds_or_grain():
  import subprocess
  import sys

  code = (
    "import sys, moejax.config, moejax.train, moejax.models.decoder, moejax.accounting; "
    "print(sorted(m for m in ('tensorflow_datasets', 'grain', 'tensorflow') if m in sys.modules))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_asyncio_reports_of_abandoned_reads_are_dropped():
  """After a failed restore, asyncio may log the other reads' failures on the same file: dropped; others kept."""
  import logging

  from moejax import weights

  def report(error):
    return logging.LogRecord(
      "asyncio",
      logging.ERROR,
      __file__,
      1,
      "Task exception was never retrieved\nfuture: <Task>",
      None,
      (type(error), error, None),
    )

  try:
    try:
      raise ValueError("OUT_OF_RANGE: Error reading 'params.embed.embedding.value/0.0'")
    except ValueError as cause:
      raise Exception("Encountered error while reading array index") from cause
  except Exception as error:  # noqa: BLE001 - orbax raises a bare Exception here.
    abandoned = error
  assert not weights._drop_abandoned_read_errors(report(abandoned))
  assert weights._drop_abandoned_read_errors(report(RuntimeError("a real bug")))
  assert weights._drop_abandoned_read_errors(report(Exception("no cause")))
