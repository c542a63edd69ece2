"""End-to-end training through the CLI: loss falls, bit-exact resume after SIGKILL, SIGTERM, NaN."""

import json
import os
import signal
import time

import numpy as np
import pytest

from cli_util import run_cli, start_cli
from moejax.metric_writer import read_metrics


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _checkpoint_steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def test_training_reduces_loss_and_writes_the_workdir(tmp_path, data_dir):
  workdir = tmp_path / "run"
  result = run_cli(workdir, "--config.train.num_steps=40", "--config.train.eval_every=20",
                   "--config.train.checkpoint_every=20", "--config.train.keep_checkpoints=1",
                   data_dir=data_dir)
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
  again = run_cli(workdir, "--config.train.num_steps=40", "--config.train.eval_every=20",
                  "--config.train.checkpoint_every=20", "--config.train.keep_checkpoints=1",
                  data_dir=data_dir)
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
  proc = start_cli(workdir, "--config.train.num_steps=100000", "--config.train.checkpoint_every=1000",
                   data_dir=data_dir)
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
  result = run_cli(workdir, "--config.train.num_steps=50", "--config.train.checkpoint_every=1",
                   "--config.optim.learning_rate=1e30", "--config.optim.grad_clip_norm=0",
                   "--config.optim.warmup_steps=0", data_dir=data_dir)
  assert result.returncode == 1
  line = [l for l in result.stdout.splitlines() if "non-finite loss" in l][0]
  bad_step = int(line.split(" at step ")[1].split(";")[0])
  assert _checkpoint_steps(workdir) and max(_checkpoint_steps(workdir)) < bad_step
  assert f"Newest good checkpoint: step {max(_checkpoint_steps(workdir))}" in line
  assert not (workdir / "summary.json").exists()


def test_text_bytes_run_records_its_corpus(tmp_path, data_dir):
  workdir = tmp_path / "run"
  result = run_cli(workdir, "--config.train.num_steps=3", "--config.data.source=text_bytes",
                   "--config.data.text.max_bytes=200000", data_dir=data_dir, config="configs/text_bytes.py")
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
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
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
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [r["loss"] for r in logged.values()],
                             rtol=1e-6)
  assert {"train/load_balance_loss", "train/z_loss", "train/moe_layer0/fraction_dropped_choice2",
          "eval/cross_entropy", "eval/gap_to_bayes_floor"} <= set(scalars)


def test_models_and_config_import_without_tfds_or_grain():
  import subprocess
  import sys
  code = ("import sys, moejax.config, moejax.train, moejax.models.decoder, moejax.accounting; "
          "print(sorted(m for m in ('tensorflow_datasets', 'grain', 'tensorflow') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
