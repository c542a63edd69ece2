"""Starting a run from weights (config section init): another run, a converted model, partial loading.

The parameters a run starts from must be the source's, bit for bit, in the run's own shardings
(8 fake devices, expert and FSDP sharding), with a fresh optimizer at step 0; resuming in the
run's workdir must not start over; whatever does not line up is refused with one line.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from cli_util import run_cli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_reference  # noqa: E402

from moejax import config as config_lib  # noqa: E402
from moejax import init, tasks, weights  # noqa: E402
from moejax.convert import checkpoints, files  # noqa: E402
from moejax.errors import ConfigError  # noqa: E402
from moejax.train import Trainer  # noqa: E402

TINY_FIELDS = {
  "model.num_layers": 2,
  "model.d_model": 32,
  "model.num_heads": 2,
  "model.d_ff": 64,
  "moe.num_experts": 4,
  "moe.top_k": 2,
  "train.seq_len": 16,
  "train.batch_size": 8,
  "optim.warmup_steps": 2,
  "data.markov.vocab_size": 16,
  "data.markov.num_train": 256,
  "data.markov.num_validation": 16,
  "data.num_eval_batches": 2,
}


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, data_dir):
  """A tiny run of 4 steps with checkpoints at steps 2 and 4, and an eval at each."""
  workdir = tmp_path_factory.mktemp("source") / "run"
  result = run_cli(
    workdir,
    "--config.train.num_steps=4",
    "--config.train.checkpoint_every=2",
    "--config.train.eval_every=2",
    data_dir=data_dir,
  )
  assert result.returncode == 0, result.stderr
  return workdir


def _config(data_dir, **extra):
  from moejax.config import common

  cfg = common.small_lm()
  dense = extra.get("model.moe_every") == 0  # A dense model reads no moe field.
  fields = {k: v for k, v in TINY_FIELDS.items() if not (dense and k.startswith("moe."))}
  config_lib.override(cfg, {**fields, "data.data_dir": data_dir, **extra})
  return cfg


def _saved_params(workdir, step):
  item_dir, _ = weights.item_directory(str(workdir), step)
  meta = weights.metadata(item_dir)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  targets = {
    "params": {k: jax.ShapeDtypeStruct(shape, dtype, sharding=cpu) for k, (shape, dtype) in meta["params"].items()}
  }
  return {".".join(k): np.asarray(v) for k, v in weights.restore(item_dir, targets)["params"].items()}


def _trainer_params(trainer):
  return {weights.dotted(p): v.get_value() for p, v in nnx.to_flat_state(trainer.state["params"])}


@pytest.mark.parametrize("mesh", [{}, {"mesh.expert": 4}, {"mesh.expert": 2, "mesh.fsdp": True}])
def test_parameters_come_from_the_checkpoint_into_the_runs_shardings(source_run, data_dir, mesh):
  cfg = _config(data_dir, **{"init.checkpoint": str(source_run), "init.step": 2, **mesh})
  config_lib.validate(cfg, jax.device_count())
  data = tasks.make_data(cfg)
  trainer = Trainer(cfg, tasks.make_task(cfg, data, jax.device_count()), initialize=False)
  the_plan = init.plan(cfg.init, init.shapes(trainer.abstract_state))
  assert the_plan.description == f"step 2 of the run in {source_run}" and not the_plan.fresh and not the_plan.skipped
  trainer.initialize(init.load(the_plan, trainer.abstract_state))
  saved, got = _saved_params(source_run, 2), _trainer_params(trainer)
  assert sorted(saved) == sorted(got)
  for name, value in saved.items():
    np.testing.assert_array_equal(np.asarray(got[name]), value, err_msg=name)
  # Each array sits in the sharding the run gives it: experts split over 'expert' (E/expert a device);
  # with FSDP, also over 'data' on their largest dimension the 4 data devices divide.
  fsdp = mesh.get("mesh.fsdp", False)
  wi = got["blocks.1.ffn.wi"]  # The MoE block's [E=4, d=32, f=64].
  lead = "expert" if mesh.get("mesh.expert", 1) > 1 else None  # A one-device axis is left out of the spec.
  assert tuple(wi.sharding.spec) == ((lead, None, "data") if fsdp else (lead, None, None))
  assert wi.addressable_shards[0].data.shape == (4 // mesh.get("mesh.expert", 1), 32, 16 if fsdp else 64)
  embedding = got["embed.embedding"]  # [V=16, d=32]: replicated, or split over 'data' on d.
  assert tuple(embedding.sharding.spec) == ((None, "data") if fsdp else (None, None))
  # A fresh optimizer at step 0.
  assert int(trainer.state["step"]) == 0


def test_a_new_run_from_a_runs_checkpoint_continues_its_function(source_run, data_dir, tmp_path):
  """From step 2 of the source with a zero first learning rate (warm-up), the eval equals the source's at step 2."""
  workdir = tmp_path / "b"
  result = run_cli(
    workdir,
    "--config.train.num_steps=1",
    f"--config.init.checkpoint={source_run}",
    "--config.init.step=2",
    data_dir=data_dir,
  )
  assert result.returncode == 0, result.stderr
  taken = len(_saved_params(source_run, 2))  # Every parameter of the source.
  assert f"init: {taken} arrays from step 2 of the run in {source_run}\n" in result.stdout
  with open(workdir / "config.json") as f:
    saved = json.load(f)["init"]
  assert (
    saved["checkpoint"] == str(source_run) and saved["step"] == 2 and saved["include"] == [] and not saved["upcycle"]
  )
  with open(workdir / "init.json") as f:
    record = json.load(f)
  assert record["step"] == 2 and record["item_directory"] == str(source_run / "checkpoints" / "2" / "default")
  assert len(record["taken"]["params"]) == taken and not record["fresh"] and not record["upcycled"]
  with open(workdir / "summary.json") as f:
    b = json.load(f)["eval_cross_entropy"]
  with open(source_run / "metrics.jsonl") as f:
    a2 = next(r for r in map(json.loads, f) if r["step"] == 2 and r["split"] == "eval")["cross_entropy"]
  assert b == a2
  # Resuming B's own workdir does not start over from the init: its checkpoint is newer.
  again = run_cli(
    workdir,
    "--config.train.num_steps=1",
    f"--config.init.checkpoint={source_run}",
    "--config.init.step=2",
    data_dir=data_dir,
  )
  assert again.returncode == 0 and "already trained to step 1" in again.stdout and "init:" not in again.stdout


def test_with_several_processes_the_newest_step_is_process_0s(source_run, data_dir, monkeypatch):
  """init.step 0 with several processes: every process takes the step process 0 found newest (a source run
  still writing could show them different ones), passed by broadcast_one_to_all (here a stand-in: process 0
  saw step 2, this process sees 4)."""
  from jax.experimental import multihost_utils

  cfg = _config(data_dir, **{"init.checkpoint": str(source_run)})
  config_lib.validate(cfg, jax.device_count())
  trainer = Trainer(cfg, tasks.make_task(cfg, tasks.make_data(cfg)), initialize=False)
  assert init.plan(cfg.init, init.shapes(trainer.abstract_state)).record()["step"] == 4  # One process: its newest.
  sent = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: sent.append(int(x)) or np.int32(2))
  the_plan = init.plan(cfg.init, init.shapes(trainer.abstract_state))
  assert sent == [4]  # This process offered its own newest, and took process 0's.
  assert the_plan.description == f"step 2 of the run in {source_run}" and the_plan.record()["step"] == 2


def test_a_converted_model_trains_from_the_command_line(data_dir, tmp_path):
  meta, state, _ = hf_reference.load_fixture("qwen3_30b_a3b")
  os.makedirs(tmp_path / "hf")
  with open(tmp_path / "hf" / "config.json", "w") as f:
    json.dump(meta["config"], f)
  writer = files.ShardWriter(str(tmp_path / "hf"), 10**9)
  for name, value in state.items():
    writer.add(name, value)
  writer.close()
  checkpoints.from_hf(str(tmp_path / "hf"), str(tmp_path / "qwen"), say=lambda *a: None)
  result = run_cli(
    tmp_path / "run",
    "--config.train.num_steps=12",
    "--config.train.log_every=4",
    "--config.train.seq_len=16",
    "--config.train.batch_size=8",
    "--config.data.markov.vocab_size=16",
    "--config.data.markov.num_train=256",
    "--config.data.markov.num_validation=16",
    "--config.data.num_eval_batches=2",
    "--config.optim.learning_rate=0.01",
    data_dir=data_dir,
    config=f"configs/init_from.py:{tmp_path / 'qwen'}",
    tiny=False,
  )
  assert result.returncode == 0, result.stderr
  assert f"arrays from the converted model in {tmp_path / 'qwen'}" in result.stdout, result.stdout
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    losses = [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
  assert losses[-1] < losses[0], losses


def _shapes(**layers):
  """Model shapes of a tiny 2- or 3-block decoder (through the real model)."""
  from moejax.config import common

  cfg = common.small_lm()
  config_lib.override(cfg, {**TINY_FIELDS, **layers})
  task = tasks.make_task(cfg, type("D", (), {"vocab_size": 16, "info": {}})())
  model = nnx.eval_shape(lambda: task.make_model(None, nnx.Rngs(0)))
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  return init.shapes({"params": params, "model_state": model_state})


def test_partial_loading_rules_and_refusals(source_run):
  base = {**config_lib.base_config("lm").init.to_dict(), "checkpoint": str(source_run)}
  spec = lambda **kw: ml_collections.ConfigDict({**base, **kw})
  two = _shapes()
  # Everything, from the newest step.
  assert init.plan(spec(), two).description == f"step 4 of the run in {source_run}"
  # exclude: those stay fresh (a new head, say); include: only those come.
  p = init.plan(spec(exclude=("unembed\\..*", "embed\\..*")), two)
  assert set(p.fresh) == {"unembed.kernel", "embed.embedding"} and set(p.skipped) == {
    "unembed.kernel",
    "embed.embedding",
  }
  p = init.plan(spec(include=("blocks\\.\\d+\\.attention\\..*",)), two)
  assert all(".attention." in weights.dotted(path) for path in p.take["params"]) and "embed.embedding" in p.fresh
  # A model with a block the checkpoint lacks.
  three = _shapes(**{"model.num_layers": 3})
  with pytest.raises(
    ConfigError, match="init.checkpoint: step 4 of the run in .* holds no blocks.2.attention.wo; leave it"
  ):
    init.plan(spec(), three)
  assert init.plan(spec(exclude=("blocks\\.2\\..*",)), three).fresh[0].startswith("blocks.2.")
  # A checkpoint array with no place in the model, and shapes that differ.
  one = _shapes(**{"model.num_layers": 1})  # The source's dense block 0 alone.
  with pytest.raises(
    ConfigError, match="init.checkpoint: blocks.1.attention.wo of step 4 .* has no place in this model"
  ):
    init.plan(spec(), one)
  assert init.plan(spec(exclude=("blocks\\.1\\..*",)), one).skipped[0].startswith("blocks.1.")
  with pytest.raises(ConfigError, match="init.include: 'blokcs.*' matches no variable of this model"):
    init.plan(spec(include=("blokcs.*",)), two)  # A typo is not a choice to take nothing.
  with pytest.raises(ConfigError, match="init.exclude: 'unembd.*' matches no variable"):
    init.plan(spec(exclude=("unembd.*",)), two)
  with pytest.raises(ConfigError, match="init.include: takes nothing from step 4"):
    init.plan(spec(include=("embed.*",), exclude=("embed.*",)), two)
  # Upcycling refuses an expert array the dense checkpoint lacks (its block 0 is a GELU FFN: no wg).
  swiglu = _shapes(**{"model.activation": "swiglu", "model.moe_every": 1})
  with pytest.raises(ConfigError, match="init.checkpoint: step 4 of the run in .* holds no blocks.0.ffn.wg"):
    init.plan(spec(upcycle=True), swiglu)
  wide = _shapes(**{"model.d_ff": 32})
  with pytest.raises(
    ConfigError, match=r"init.checkpoint: blocks.0.ffn.wi is \(32, 64\) in step 4 of the run in .* but \(32, 32\)"
  ):
    init.plan(spec(), wide)


def test_an_unreadable_init_checkpoint_is_one_line_and_leaves_no_workdir(source_run, data_dir, tmp_path):
  import shutil

  broken = tmp_path / "broken"
  shutil.copytree(source_run, broken)
  for root, _, names in os.walk(broken / "checkpoints" / "4" / "default"):
    for name in names:
      path = os.path.join(root, name)
      if os.sep + "d" + os.sep in path:  # The array data files.
        with open(path, "r+b") as f:
          f.truncate(8)
  result = run_cli(
    tmp_path / "w", "--config.train.num_steps=1", f"--config.init.checkpoint={broken}", data_dir=data_dir
  )
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
  # Its metadata lies in the same data files: the plan, before anything is written, already finds it unreadable.
  assert lines[0].startswith(f"error: init.checkpoint: '{broken}/checkpoints/4/default' is not a readable")
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
  "overrides, expected",
  [
    (("--config.init.checkpoint=/nonexistent/run",), "error: init.checkpoint: '/nonexistent/run' is not a directory"),
    (("--config.init.step=3",), "error: config init.step: is not used here (init.checkpoint is ''"),
    (
      ("--config.init.checkpoint=/nonexistent/run", "--config.init.include=('blocks[',)"),
      "error: config init.include: 'blocks[' is not a regular expression",
    ),
  ],
)
def test_bad_init_settings_are_refused_before_anything_is_written(overrides, expected, data_dir, tmp_path):
  result = run_cli(tmp_path / "w", "--config.train.num_steps=1", *overrides, data_dir=data_dir)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), result.stderr
  assert not os.path.exists(tmp_path / "w")


# ----- Sparse upcycling: an MoE run from a dense run's checkpoint. -----


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, data_dir):
  """A tiny dense run (every block a dense FFN, SwiGLU so that wg is upcycled too), 2 steps."""
  workdir = tmp_path_factory.mktemp("dense") / "run"
  from cli_util import TINY

  dense = [flag for flag in TINY if not flag.startswith("--config.moe.")]  # A dense model reads no moe field.
  result = run_cli(
    workdir,
    *dense,
    "--config.train.num_steps=2",
    "--config.model.moe_every=0",
    "--config.model.activation=swiglu",
    data_dir=data_dir,
    tiny=False,
  )
  assert result.returncode == 0, result.stderr
  return workdir


def _upcycled_trainer(dense_run, data_dir, preset="top2", **fields):
  from test_router_training import LM_PRESETS

  cfg = LM_PRESETS.get_config(preset)
  config_lib.override(
    cfg,
    {
      **TINY_FIELDS,
      "model.activation": "swiglu",
      "data.data_dir": data_dir,
      "init.checkpoint": str(dense_run),
      "init.upcycle": True,
    },
  )
  config_lib.override(cfg, {**LM_PRESETS.PRESETS[preset], **fields})  # The preset's own top_k, experts, ...
  config_lib.validate(cfg, jax.device_count())
  data = tasks.make_data(cfg)
  trainer = Trainer(cfg, tasks.make_task(cfg, data, jax.device_count()), initialize=False)
  the_plan = init.plan(cfg.init, init.shapes(trainer.abstract_state), seed=cfg.seed)
  trainer.initialize(init.load(the_plan, trainer.abstract_state))
  return trainer, the_plan, data


ROUTER_PRESETS = ["switch", "top2", "gshard", "dropless", "hash", "dense_gated", "expert_choice", "soft_moe", "bpr"]


@pytest.mark.parametrize("preset", ROUTER_PRESETS + ["deepseek", "deepseek_v2"])
def test_every_router_family_upcycles_from_a_dense_run(preset, dense_run, data_dir):
  fine = preset.startswith("deepseek")  # Fine-grained: experts of d_ff / 4, segments of the dense FFN.
  extra = {"moe.d_expert": 16, "init.upcycle_segments": 4} if fine else {}
  trainer, the_plan, _ = _upcycled_trainer(dense_run, data_dir, preset, **extra)
  dense, got = _saved_params(dense_run, 2), _trainer_params(trainer)
  moe_block = next(i for i in range(2) if got[f"blocks.{i}.ffn.wi"].ndim == 3)
  for name in ("wi", "wg", "wo"):
    experts, ffn = np.asarray(got[f"blocks.{moe_block}.ffn.{name}"]), dense[f"blocks.{moe_block}.ffn.{name}"]
    for e in range(experts.shape[0]):
      if fine:  # Expert e holds segment e mod 4 of the dense hidden units (columns of wi, wg; rows of wo).
        s = (e % 4) * 16
        want = ffn[s : s + 16] if name == "wo" else ffn[:, s : s + 16]
      else:
        want = ffn
      np.testing.assert_array_equal(experts[e], want, err_msg=f"{name} expert {e}")
  # Everything else is the dense run's; the routing parameters start fresh.
  for name, value in dense.items():
    if not name.startswith(f"blocks.{moe_block}.ffn."):
      np.testing.assert_array_equal(np.asarray(got[name]), value, err_msg=name)
  fresh = [n for n in the_plan.fresh]
  assert all(n.startswith(f"blocks.{moe_block}.ffn.") for n in fresh)
  if preset not in ("hash", "dense_gated"):
    assert fresh, "the router starts from the seed"


def test_an_upcycled_moe_computes_the_dense_function(dense_run, data_dir):
  """Identical experts whose combine weights sum to 1 (renormalised top-2, dropless) add up to the dense FFN."""
  trainer, _, data = _upcycled_trainer(dense_run, data_dir, "dropless", **{"moe.combine_weights": "renormalized"})
  dense_cfg = _config(
    data_dir, **{"model.moe_every": 0, "model.activation": "swiglu", "init.checkpoint": str(dense_run)}
  )
  config_lib.validate(dense_cfg, jax.device_count())
  dense = Trainer(dense_cfg, tasks.make_task(dense_cfg, data, jax.device_count()), initialize=False)
  dense.initialize(init.load(init.plan(dense_cfg.init, init.shapes(dense.abstract_state)), dense.abstract_state))
  batch = next(iter(data.eval_batches()))
  ours, theirs = trainer.evaluate([batch]), dense.evaluate([batch])
  np.testing.assert_allclose(ours["cross_entropy"], theirs["cross_entropy"], rtol=1e-5)


def test_upcycling_noise_and_refusals(dense_run, data_dir):
  trainer, _, _ = _upcycled_trainer(dense_run, data_dir, "top2", **{"init.upcycle_noise": 0.1})
  dense, got = _saved_params(dense_run, 2), _trainer_params(trainer)
  experts, ffn = np.asarray(got["blocks.1.ffn.wi"]), dense["blocks.1.ffn.wi"]
  noise = experts - ffn[None]
  assert not np.array_equal(experts[0], experts[1])  # The copies differ ...
  np.testing.assert_allclose(noise.std() / ffn.std(), 0.1, rtol=0.1)  # ... by 0.1 of the array's std.
  with pytest.raises(
    ConfigError,
    match=r"init.upcycle: blocks.1.ffn.w\w is \(16, 32, 16\) in this model; .* dense \(32, 64\) makes \(16, 32, 64\)",
  ):
    _upcycled_trainer(dense_run, data_dir, "deepseek", **{"moe.d_expert": 16})
  dense = _config(data_dir, **{"model.moe_every": 0, "init.checkpoint": str(dense_run), "init.upcycle": True})
  with pytest.raises(ConfigError, match="init.upcycle: the model has no MoE layer to upcycle into"):
    config_lib.validate(dense, jax.device_count())
