"""python -m moejax.convert: Hugging Face directories -> moejax checkpoints -> Hugging Face directories.

Every parity case of tests/hf_reference.py (the committed fixtures: a transformers config.json
and state dict of each released architecture, made small) is written as a model directory, one
safetensors file or shards with their index, converted to moejax and back: the tensors must come
back bit for bit, and the converted checkpoint must compute transformers' logits. Each refusal
(a misfit config, a missing, unexpected or misshapen tensor, an unsupported dtype or
architecture, a corrupt file, an existing --out) is one line naming it, exit status 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_reference  # noqa: E402
from cli_util import REPO  # noqa: E402

from moejax import weights  # noqa: E402
from moejax.config import saved_config  # noqa: E402
from moejax.convert import checkpoints, files  # noqa: E402
from moejax.errors import ConfigError  # noqa: E402
from moejax.models.build import decoder_config  # noqa: E402
from moejax.models.decoder import DecoderLM  # noqa: E402

CASES = sorted(hf_reference.CASES)


def _fixture(case):
  meta, state, arrays = hf_reference.load_fixture(case)
  return meta["config"], state, arrays


def _write_hf_dir(path, config, state, max_shard_bytes=10**12):
  """A Hugging Face model directory: config.json and one safetensors file or shards (by size)."""
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  writer = files.ShardWriter(str(path), max_shard_bytes)
  for name, value in state.items():
    writer.add(name, value)
  return writer.close()


def _quiet(*args):
  pass


def _load_converted(out_dir):
  """A DecoderLM with the converted checkpoint's weights (the main model), as moejax.generate loads one."""
  from moejax import generate

  return generate.load_decoder(str(out_dir))[1]


@pytest.mark.parametrize("case", CASES)
def test_round_trip_is_bit_exact(case, tmp_path):
  config, state, _ = _fixture(case)
  sharded = CASES.index(case) % 2 == 1  # Half the cases as shards with an index (each shard ~1/3 of the model).
  size = sum(v.nbytes for v in state.values())
  written = _write_hf_dir(tmp_path / "hf", config, state, size // 3 if sharded else 10**12)
  assert (files.INDEX_FILE in written) == sharded
  # transformers' state dicts hold no MTP module (DeepSeek-V3's); test_mtp_module_round_trips has one.
  without_mtp = bool(config.get("num_nextn_predict_layers"))
  report = checkpoints.from_hf(str(tmp_path / "hf"), str(tmp_path / "moejax"), without_mtp=without_mtp, say=_quiet)
  assert report["tensors"] == len(state)
  assert sorted(os.listdir(tmp_path / "moejax")) == ["checkpoint", "config.json", "conversion.json", "hf_config.json"]
  checkpoints.to_hf(str(tmp_path / "moejax"), str(tmp_path / "back"), max_shard_bytes=size // 2, say=_quiet)
  back = files.HFCheckpoint(str(tmp_path / "back"))
  assert sorted(back) == sorted(state)
  for name, value in state.items():
    assert back[name].dtype == value.dtype, name
    np.testing.assert_array_equal(back[name], value, err_msg=name)
  with open(tmp_path / "back" / "config.json") as f:
    assert json.load(f) == config


@pytest.mark.parametrize("case", ["mixtral_8x7b", "deepseek_v3", "dbrx", "gpt_oss_20b"])
def test_converted_checkpoint_computes_transformers_logits(case, tmp_path):
  config, state, arrays = _fixture(case)
  _write_hf_dir(tmp_path / "hf", config, state, sum(v.nbytes for v in state.values()) // 4)
  without_mtp = bool(config.get("num_nextn_predict_layers"))
  checkpoints.from_hf(str(tmp_path / "hf"), str(tmp_path / "moejax"), without_mtp=without_mtp, say=_quiet)
  model = _load_converted(tmp_path / "moejax")
  logits, _ = nnx.jit(lambda m, t: m(t, train=False))(model, jnp.asarray(arrays["tokens"]))
  delta = float(np.abs(np.asarray(logits) - arrays["logits_float32"]).max())
  assert delta < 1e-4, delta


def _assert_round_trip(root, config, state):
  """HF directory -> moejax -> HF directory under root: every tensor back bit for bit."""
  _write_hf_dir(root / "hf", config, state)
  checkpoints.from_hf(str(root / "hf"), str(root / "moejax"), say=_quiet)
  checkpoints.to_hf(str(root / "moejax"), str(root / "back"), say=_quiet)
  back = files.HFCheckpoint(str(root / "back"))
  assert sorted(back) == sorted(state)
  for name, value in state.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_mtp_module_round_trips(tmp_path):
  """DeepSeek-V3's released files hold its MTP module as layer L; it converts both ways, or is left out."""
  from moejax.convert import hf

  config, _, _ = _fixture("deepseek_v3")
  cfg = hf.moejax_config(config)
  assert cfg.model.mtp_depth == 1
  model = DecoderLM(decoder_config(cfg, 0), rngs=nnx.Rngs(3))
  state = hf.export_hf_weights(model, "deepseek_v3")
  layer = f"model.layers.{cfg.model.num_layers}"
  assert f"{layer}.eh_proj.weight" in state
  # The release's layout: the module also holds copies of the shared embedding and head.
  np.testing.assert_array_equal(state[f"{layer}.embed_tokens.weight"], state["model.embed_tokens.weight"])
  np.testing.assert_array_equal(state[f"{layer}.shared_head.head.weight"], state["lm_head.weight"])
  _assert_round_trip(tmp_path / "main_model", config, state)
  _write_hf_dir(tmp_path / "hf", config, state)
  said = []
  report = checkpoints.from_hf(str(tmp_path / "hf"), str(tmp_path / "main"), without_mtp=True, say=said.append)
  mtp = [name for name in state if name.startswith(f"{layer}.")]
  assert report["tensors"] == len(state) - len(mtp) and f"{len(mtp)} of its tensors left out" in said[-1]
  assert saved_config(str(tmp_path / "main" / "config.json")).model.mtp_depth == 0
  # With tied embeddings, the module's head copy is the embedding (there is no lm_head).
  tied_config = {**config, "tie_word_embeddings": True}
  tied = DecoderLM(decoder_config(hf.moejax_config(tied_config), 0), rngs=nnx.Rngs(4))
  tied_state = hf.export_hf_weights(tied, "deepseek_v3")
  assert "lm_head.weight" not in tied_state
  np.testing.assert_array_equal(tied_state[f"{layer}.shared_head.head.weight"], tied_state["model.embed_tokens.weight"])
  _assert_round_trip(tmp_path / "tied", tied_config, tied_state)
  main_config, main_state, _ = _fixture("mixtral_8x7b")
  _write_hf_dir(tmp_path / "mixtral", main_config, main_state)
  with pytest.raises(ConfigError, match="--without_mtp: the model has no multi-token-prediction module"):
    checkpoints.from_hf(str(tmp_path / "mixtral"), str(tmp_path / "x"), without_mtp=True, say=_quiet)


def test_bfloat16_weights_stay_bfloat16_and_cast_on_request(tmp_path):
  config, state, _ = _fixture("qwen3_30b_a3b")
  state16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}
  _write_hf_dir(tmp_path / "hf", config, state16)
  report = checkpoints.from_hf(str(tmp_path / "hf"), str(tmp_path / "moejax"), say=_quiet)
  assert set(report["elements_by_dtype"]) == {"bfloat16"}  # Stored as released: half the bytes of float32.
  checkpoints.to_hf(str(tmp_path / "moejax"), str(tmp_path / "same"), say=_quiet)
  checkpoints.to_hf(str(tmp_path / "moejax"), str(tmp_path / "f32"), dtype="float32", say=_quiet)
  same, f32 = files.HFCheckpoint(str(tmp_path / "same")), files.HFCheckpoint(str(tmp_path / "f32"))
  for name, value in state16.items():
    assert same[name].dtype == value.dtype and f32[name].dtype == np.float32
    np.testing.assert_array_equal(same[name], value)
    np.testing.assert_array_equal(f32[name], value.astype(np.float32))  # bfloat16 -> float32 is exact.
  with open(tmp_path / "f32" / "config.json") as f:
    assert json.load(f)["dtype"] == "float32"


def test_a_run_started_from_a_converted_model_exports(tmp_path):
  """A real run from a converted model (configs/init_from.py) exports its trained weights; they convert back bit for bit."""
  from cli_util import run_cli

  config, state, _ = _fixture("qwen3_30b_a3b")
  _write_hf_dir(tmp_path / "hf", config, state)
  checkpoints.from_hf(str(tmp_path / "hf"), str(tmp_path / "moejax"), say=_quiet)
  run = tmp_path / "run"
  result = run_cli(
    run,
    "--config.train.num_steps=2",
    "--config.train.seq_len=16",
    "--config.train.batch_size=8",
    "--config.data.markov.vocab_size=16",
    "--config.data.markov.num_train=256",
    "--config.data.markov.num_validation=16",
    "--config.data.num_eval_batches=1",
    data_dir=str(tmp_path / "tfds"),
    config=f"configs/init_from.py:{tmp_path / 'moejax'}",
    tiny=False,
  )
  assert result.returncode == 0, result.stderr
  with pytest.raises(ConfigError, match="--step: the run in .* has no checkpoint at step 3 \\(it has \\[2\\]\\)"):
    checkpoints.to_hf(str(run), str(tmp_path / "x"), step=3, say=_quiet)
  # The run holds no hf_config.json: the converted model it started from (init.checkpoint) gives it.
  checkpoints.to_hf(str(run), str(tmp_path / "back"), say=_quiet)
  back = files.HFCheckpoint(str(tmp_path / "back"))
  assert sorted(back) == sorted(state)
  assert any(not np.array_equal(back[name], value) for name, value in state.items())  # Trained: it moved.
  checkpoints.from_hf(str(tmp_path / "back"), str(tmp_path / "again"), say=_quiet)
  trained, _ = weights.item_directory(str(run))
  again, _ = weights.item_directory(str(tmp_path / "again"))
  cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta = weights.metadata(trained)["params"]
  targets = {"params": {k: jax.ShapeDtypeStruct(shape, dtype, sharding=cpu) for k, (shape, dtype) in meta.items()}}
  ours, theirs = weights.restore(trained, targets)["params"], weights.restore(again, targets)["params"]
  for name in meta:
    np.testing.assert_array_equal(np.asarray(theirs[name]), np.asarray(ours[name]), err_msg=".".join(name))


@pytest.mark.parametrize("case", CASES)
def test_config_json_from_the_moejax_config_alone(case, tmp_path):
  """config.json written from the moejax config: the same model_type, converting back to the same moejax model.

  The fixture's model without its hf_config.json exports (to-hf writes config.json itself) and
  converts back bit for bit; the live test below loads such an export in transformers.
  """
  from moejax.convert import hf, hf_config

  config, state, _ = _fixture(case)
  ours = hf_config.config_json(hf.moejax_config(config))
  assert ours["model_type"] == config["model_type"]
  assert ours["architectures"] == [hf_config.CAUSAL_LM[config["model_type"]]]
  assert hf.config_overrides(ours) == hf.config_overrides(config)
  _write_hf_dir(tmp_path / "hf", config, state)
  without_mtp = bool(config.get("num_nextn_predict_layers"))  # transformers' state dicts hold no MTP module.
  checkpoints.from_hf(str(tmp_path / "hf"), str(tmp_path / "moejax"), without_mtp=without_mtp, say=_quiet)
  os.remove(tmp_path / "moejax" / "hf_config.json")
  checkpoints.to_hf(str(tmp_path / "moejax"), str(tmp_path / "back"), say=_quiet)
  with open(tmp_path / "back" / "config.json") as f:
    written = hf.config_overrides(json.load(f))
  assert written == {**hf.config_overrides(config), **({"model.mtp_depth": 0} if without_mtp else {})}
  back = files.HFCheckpoint(str(tmp_path / "back"))
  assert sorted(back) == sorted(state)
  for name in back:
    np.testing.assert_array_equal(back[name], state[name], err_msg=name)


def test_config_json_of_every_preset_or_the_field_that_has_no_transformers_model():
  from moejax.config import common
  from moejax.convert import hf_config

  presets = checkpoints.load_presets()
  got = {}
  for name in presets.PRESETS:
    try:
      got[name] = hf_config.config_json(presets.get_config(name))["model_type"]
    except ConfigError as e:
      got[name] = str(e)
  assert got["mixtral_8x7b"] == "mixtral" and got["qwen1_5_moe_a2_7b"] == "qwen2_moe" and got["dbrx"] == "dbrx"
  assert (
    got["deepseek_v3"] == "deepseek_v3" and got["deepseek_v2_lite"] == "deepseek_v2" and got["gpt_oss_20b"] == "gpt_oss"
  )
  assert got["olmoe_1b_7b"] == "olmoe" and got["qwen3_235b_a22b"] == "qwen3_moe"
  assert "model.parallel_dense_d_ff is 7168 here, 0 in the nearest" in got["arctic"]  # Not in transformers.
  assert "model.activation is 'geglu' here" in got["grok_1"]
  quickstart = common.small_lm()
  quickstart.model.vocab_size = 64
  with pytest.raises(ConfigError, match="--hf_config: no transformers architecture .* model.activation is 'gelu' here"):
    hf_config.config_json(quickstart)


def test_an_array_the_architecture_has_no_tensor_for_is_refused(tmp_path, monkeypatch):
  """to-hf refuses a checkpoint array that the export writes nowhere (transformers would compute without it).

  Stood in for by an export that forgets the final norm; the real case is a moving DeepSeek balancing
  bias under an architecture without one, which config.json already refuses.
  """
  from moejax.convert import hf

  config, state, _ = _fixture("qwen3_30b_a3b")
  _write_hf_dir(tmp_path / "hf", config, state)
  checkpoints.from_hf(str(tmp_path / "hf"), str(tmp_path / "moejax"), say=_quiet)
  export_part = hf.export_part

  def forgetful(flat, part, cfg, model_type):
    return {} if part == "final norm" else export_part(flat, part, cfg, model_type)

  monkeypatch.setattr(hf, "export_part", forgetful)
  with pytest.raises(ConfigError, match="parameter final_norm.scale: has no tensor in a qwen3_moe checkpoint"):
    checkpoints.to_hf(str(tmp_path / "moejax"), str(tmp_path / "back"), say=_quiet)
  assert not (tmp_path / "back").exists()


class _Presets:
  """A stand-in for configs/architectures.py with one tiny preset: the fixture's own model."""

  def __init__(self, config):
    self.PRESETS = {"tiny": None, "other": None}
    self._config = config

  def get_config(self, name):
    from moejax.convert import hf

    cfg = hf.moejax_config(self._config)
    cfg.moe.z_loss_weight = 0.001  # A recipe of the preset's own: training fields may differ.
    if name == "other":
      cfg.model.rope_theta = 1.0
    return cfg


def test_preset_is_checked_or_inferred():
  config, _, _ = _fixture("olmoe_1b_7b")
  presets = _Presets(config)
  cfg, name = checkpoints.resolve_config(config, None, presets)
  assert name == "tiny" and cfg.moe.z_loss_weight == 0.001  # The preset's config, recipe included.
  assert checkpoints.resolve_config(config, "tiny", presets)[1] == "tiny"
  with pytest.raises(ConfigError, match="--preset: other is not the model in config.json: model.rope_theta is 1.0"):
    checkpoints.resolve_config(config, "other", presets)
  with pytest.raises(ConfigError, match="--preset: unknown preset 'mixtral'"):
    checkpoints.resolve_config(config, "mixtral", presets)
  # The real presets are the released sizes: a tiny model is none of them, and is refused as one.
  cfg, name = checkpoints.resolve_config(config, None)
  assert name is None and cfg.model.d_model == 32
  with pytest.raises(ConfigError, match="--preset: olmoe_1b_7b is not the model in config.json: model.vocab_size"):
    checkpoints.resolve_config(config, "olmoe_1b_7b")


def _convert(*args, cwd=REPO):
  return subprocess.run(
    [sys.executable, "-m", "moejax.convert", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
  )


def _bad_dirs(tmp_path):
  """(name, hf directory, the one line expected) for each kind of bad input."""
  config, state, _ = _fixture("qwen3_30b_a3b")
  cases = []

  def make(name, config=config, state=state, **kw):
    path = tmp_path / name
    make.written = _write_hf_dir(path, config, state, **kw)
    return path

  missing = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_proj.weight"}
  cases.append(("missing", make("missing", state=missing), "tensor model.layers.1.self_attn.k_proj.weight: is missing"))
  extra = {**state, "model.layers.1.mlp.extra.weight": np.zeros((2, 2), np.float32)}
  cases.append(("extra", make("extra", state=extra), "tensor model.layers.1.mlp.extra.weight: has no place"))
  beyond = {**state, "model.layers.7.mlp.gate.weight": np.zeros((16, 32), np.float32)}
  cases.append(("beyond", make("beyond", state=beyond), "tensor model.layers.7.mlp.gate.weight: has no place"))
  shape = dict(state)
  shape["model.layers.0.mlp.gate.weight"] = np.zeros((8, 32), np.float32)
  cases.append(
    (
      "shape",
      make("shape", state=shape),
      "tensors of model.layers.0: give parameter blocks.0.ffn.router.kernel shape (32, 8)",
    )
  )
  q = dict(state)
  q["model.layers.1.self_attn.q_proj.weight"] = np.zeros((60, 32), np.float32)  # Not heads × head_dim rows.
  cases.append(("q_shape", make("q_shape", state=q), "tensors of layer 1 of the checkpoint: do not have the shapes"))
  ints = {**state, "model.norm.weight": state["model.norm.weight"].astype(np.int32)}
  cases.append(
    ("dtype", make("dtype", state=ints), "tensor model.norm.weight: has dtype I32; moejax loads F32, F16, BF16")
  )
  cases.append(
    ("arch", make("arch", config={**config, "model_type": "llama"}), "config.model_type: 'llama' is not converted")
  )
  rope = {**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6, "factor": 4.0}}
  cases.append(("rope", make("rope", config=rope), "rope_type"))
  corrupt = make("corrupt", max_shard_bytes=sum(v.nbytes for v in state.values()) // 3)
  shard = corrupt / make.written[1]
  shard.write_bytes(shard.read_bytes()[:-100])  # Truncated.
  cases.append(("corrupt", corrupt, f"file {shard}: is not a readable safetensors file"))
  lost = make("lost", max_shard_bytes=sum(v.nbytes for v in state.values()) // 3)
  os.remove(lost / make.written[-2])
  cases.append(("lost", lost, f"file {lost / make.written[-2]}: is listed in model.safetensors.index.json"))
  garbled = make("garbled")
  (garbled / "config.json").write_text("{not json")
  cases.append(("garbled", garbled, f"file {garbled / 'config.json'}: is not readable JSON"))
  empty = tmp_path / "empty"
  os.makedirs(empty)
  cases.append(("empty", empty, f"--hf_dir: '{empty}' holds no config.json"))
  return cases


def test_every_bad_input_is_one_line_naming_it(tmp_path):
  for name, hf_dir, expected in _bad_dirs(tmp_path):
    out = tmp_path / f"out-{name}"
    result = _convert("from-hf", "--hf_dir", hf_dir, "--out", out)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (name, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (name, lines)
    assert not os.path.exists(out) and not os.path.exists(f"{out}.partial"), name  # Nothing left behind.


def test_an_existing_out_is_never_touched(tmp_path):
  config, state, _ = _fixture("olmoe_1b_7b")
  _write_hf_dir(tmp_path / "hf", config, state)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "mine.txt").write_text("keep")
  result = _convert("from-hf", "--hf_dir", tmp_path / "hf", "--out", tmp_path / "out")
  assert result.returncode == 2 and "--out:" in result.stderr and "exists" in result.stderr
  assert os.listdir(tmp_path / "out") == ["mine.txt"]
  ok = _convert("from-hf", "--hf_dir", tmp_path / "hf", "--out", tmp_path / "moejax")
  assert ok.returncode == 0, ok.stderr
  assert "no preset of configs/architectures.py is this model" in ok.stdout
  bad = _convert("to-hf", "--checkpoint", tmp_path / "moejax", "--out", tmp_path / "b", "--max_shard_size", "lots")
  assert (
    bad.returncode == 2
    and bad.stderr.strip() == "error: --max_shard_size: 'lots' is not a size (e.g. 5GB, 500MB, 2GiB)"
  )
  nan = _convert("to-hf", "--checkpoint", tmp_path / "moejax", "--out", tmp_path / "b", "--max_shard_size", "nan")
  assert nan.returncode == 2 and nan.stderr.startswith("error: --max_shard_size: 'nan' is not a size")
  for out, why in (("", "must name a new directory"), (tmp_path / "no" / "such", "that would hold it does not exist")):
    bad = _convert("to-hf", "--checkpoint", tmp_path / "moejax", "--out", out)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --out: ") and why in bad.stderr, bad.stderr
  usage = _convert("to-hf", "--out", tmp_path / "c")
  assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1 and "--checkpoint" in usage.stderr


@pytest.mark.parametrize("case", CASES)
def test_live_exported_directory_loads_in_transformers(case, tmp_path):
  """to-hf's directory is a transformers model: from_pretrained loads it and computes the fixture's logits."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config, state, arrays = _fixture(case)
  _write_hf_dir(tmp_path / "hf", config, state)
  without_mtp = bool(config.get("num_nextn_predict_layers"))
  checkpoints.from_hf(str(tmp_path / "hf"), str(tmp_path / "moejax"), without_mtp=without_mtp, say=_quiet)
  size = sum(v.nbytes for v in state.values())
  checkpoints.to_hf(str(tmp_path / "moejax"), str(tmp_path / "back"), max_shard_bytes=size // 3, say=_quiet)
  assert os.path.isfile(tmp_path / "back" / files.INDEX_FILE)  # Sharded, as released checkpoints are.

  def logits_of(directory):
    model = transformers.AutoModelForCausalLM.from_pretrained(
      str(directory), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
      return model(torch.as_tensor(arrays["tokens"])).logits.float().numpy()

  np.testing.assert_allclose(logits_of(tmp_path / "back"), arrays["logits_float32"], atol=1e-5, rtol=0)
  # Again with config.json written from the moejax config alone (no hf_config.json to copy).
  os.remove(tmp_path / "moejax" / "hf_config.json")
  checkpoints.to_hf(str(tmp_path / "moejax"), str(tmp_path / "alone"), say=_quiet)
  np.testing.assert_allclose(logits_of(tmp_path / "alone"), arrays["logits_float32"], atol=1e-5, rtol=0)


def test_peak_memory_does_not_grow_with_the_model(tmp_path):
  """python -m experiments.convert_memory at a small size: 4x the layers, the converter's peak stays put."""
  result = subprocess.run(
    [sys.executable, "-m", "experiments.convert_memory", "--layers", "4,16", "--d_model", "256", "--d_ff", "896"]
    + ["--vocab", "8000", "--max_shard_size", "40MB", "--tmp", str(tmp_path)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  runs = json.loads(result.stdout.strip().splitlines()[-1])
  shallow, deep = runs["shallow"], runs["deep"]
  assert deep["model"] - shallow["model"] > 100e6  # 12 more layers of 11 MB.
  for command in ("from-hf", "to-hf"):
    growth = deep["peaks"][command] - shallow["peaks"][command]
    # A whole-model converter would grow by the 130 MB the model grew (float32 copies: twice that).
    assert growth < 0.25 * (deep["model"] - shallow["model"]), (command, runs)
