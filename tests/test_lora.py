"""LoRA adapters (moejax.lora): which matrices, the merged weight's algebra, training, and merged = unmerged."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from cli_util import run_cli
from moejax import config as config_lib
from moejax import lora, weights
from moejax.config import common
from moejax.errors import ConfigError
from test_finetune import TINY, _params, _trainer


def _adapter_shapes(**fields):
  cfg = common.small_lm()
  config_lib.override(cfg, {**TINY, "lora.rank": 3, **fields})
  from moejax.models import build
  from moejax.models.decoder import DecoderLM

  model = nnx.eval_shape(lambda: DecoderLM(build.decoder_config(cfg, 16), rngs=nnx.Rngs(0)))
  params = {p: tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  return {weights.dotted(p): s for p, s in lora.shapes(cfg.lora, params).items()}


def test_targets_by_hand():
  """The tiny DeepSeek-style decoder: dense block 0, MoE block 1 with 4 routed experts and a shared one; d = 32."""
  got = _adapter_shapes()
  assert got["blocks.0.attention.wqkv"] == ((32, 3), (3, 3 * 2 * 16))  # [d, 3, H, hd]: in = d, out = 3·H·hd
  assert got["blocks.0.attention.wo"] == ((32, 3), (3, 32))
  assert got["blocks.0.ffn.wi"] == ((32, 3), (3, 32))  # The dense block's FFN.
  assert got["blocks.1.ffn.wi"] == ((4, 32, 3), (4, 3, 32))  # One adapter per routed expert.
  assert got["blocks.1.ffn.wo"] == ((4, 32, 3), (4, 3, 32))
  assert got["blocks.1.ffn.shared.wg"] == ((32, 3), (3, 32))
  assert not any("router" in n or "embed" in n or "norm" in n for n in got)
  assert len(got) == 2 * 2 + 3 + 3 + 3  # 2 attention matrices a block, 3 dense, 3 routed, 3 shared.
  only = _adapter_shapes(**{"lora.targets": ("router",), "lora.patterns": (r"unembed\.kernel",)})
  assert only == {"blocks.1.ffn.router.kernel": ((32, 3), (3, 4)), "unembed.kernel": ((32, 3), (3, 16))}


@pytest.mark.parametrize(
  "fields, message",
  [
    ({"lora.patterns": (r".*\.bqkv",)}, "lora.patterns: '.*\\.bqkv' matches no weight matrix"),  # No bias here.
    ({"lora.patterns": (r"final_norm\.scale",)}, "which is no weight matrix"),
    ({"lora.targets": (), "lora.patterns": (r"decoder\..*",)}, "'decoder\\..*' matches no weight matrix"),
    ({"lora.targets": ("dense_ffn",), "model.moe_every": 1}, "lora.targets: 'dense_ffn' matches no weight matrix"),
  ],
)
def test_targets_that_fit_nothing_are_refused(fields, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    _adapter_shapes(**fields)


@pytest.mark.parametrize("fields", [{"model.moe_every": 1}, {"model.moe_every": 0}])
def test_the_default_targets_fit_all_moe_and_dense_models(fields):
  """attention and ffn: every block's attention and FFN matrices, whether the FFNs are experts or dense."""
  got = _adapter_shapes(**fields)
  ffn = {n for n in got if ".ffn." in n}
  if fields["model.moe_every"]:
    assert got["blocks.0.ffn.wi"] == ((4, 32, 3), (4, 3, 32))  # Every block is MoE: per-expert adapters.
    assert len(ffn) == 2 * (3 + 3)  # Routed and shared wi, wg, wo in both blocks.
  else:
    assert got["blocks.0.ffn.wi"] == ((32, 3), (3, 32)) and len(ffn) == 2 * 3
  assert {n for n in got if ".attention." in n} == {f"blocks.{i}.attention.{w}" for i in (0, 1) for w in ("wqkv", "wo")}


def _adapters(trainer):
  return {
    (*path, k): np.asarray(v.get_value())
    for path, ab in lora.unnest(trainer.state["lora"]).items()
    for k, v in ab.items()
  }


def _bias(trainer):
  return {weights.dotted(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(trainer.state["model_state"])}


def test_a_frozen_routers_balancing_bias_stays_put(data_dir):
  """Under LoRA the router is frozen (unless lora.train names it): DeepSeek's balancing bias stays put too."""
  trainer, data = _trainer(data_dir, **{"lora.rank": 2})
  before, batches = _bias(trainer), data.train_batches(0)
  assert any(".router." in name for name in before)
  for _ in range(3):
    trainer.train_step(next(batches))
  for name, value in _bias(trainer).items():
    np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_training_moves_only_the_adapters(data_dir):
  trainer, data = _trainer(data_dir, **{"lora.rank": 2, "lora.alpha": 4.0, "lora.train": ("router",)})
  base, bias = _params(trainer), _bias(trainer)
  adapters = _adapters(trainer)
  batches = data.train_batches(0)
  eval_batches = data.eval_batches()[:1]
  # Step 0: B = 0, so the adapted model is the base model.
  trainer_plain, _ = _trainer(data_dir)
  assert trainer.evaluate(eval_batches) == trainer_plain.evaluate(eval_batches)
  losses = [float(trainer.train_step(next(batches))["loss"]) for _ in range(8)]
  assert losses[-1] < losses[0]
  after = _params(trainer)
  for name, value in base.items():
    if ".router." in name:  # lora.train: the router trains beside the adapters.
      assert not np.array_equal(after[name], value), name
    else:
      np.testing.assert_array_equal(after[name], value, err_msg=name)
  moved = _adapters(trainer)
  assert all(not np.array_equal(moved[k], adapters[k]) for k in adapters if k[-1] == "b")
  assert any(not np.array_equal(v, bias[k]) for k, v in _bias(trainer).items())  # A trained router's bias moves.
  # AdamW's moments cover the adapters and the router only.
  moments = sum(x.size for x in jax.tree.leaves(trainer.state["opt_state"]) if x.ndim)
  trained = sum(v.size for v in moved.values()) + sum(v.size for k, v in after.items() if ".router." in k)
  assert moments == 2 * trained and trainer.trained_params() == trained
  # Per-expert adapters sit with their experts on the 'expert' mesh axis (this run's has one device,
  # which the placement leaves out of the spec; on 4 the adapters are split like their experts).
  from moejax.parallel import make_mesh, state_sharding

  placed = state_sharding(make_mesh(2, 4), trainer.state["lora"])
  assert tuple(placed["blocks"]["1"]["ffn"]["wi"]["a"].spec)[0] == "expert"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_dir):
  """A plain tiny run of 3 steps: the base model the LoRA runs start from."""
  workdir = tmp_path_factory.mktemp("base") / "run"
  result = run_cli(workdir, "--config.train.num_steps=3", "--config.optim.learning_rate=0.03", data_dir=data_dir)
  assert result.returncode == 0, result.stderr
  return workdir


def _final_eval(workdir, data_dir, *flags) -> float:
  """A CLI run's final eval cross-entropy."""
  result = run_cli(workdir, *flags, data_dir=data_dir)
  assert result.returncode == 0, result.stderr
  with open(workdir / "summary.json") as f:
    return json.load(f)["eval_cross_entropy"]


def test_merged_equals_unmerged(base_run, data_dir, tmp_path):
  """A LoRA run's eval (adapters beside the base, merged in the step) equals a plain model holding W + s·A·B.

  Twice: the merged weights built here in numpy, and a new run started from the LoRA run's
  checkpoint (init.checkpoint reads its parameters merged), whose eval at step 0 must be the same.
  """
  lora_run = tmp_path / "lora"
  flags = ("--config.lora.rank=4", "--config.lora.alpha=8.0", "--config.lora.targets=('attention','experts')")
  lora_eval = _final_eval(
    lora_run,
    data_dir,
    "--config.train.num_steps=6",
    "--config.optim.learning_rate=0.03",
    f"--config.init.checkpoint={base_run}",
    *flags,
  )
  with open(lora_run / "init.json") as f:
    assert json.load(f)["step"] == 3
  # The merged weights by hand: W + (8/4)·A·B from the checkpoint's arrays.
  item_dir, _ = weights.item_directory(str(lora_run))
  saved = weights.metadata(item_dir)
  assert saved["lora"] and all(np.dtype(d) == np.float32 for _, d in saved["lora"].values())
  import orbax.checkpoint as ocp

  tree = ocp.PyTreeCheckpointer().restore(item_dir)
  base = {k: np.asarray(v) for k, v in weights.from_nested(tree["params"]).items()}
  ab = {k: np.asarray(v) for k, v in weights.from_nested(tree["lora"]).items()}
  assert len(ab) == 2 * (2 * 2 + 2)  # a and b of wqkv and wo in 2 blocks, and the experts' wi and wo (GELU).
  by_hand = dict(base)
  for k in {k[:-1] for k in ab}:
    w = base[k]
    a, b = ab[(*k, "a")], ab[(*k, "b")]
    by_hand[k] = (w.reshape(*a.shape[:-2], a.shape[-2], -1) + 2.0 * (a @ b)).reshape(w.shape)
    assert np.abs(by_hand[k] - w).max() > 1e-4, k  # The adapters trained.
  cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  targets = {"params": {k: jax.ShapeDtypeStruct(s, d, sharding=cpu) for k, (s, d) in saved["params"].items()}}
  read = {k: np.asarray(v) for k, v in weights.restore(item_dir, targets)["params"].items()}
  for k, value in by_hand.items():
    np.testing.assert_allclose(read[k], value, rtol=1e-6, atol=1e-7, err_msg=weights.dotted(k))
  # A plain run from the LoRA run's checkpoint computes the same function: eval after one step at learning rate 0.
  plain_eval = _final_eval(
    tmp_path / "plain",
    data_dir,
    "--config.train.num_steps=1",
    "--config.optim.warmup_steps=5",
    f"--config.init.checkpoint={lora_run}",
  )
  np.testing.assert_allclose(plain_eval, lora_eval, rtol=1e-5)


def test_a_lora_run_resumes_as_if_unbroken(base_run, data_dir, tmp_path):
  """2 steps, then on to 4 (constant schedule: num_steps may grow) = 4 steps unbroken, loss for loss."""
  flags = (
    "--config.lora.rank=2",
    f"--config.init.checkpoint={base_run}",
    "--config.optim.schedule=constant",
    "--config.train.checkpoint_every=2",
  )
  losses = {}
  for name, steps in (("broken", (2, 4)), ("unbroken", (4,))):
    for n in steps:
      result = run_cli(tmp_path / name, f"--config.train.num_steps={n}", *flags, data_dir=data_dir)
      assert result.returncode == 0, result.stderr
    with open(tmp_path / name / "metrics.jsonl") as f:
      losses[name] = {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}
  assert losses["broken"] == losses["unbroken"] and len(losses["unbroken"]) == 4


def test_frozen_parameters_no_checkpoint_gives_are_refused(base_run, data_dir, tmp_path):
  """LoRA without init.checkpoint, or a frozen parameter the init leaves fresh: one line, nothing written."""
  cases = [
    (("--config.lora.rank=2",), "error: config lora.rank: LoRA freezes the base model, but init.checkpoint is ''"),
    (
      ("--config.lora.rank=2", f"--config.init.checkpoint={base_run}", r"--config.init.exclude=('.*router.*',)"),
      "error: config lora.train: 1 frozen parameters get no weights from init.checkpoint",
    ),
    (
      (
        "--config.optim.freeze=('router',)",
        f"--config.init.checkpoint={base_run}",
        r"--config.init.exclude=('.*router.*',)",
      ),
      "error: config optim.freeze: 1 frozen parameters get no weights from init.checkpoint",
    ),
  ]
  for flags, line in cases:
    result = run_cli(tmp_path / "w", *flags, data_dir=data_dir)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(line), result.stderr[-2000:]
    assert not (tmp_path / "w").exists()
  # Training the router beside the adapters takes it out of the refusal.
  ok = ("--config.lora.rank=2", f"--config.init.checkpoint={base_run}", r"--config.init.exclude=('.*router.*',)")
  result = run_cli(
    tmp_path / "ok", *ok, "--config.lora.train=('router',)", "--config.train.num_steps=1", data_dir=data_dir
  )
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
  "flags, line",
  [
    (("--config.lora.rank=2", "--config.optim.freeze=('experts',)"), "error: config optim.freeze: with lora.rank > 0"),
    (("--config.lora.alpha=2.0",), "error: config lora.alpha: is not used here (lora.rank is 0"),
    (("--config.lora.rank=2", "--config.lora.targets=('mlp',)"), "error: config lora.targets: 'mlp' is not a group"),
    (
      ("--config.lora.rank=2", "--config.lora.train=('nothing',)"),
      "error: config lora.train: 'nothing' is not a group",
    ),
    (("--config.lora.rank=-1",), "error: config lora.rank: must be an integer >= 0"),
  ],
)
def test_bad_lora_settings_are_one_line(flags, line, data_dir, tmp_path):
  result = run_cli(tmp_path / "w", *flags, data_dir=data_dir)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(line), result.stderr[-2000:]
  assert not (tmp_path / "w").exists()
