"""The config: loads without JAX, refuses settings nothing reads, and takes new router families."""

import ast
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from cli_util import REPO, run_cli
from moejax import config as config_lib
from moejax import routers


def test_every_config_file_loads_without_jax_or_flax(tmp_path):
  # configs/init_from.py takes a directory holding a config.json (a converted model, a run).
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config_lib.base_config("lm").to_dict(), f)
  code = (
    "import glob, importlib.util, sys\n"
    "for path in sorted(glob.glob('configs/*.py')):\n"
    "  spec = importlib.util.spec_from_file_location('c', path)\n"
    "  module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
    "  for preset in getattr(module, 'PRESETS', [None]):\n"
    "    module.get_config(preset) if preset else (\n"
    f"      module.get_config({str(tmp_path)!r}) if path.endswith('init_from.py') else module.get_config())\n"
    "import moejax.config\n"
    "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'jaxlib', 'flax', 'optax', 'orbax'}))"
  )
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"


def test_config_error_module_imports_no_moejax_module():
  tree = ast.parse(open(os.path.join(REPO, "moejax", "errors.py")).read())
  imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
  imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
  assert not [m for m in imported if m and m.startswith("moejax")]


def test_router_names_are_looked_up_only_in_the_registry():
  """No module outside moejax/routers/ compares moe.router with a family's name."""
  pattern = re.compile(r"router\s*(==|!=|\bin\b|\bnot in\b)\s*[\(\[\"']")
  offenders = []
  for path in glob.glob(os.path.join(REPO, "moejax", "**", "*.py"), recursive=True):
    if os.sep + "routers" + os.sep in path:
      continue
    for number, line in enumerate(open(path), 1):
      if pattern.search(line):
        offenders.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
  assert not offenders, offenders


def test_model_dataclasses_default_to_the_schema():
  from moejax.layers.moe import MoEConfig
  from moejax.models.decoder import DecoderConfig
  from moejax.models.vit import ViTConfig

  lm, vit = config_lib.base_config("lm"), config_lib.base_config("vit")
  moe = MoEConfig()
  for name, value in lm.moe.items():
    assert getattr(moe, name) == (value or lm.model.d_ff if name == "d_expert" else value), name
  assert (moe.activation, moe.init_scale) == (lm.model.activation, lm.model.init_scale)
  decoder, image = DecoderConfig(vocab_size=1), ViTConfig(image_size=8, channels=1, num_classes=2)
  for model, section in ((decoder, lm.model), (image, vit.model)):
    for field in dataclasses.fields(model):
      if field.name in section and field.default is not dataclasses.MISSING:
        assert getattr(model, field.name) == section[field.name], field.name
  assert decoder.max_len == lm.train.seq_len


def _refused(overrides, task="lm"):
  cfg = config_lib.override(config_lib.base_config(task), overrides)
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(cfg, num_devices=8)
  return error.value


# Settings nothing would read: (overrides, the field refused, words of the reason).
INACTIVE = [
  ({"data.tfds.name": "c4"}, "data.tfds.name", "data.source is 'markov_mixture'"),
  ({"data.source": "tfds", "data.markov.vocab_size": 32}, "data.markov.vocab_size", "data.source is 'tfds'"),
  ({"moe.hash_seed": 3}, "moe.hash_seed", "router 'hash'"),
  ({"moe.slots_per_expert": 2}, "moe.slots_per_expert", "router 'soft_moe'"),
  ({"moe.router": "expert_choice", "moe.allow_noncausal": True, "moe.top_k": 1}, "moe.top_k", "moe.router is"),
  (
    {"moe.router": "soft_moe", "moe.allow_noncausal": True, "moe.capacity_factor": 2.0},
    "moe.capacity_factor",
    "router",
  ),
  ({"moe.router": "soft_moe", "moe.allow_noncausal": True, "moe.dispatcher": "einsum"}, "moe.dispatcher", "router"),
  ({"moe.dispatcher": "einsum", "moe.permute_backend": "pallas"}, "moe.permute_backend", "dispatcher 'sort'"),
  ({"moe.dropless_block_size": 32}, "moe.dropless_block_size", "dispatcher 'dropless'"),
  ({"model.moe_every": 0, "moe.num_experts": 4}, "moe.num_experts", "no MoE layer"),
  ({"optim.schedule": "constant", "optim.end_lr_fraction": 0.5}, "optim.end_lr_fraction", "cosine"),
  ({"moe.jitter_eps": 0.5}, "moe.jitter_eps", "not 'jitter'"),
  ({"moe.dispatcher": "dropless", "moe.capacity_factor": 4.0}, "moe.capacity_factor", "no capacity"),
  ({"moe.jitter_scope": "router_and_experts"}, "moe.jitter_scope", "not 'jitter'"),
  ({"moe.load_loss_threshold": "overall"}, "moe.load_loss_threshold", "load_loss_weight is 0"),
  (
    {"moe.router_noise": "noisy_top_k", "moe.load_loss_threshold": "overall"},
    "moe.load_loss_threshold",
    "load_loss_weight is 0",
  ),
  ({"moe.routed_scaling_factor": 2.5}, "moe.routed_scaling_factor", "router 'deepseek'"),
  ({"moe.soft_similarity_metrics": False}, "moe.soft_similarity_metrics", "router 'soft_moe'"),
  ({"model.kv_lora_rank": 128}, "model.kv_lora_rank", "model.attention 'mla'"),
  ({"model.attention": "mla", "model.num_kv_heads": 2}, "model.num_kv_heads", "model.attention 'mha'"),
  ({"model.attention": "mla", "model.attention_sinks": True}, "model.attention_sinks", "model.attention 'mha'"),
  ({"model.yarn_factor": 4.0}, "model.yarn_factor", "model.rope_scaling is 'none'"),
  ({"model.positions": "learned", "model.rope_interleaved": True}, "model.rope_interleaved", "not 'rope'"),
  ({"model.full_attention_every": 2}, "model.full_attention_every", "model.sliding_window is 0"),
  ({"model.mtp_loss_weight": 0.1}, "model.mtp_loss_weight", "model.mtp_depth is 0"),
  ({"model.attention": "mla", "model.clip_qkv": 8.0}, "model.clip_qkv", "model.attention 'mha'"),
  ({"model.moe_every": 0, "model.parallel_dense_d_ff": 64}, "model.parallel_dense_d_ff", "no MoE block"),
  ({"moe.router": "deepseek", "moe.group_score": "max"}, "moe.group_score", "num_expert_groups is 1"),
]

# Bad values of the attention, RoPE and MTP fields: each refused by name.
MODEL_CASES = [
  ({"model.attention": "gqa"}, "model.attention"),
  ({"model.attention": "mla", "model.kv_lora_rank": 0}, "model.kv_lora_rank"),
  ({"model.attention": "mla", "model.qk_rope_head_dim": 7}, "model.qk_rope_head_dim"),
  ({"model.attention": "mla", "model.positions": "learned"}, "model.positions"),
  ({"model.sliding_window": -1}, "model.sliding_window"),
  ({"model.rope_scaling": "ntk"}, "model.rope_scaling"),
  ({"model.rope_scaling": "yarn", "model.yarn_factor": 0.5}, "model.yarn_factor"),
  ({"model.rope_scaling": "yarn", "model.yarn_beta_fast": 0.5}, "model.yarn_beta_fast"),
  ({"model.rope_scaling": "yarn", "model.yarn_original_max_len": 0}, "model.yarn_original_max_len"),
  ({"model.rope_scaling": "yarn", "model.yarn_mscale": -1.0}, "model.yarn_mscale"),
  ({"model.mtp_depth": -1}, "model.mtp_depth"),
  ({"model.norm": "batch"}, "model.norm"),
  ({"model.clip_qkv": -1.0}, "model.clip_qkv"),
  ({"model.attention_softcap": -30.0}, "model.attention_softcap"),
  ({"model.parallel_dense_d_ff": -1}, "model.parallel_dense_d_ff"),
  ({"model.embed_multiplier": 0.0}, "model.embed_multiplier"),
  ({"model.output_multiplier": -1.0}, "model.output_multiplier"),
  ({"moe.router": "deepseek", "moe.num_expert_groups": 2, "moe.group_score": "mean"}, "moe.group_score"),
]


@pytest.mark.parametrize("overrides,field", MODEL_CASES, ids=[f for _, f in MODEL_CASES])
def test_attention_rope_and_mtp_values_are_checked(overrides, field):
  assert _refused(overrides).field == field


@pytest.mark.parametrize("overrides,field,reason", INACTIVE, ids=[f for _, f, _ in INACTIVE])
def test_a_setting_nothing_reads_is_refused(overrides, field, reason):
  error = _refused(overrides)
  assert error.field == field and reason in str(error)


def test_allow_noncausal_is_refused_in_a_vit():
  assert "only a decoder" in str(_refused({"moe.allow_noncausal": True}, task="vit"))


def test_a_dense_model_does_not_constrain_the_expert_axis():
  cfg = config_lib.override(config_lib.base_config(), {"model.moe_every": 0, "mesh.expert": 3, "train.batch_size": 36})
  config_lib.validate(cfg, num_devices=6)


def test_saved_runs_differ_only_in_fields_the_run_reads(tmp_path):
  """A run saved with an inactive setting (the hash preset used to set moe.load_balance_loss_weight) resumes."""
  cfg = config_lib.override(config_lib.base_config(), {"moe.router": "hash", "moe.top_k": 1})
  saved = cfg.to_dict()
  saved["moe"]["load_balance_loss_weight"] = 0.0
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert config_lib.differences_from_saved(str(tmp_path), cfg.to_dict())[0] == []
  cfg.moe.hash_seed = 5  # Read by the hash router: a different run.
  assert config_lib.differences_from_saved(str(tmp_path), cfg.to_dict())[0] == ["moe.hash_seed=0->5"]


def test_inactive_fields_at_their_defaults_and_active_ones_pass():
  for overrides in (
    {"moe.router": "hash", "moe.top_k": 1, "moe.hash_seed": 3},
    {"moe.router": "soft_moe", "moe.allow_noncausal": True, "moe.slots_per_expert": 2},
    {"moe.dispatcher": "dropless", "moe.dropless_block_size": 32, "moe.permute_backend": "xla"},
    {"data.source": "tfds", "data.tfds.name": "c4"},
    {"model.moe_every": 0},
    {"optim.schedule": "constant"},
    {"moe.router_noise": "noisy_top_k", "moe.load_loss_weight": 0.01, "moe.load_loss_threshold": "overall"},
    {"moe.load_balance_pooling": "all_layers", "moe.load_balance_scope": "global_batch"},
    {"moe.router": "deepseek", "moe.routed_scaling_factor": 2.5},
    {"moe.router": "deepseek", "moe.num_expert_groups": 2, "moe.group_score": "max"},
    {"model.attention": "mla", "model.q_lora_rank": 32, "model.rope_interleaved": True},
    {"model.rope_scaling": "yarn", "model.yarn_factor": 4.0, "model.yarn_mscale_all_dim": 0.707},
    {"model.sliding_window": 8, "model.full_attention_every": 2, "model.attention_sinks": True},
    {"model.mtp_depth": 2, "model.mtp_loss_weight": 0.1},
    {"moe.router_noise": "jitter", "moe.jitter_scope": "router_and_experts"},
  ):
    config_lib.validate(config_lib.override(config_lib.base_config(), overrides), num_devices=8)
  vit = config_lib.override(config_lib.base_config("vit"), {"data.source": "tfds", "data.tfds.name": "cifar10"})
  config_lib.validate(vit, num_devices=8)
  assert _refused({"data.tfds.name": "cifar10"}, task="vit").field == "data.tfds.name"


# Each family checks its own options.
FAMILY_CASES = [
  ({"moe.router": "soft_moe", "moe.allow_noncausal": True, "moe.slots_per_expert": 0}, "moe.slots_per_expert"),
  ({"moe.router": "deepseek", "moe.num_expert_groups": 3}, "moe.num_expert_groups"),
  (
    {"moe.router": "expert_choice", "moe.allow_noncausal": True, "moe.max_experts_per_token": 9},
    "moe.max_experts_per_token",
  ),
  ({"moe.router": "top_k", "moe.combine_weights": "softmax"}, "moe.combine_weights"),
  ({"moe.router": "dense", "moe.dispatcher": "gather"}, "moe.dispatcher"),
  ({"moe.router": "no_such_router"}, "moe.router"),
  ({"moe.load_balance_pooling": "all_layers"}, "moe.load_balance_pooling"),  # Needs scope 'global_batch'.
  ({"moe.router": "deepseek", "moe.routed_scaling_factor": 0.0}, "moe.routed_scaling_factor"),
  (
    {"moe.router_noise": "noisy_top_k", "moe.load_loss_weight": 0.01, "moe.load_loss_threshold": "vmoe"},
    "moe.load_loss_threshold",
  ),
]


@pytest.mark.parametrize("overrides,field", FAMILY_CASES, ids=[f for _, f in FAMILY_CASES])
def test_each_family_validates_its_own_options(overrides, field):
  assert _refused(overrides).field == field


def test_the_cli_refuses_an_inactive_setting_in_one_line(tmp_path):
  result = run_cli(tmp_path / "w", "--config.data.tfds.name=c4", data_dir=tmp_path / "d")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert errors == [
    "error: config data.tfds.name: is not used here (data.source is 'markov_mixture'); remove the "
    "setting, or select what reads it"
  ]
  assert not (tmp_path / "w").exists()


def test_a_new_router_family_in_one_file_trains_from_the_cli(tmp_path):
  """tests/toy_router.py defines and registers 'tempered_top1'; nothing else in moejax knows it."""
  assert "tempered_top1" not in routers.names()
  workdir = tmp_path / "toy"
  result = run_cli(
    workdir,
    "--config.train.num_steps=30",
    "--config.train.checkpoint_every=30",
    "--config.optim.learning_rate=1e-2",
    data_dir=tmp_path / "d",
    config="tests/toy_router.py",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["moe"]["router"] == "tempered_top1" and saved["moe"]["temperature"] == 0.5
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["split"] == "train"]
  assert len(train) == 30 and sum(r["loss"] for r in train[-5:]) < sum(r["loss"] for r in train[:5]) - 0.5
  # The family's metrics and losses arrive like a built-in family's.
  assert train[-1]["moe_layer0/tokens_with_ge2_experts"] == 0.0 and train[-1]["load_balance_loss"] > 0
  # Its option is validated by its own rule, and refused for other families.
  bad = run_cli(tmp_path / "bad", "--config.moe.temperature=0", data_dir=tmp_path / "d", config="tests/toy_router.py")
  assert bad.returncode == 2 and "error: config moe.temperature: must be > 0, got 0" in bad.stderr
  other = run_cli(
    tmp_path / "other", "--config.moe.router=top_k", data_dir=tmp_path / "d", config="tests/toy_router.py"
  )
  assert other.returncode == 2 and "error: config moe.temperature: is not used here" in other.stderr
