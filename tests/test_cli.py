"""Bad input is refused at start-up: one line naming the field, exit code 2, nothing written."""

import json
import os
import subprocess
import sys

import pytest

from cli_util import REPO, run_cli
from moejax import config as config_lib
from moejax.models import build

# (override, the field the message must name): checked in-process against `validate`.
BAD_VALUES = [
  ({"moe.top_k": 9}, "moe.top_k"),
  ({"moe.top_k": 0}, "moe.top_k"),
  ({"moe.capacity_factor": 0.0}, "moe.capacity_factor"),
  ({"moe.capacity_factor": -1.0}, "moe.capacity_factor"),
  ({"moe.eval_capacity_factor": 0.0}, "moe.eval_capacity_factor"),
  ({"moe.num_experts": 0}, "moe.num_experts"),
  ({"model.num_heads": 3}, "model.num_heads"),
  ({"model.d_model": 96, "model.num_heads": 32}, "model.positions"),  # Head dim 3 is odd: no RoPE.
  ({"moe.router": "expert_choice_typo"}, "moe.router"),
  ({"moe.dispatcher": "magic"}, "moe.dispatcher"),
  ({"moe.priority": "choice_major"}, "moe.priority"),  # Leaks in a decoder when K > 1.
  ({"data.source": "imagenet"}, "data.source"),
  ({"model.remat": "selective"}, "model.remat"),
  ({"train.param_dtype": "float16"}, "train.param_dtype"),
  ({"train.profile_start": -1}, "train.profile_start"),
  ({"train.profile_steps": 0}, "train.profile_steps"),
  ({"train.microbatches": 0}, "train.microbatches"),
  ({"train.microbatches": 5}, "train.microbatches"),  # Does not divide the batch of 32.
  ({"optim.learning_rate": -1e-3}, "optim.learning_rate"),
  ({"optim.b2": 1.0}, "optim.b2"),
  ({"train.batch_size": 30}, "train.batch_size"),  # 8 devices on the data axis.
  ({"train.seq_len": 1}, "train.seq_len"),
  ({"moe.group_size": 48}, "moe.group_size"),
  ({"mesh.data": 16}, "mesh.data"),
  ({"mesh.data": 4, "mesh.expert": 4}, "mesh.data"),  # 16 devices asked, 8 exist.
  ({"mesh.expert": 16}, "mesh.expert"),
  ({"mesh.expert": 3}, "mesh.expert"),  # With mesh.data = -1 it must divide the 8 devices.
  ({"mesh.data": 2, "mesh.expert": 3}, "mesh.expert"),  # 3 must divide the 8 experts.
  ({"mesh.expert": 0}, "mesh.expert"),
  ({"mesh.data": 1, "mesh.expert": 8, "train.batch_size": 4}, "train.batch_size"),
  ({"mesh.model": 0}, "mesh.model"),
  ({"mesh.model": 3}, "mesh.model"),  # With mesh.data = -1, expert × model must divide the 8 devices.
  ({"mesh.data": 4, "mesh.model": 4}, "mesh.data"),  # 16 devices asked, 8 exist.
  ({"mesh.model": 8, "moe.d_expert": 12}, "mesh.model"),  # 8 must divide the experts' hidden dim.
  ({"mesh.rules.heads": "data"}, "mesh.rules.heads"),
  ({"distributed.initialize": "maybe"}, "distributed.initialize"),
  ({"distributed.num_processes": 2}, "distributed.process_id"),  # It must come with num_processes.
  ({"distributed.num_processes": 2, "distributed.process_id": 2}, "distributed.process_id"),
  ({"mesh.expert": 2, "moe.dispatcher": "dropless", "moe.expert_exchange": "ragged"}, "moe.expert_exchange"),
  ({"data.markov.branching": 100}, "data.markov.branching"),
  ({"model.positions": "alibi"}, "model.positions"),
  ({"model.dtype": "float16"}, "model.dtype"),
  ({"model.rope_theta": 0.0}, "model.rope_theta"),
  ({"model.positions": "learned", "model.rope_theta": 1e6}, "model.rope_theta"),  # Not read without RoPE.
  ({"model.norm_eps": 0.0}, "model.norm_eps"),
  ({"model.qk_norm": True, "model.qk_norm_scope": "all"}, "model.qk_norm_scope"),
  ({"model.qk_norm_scope": "projection"}, "model.qk_norm_scope"),  # Not read with qk_norm False.
  ({"model.attention_bias": "yes"}, "model.attention_bias"),
  ({"model.dense_layers": (1, 4)}, "model.dense_layers"),  # 4 blocks: 0..3.
  ({"model.dense_layers": (1, 1)}, "model.dense_layers"),
  ({"model.moe_every": 0, "model.dense_layers": (1,)}, "model.dense_layers"),  # Every block is dense.
  ({"moe.shared_expert_gate": "sigmoid"}, "moe.shared_expert_gate"),  # No shared experts.
  ({"moe.num_shared_experts": 1, "moe.shared_expert_gate": "tanh"}, "moe.shared_expert_gate"),
]


@pytest.mark.parametrize("overrides,field", BAD_VALUES, ids=[f for _, f in BAD_VALUES])
def test_validate_names_the_field(overrides, field):
  cfg = config_lib.base_config()
  cfg.train.batch_size = 32
  for key, value in overrides.items():
    group, name = key.rsplit(".", 1)
    node = cfg
    for part in group.split("."):
      node = node[part]
    node[name] = value
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(cfg, num_devices=8)
  assert error.value.field == field
  assert "\n" not in str(error.value)


def test_base_config_and_allowed_settings_validate():
  cfg = config_lib.base_config()
  config_lib.validate(cfg, num_devices=8)
  with cfg.unlocked():
    cfg.moe.priority, cfg.moe.allow_noncausal = "choice_major", True
  config_lib.validate(cfg, num_devices=8)
  # With one expert device no exchange runs, so 'ragged' is allowed on CPU too.
  cfg.moe.dispatcher, cfg.moe.expert_exchange = "dropless", "ragged"
  config_lib.validate(cfg, num_devices=8)


def test_hand_built_config_with_unknown_field_is_refused():
  cfg = config_lib.base_config().to_dict()
  cfg["model"]["num_layer"] = 3
  import ml_collections

  with pytest.raises(config_lib.ConfigError, match="model.num_layer: unknown config field"):
    config_lib.validate(ml_collections.ConfigDict(cfg), num_devices=1)


CLI_CASES = [
  (["--config", "configs/does_not_exist.py"], "no such config file"),
  (["--config", "configs/quickstart.py", "--config.moe.top_k=9"], "moe.top_k"),
  (["--config", "configs/quickstart.py", "--config.moe.no_such_field=1"], "unknown config field 'no_such_field'"),
  (["--config", "configs/quickstart.py", "--config.moe.capacity_factor=abc"], "--config.moe.capacity_factor"),
  (["--config", "configs/quickstart.py", "--config.moe.capacity_factor=0"], "moe.capacity_factor"),
  (["--config", "configs/quickstart.py", "--config.model.num_heads=5"], "model.num_heads"),
  (["--config", "configs/quickstart.py", "--config.data.source=mnist"], "data.source"),
  (["--config", "configs/quickstart.py", "--config.optim.learning_rate=-1"], "optim.learning_rate"),
  (["--config", "configs/quickstart.py", "--config.mesh.data=4"], "mesh.data"),
  (["--config", "configs/quickstart.py", "--config.mesh.expert=2"], "mesh.expert"),
  (
    ["--config", "configs/quickstart.py", "--config.distributed.num_processes=2", "--config.distributed.process_id=2"],
    "distributed.process_id",
  ),
  (
    ["--config", "configs/quickstart.py", "--config.distributed.num_processes=2", "--config.distributed.process_id=1"],
    "distributed.coordinator_address: needed",
  ),
  (["--config", "configs/quickstart.py", "--config.distributed.process_id=0"], "distributed.process_id"),
  (
    ["--config", "configs/quickstart.py", "--config.distributed.initialize=yes"],
    "distributed: jax.distributed.initialize failed",
  ),
  (
    ["--config", "configs/quickstart.py", "--config.data.source=tfds", "--config.data.tfds.name=lm1b"],
    "data.tfds.name",
  ),
  (["--config", "configs/quickstart.py", "stray_argument"], "unexpected arguments"),
]


@pytest.mark.parametrize("args,expected", CLI_CASES, ids=[e for _, e in CLI_CASES])
def test_cli_refuses_bad_input(tmp_path, args, expected):
  workdir = tmp_path / "workdir"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "moejax.main",
      *args,
      "--workdir",
      str(workdir),
      f"--config.data.data_dir={tmp_path / 'empty_tfds'}",
    ],
    cwd=REPO,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2, result.stderr
  error_lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(error_lines) == 1 and expected in error_lines[0], result.stderr
  assert "Traceback" not in result.stderr + result.stdout
  assert not workdir.exists()


def test_cli_batch_not_divisible_by_devices(tmp_path):
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = run_cli(tmp_path / "w", "--config.train.batch_size=12", data_dir=tmp_path / "d", env=env)
  assert result.returncode == 2
  assert "error: config train.batch_size: 12 must be divisible by the mesh's 8 devices" in result.stderr
  assert not (tmp_path / "w").exists()


def test_cli_refuses_a_workdir_of_another_config(tmp_path):
  workdir = tmp_path / "w"
  first = run_cli(workdir, "--config.train.num_steps=2", data_dir=tmp_path / "d")
  assert first.returncode == 0, first.stderr[-2000:]
  before = sorted(os.listdir(workdir / "checkpoints"))
  other = run_cli(workdir, "--config.train.num_steps=2", "--config.moe.num_experts=2", data_dir=tmp_path / "d")
  assert other.returncode == 2
  assert "holds a run with a different config (moe.num_experts=4->2)" in other.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_vit_runs_from_the_cli_and_refuses_a_bad_patch_size(tmp_path):
  ok = run_cli(
    tmp_path / "vit",
    "--config.train.num_steps=3",
    "--config.train.log_every=1",
    data_dir=tmp_path / "d",
    config="configs/vit_digits.py:soft_moe",
    tiny=False,
  )
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "eval accuracy" in ok.stdout and "chance accuracy 0.1000" in ok.stdout
  bad = run_cli(
    tmp_path / "vit_bad",
    "--config.model.patch_size=3",
    data_dir=tmp_path / "d",
    config="configs/vit_digits.py",
    tiny=False,
  )
  assert bad.returncode == 2
  assert "error: config model.patch_size: must divide the 8×8 images, got 3" in bad.stderr
  assert not (tmp_path / "vit_bad").exists()
  unknown = run_cli(tmp_path / "vit_bad", data_dir=tmp_path / "d", config="configs/vit_digits.py:nope", tiny=False)
  assert unknown.returncode == 2 and "unknown preset 'nope'" in unknown.stderr


REVIEW_CASES = [
  ({"moe.router_noise": "noisy_top_k", "moe.top_k": 8}, "moe.router_noise"),
  ({"moe.router": "hash", "moe.top_k": 1, "moe.priority": "bpr", "moe.allow_noncausal": True}, "moe.priority"),
  ({"moe.router": "hash", "moe.top_k": 2}, "moe.top_k"),
  ({"moe.max_experts_per_token": 2}, "moe.max_experts_per_token"),
  ({"moe.num_expert_groups": 2}, "moe.num_expert_groups"),
  (
    {"moe.router": "soft_moe", "moe.allow_noncausal": True, "moe.importance_loss_weight": 0.1},
    "moe.importance_loss_weight",
  ),
  ({"model.moe_every": 5}, "model.moe_every"),
]


@pytest.mark.parametrize("overrides,field", REVIEW_CASES, ids=[f for _, f in REVIEW_CASES])
def test_settings_that_would_crash_or_be_ignored_are_refused(overrides, field):
  cfg = config_lib.override(config_lib.base_config(), overrides)
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(cfg, num_devices=8)
  assert error.value.field == field


def test_vit_groups_must_fit_the_batch_and_mesh():
  cfg = config_lib.override(config_lib.base_config("vit"), {"moe.group_size": 32, "train.batch_size": 3})
  config_lib.validate(cfg, num_devices=1)
  with pytest.raises(config_lib.ConfigError, match="moe.group_size"):
    build.vit_config(cfg, (8, 8, 1), 10, num_mesh_devices=1)  # 3 images × 16 tokens / 32.
  cfg.train.batch_size = 8
  build.vit_config(cfg, (8, 8, 1), 10, num_mesh_devices=4)  # 4 groups on 4 devices: fine.
  with pytest.raises(config_lib.ConfigError, match="moe.group_size"):
    build.vit_config(cfg, (8, 8, 1), 10, num_mesh_devices=8)


def test_cosine_run_refuses_a_new_horizon(tmp_path):
  workdir = tmp_path / "w"
  assert run_cli(workdir, "--config.train.num_steps=2", data_dir=tmp_path / "d").returncode == 0
  longer = run_cli(workdir, "--config.train.num_steps=4", data_dir=tmp_path / "d")
  assert longer.returncode == 2 and "train.num_steps=2->4" in longer.stderr


def test_a_saved_config_from_before_a_new_field_still_matches(tmp_path):
  cfg = config_lib.base_config()
  saved = cfg.to_dict()
  del saved["model"]["qk_norm"]  # A run saved before the field existed.
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert config_lib.differences_from_saved(str(tmp_path), cfg.to_dict())[0] == []
  cfg.model.qk_norm = True  # Set to other than its default: a different model.
  assert config_lib.differences_from_saved(str(tmp_path), cfg.to_dict())[0] == ["model.qk_norm=None->True"]
  cfg.model.qk_norm, cfg.model.d_model = False, 64
  assert config_lib.differences_from_saved(str(tmp_path), cfg.to_dict())[0] == ["model.d_model=128->64"]
