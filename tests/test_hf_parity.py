"""The presets compute the released models' function: logit parity with transformers.

Each case of tests/hf_reference.py is a released config.json with small sizes and random
weights. Its transformers config and weights go through `moejax.convert.hf` (the library's one
table of each architecture's names) into a moejax DecoderLM; on the same tokens moejax must give
  float32:  max |Δ logits| < 1e-4 and the same experts for every token in every MoE layer;
  bfloat16: max |Δ logits| vs transformers' float32 logits < BF16_TOLERANCE (unless bfloat16
            rounding flips a near-tie expert choice), and no more than BF16_VS_TRANSFORMERS ×
            transformers' own bfloat16 error (+ 1e-2) — moejax in bfloat16 strays from the
            float32 function no further than the reference does.
The golden tests read the committed fixtures (tests/fixtures/hf, written by
`python tests/hf_reference.py`) and need no torch; the live tests build the transformers models
afresh and run when torch and transformers are installed (the `hf` extra; CI runs them).
"""

from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_reference  # noqa: E402

from moejax import analysis, tasks  # noqa: E402
from moejax.config import base_config, override  # noqa: E402
from moejax.convert import hf  # noqa: E402
from moejax.errors import ConfigError  # noqa: E402
from moejax.models.build import decoder_config  # noqa: E402
from moejax.models.decoder import DecoderLM  # noqa: E402

FLOAT32_TOLERANCE = 1e-4
BF16_TOLERANCE = 0.15
BF16_VS_TRANSFORMERS = 2.0
CASES = sorted(hf_reference.CASES)


def _fixture(case):
  meta, weights, arrays = hf_reference.load_fixture(case)
  return meta, weights, arrays, sum(k.startswith("experts/") for k in arrays)


def _moejax_model(hf_config, weights, dtype="float32"):
  cfg = hf.moejax_config(hf_config, seq_len=hf_reference.SEQ_LEN)
  cfg.model.dtype = dtype
  # transformers' models hold no multi-token-prediction module (DeepSeek-V3's layer 61 is dropped
  # on load); the logits are the main model's either way.
  cfg.model.mtp_depth = 0
  model = DecoderLM(decoder_config(cfg, 0), rngs=nnx.Rngs(0))
  hf.load_hf_weights(model, weights, hf_config["model_type"])
  return model


@nnx.jit
def _forward(model, tokens):
  return model(tokens, train=False)  # Compiled: the op-by-op dropless layer takes ~20 s per model.


def _moejax_run(model, tokens):
  """(logits <float32>[B, L, V], [<int32>[B·L, K] sorted chosen experts of each MoE layer], balance loss)."""
  logits, aux = _forward(model, jnp.asarray(tokens))
  decisions = analysis.routing_decisions(model, jnp.asarray(tokens))
  experts = [np.sort(np.asarray(d.expert_index).reshape(-1, d.expert_index.shape[-1]), axis=-1) for d in decisions]
  _, metrics = tasks.moe_losses_and_metrics(aux, model.cfg.moe)
  return np.asarray(logits, np.float32), experts, float(metrics["load_balance_loss"])


def _check(case, hf_config, weights, tokens, ref32, experts32, ref16, ref_aux):
  """Asserts the parity bounds; returns (float32 max |Δ|, bfloat16 max |Δ| vs float32, transformers' own)."""
  logits, experts, balance = _moejax_run(_moejax_model(hf_config, weights), tokens)
  # The balance loss the presets train with is transformers' load_balancing_loss_func.
  np.testing.assert_allclose(balance, ref_aux, rtol=1e-5, err_msg=f"{case}: load balance loss")
  delta32 = float(np.abs(logits - ref32).max())
  assert delta32 < FLOAT32_TOLERANCE, f"{case}: float32 max |Δ logits| {delta32:.2e}"
  assert len(experts) == len(experts32) >= 1
  for layer, (ours, theirs) in enumerate(zip(experts, experts32)):
    differ = np.nonzero((ours != theirs).any(-1))[0]
    assert differ.size == 0, f"{case}: MoE layer {layer} chooses other experts for tokens {differ.tolist()}"
  logits16, experts16, _ = _moejax_run(_moejax_model(hf_config, weights, "bfloat16"), tokens)
  delta16, theirs16 = float(np.abs(logits16 - ref32).max()), float(np.abs(ref16 - ref32).max())
  # Where bfloat16 rounding flips a near-tie expert choice (gpt-oss-20b's case: transformers' own
  # bfloat16 run flips more), a logit moves by that expert's whole output: only the bound
  # relative to transformers' own bfloat16 error holds there.
  flipped = any((ours != theirs).any() for ours, theirs in zip(experts16, experts))
  assert flipped or delta16 < BF16_TOLERANCE, f"{case}: bfloat16 max |Δ logits| {delta16:.3f} vs float32"
  assert delta16 <= BF16_VS_TRANSFORMERS * theirs16 + 1e-2, (
    f"{case}: bfloat16 {delta16:.3f}, transformers {theirs16:.3f}"
  )
  return delta32, delta16, theirs16


@pytest.mark.parametrize("case", CASES)
def test_golden_parity(case):
  meta, weights, arrays, num_moe = _fixture(case)
  experts = [arrays[f"experts/{i}"] for i in range(num_moe)]
  golden = (arrays["logits_float32"], experts, arrays["logits_bfloat16"], float(arrays["aux_loss"]))
  _check(case, meta["config"], weights, arrays["tokens"], *golden)


def _architectural(overrides: dict) -> dict:
  """The fields that say which function a model computes, not how large it is or how it trains."""
  sizes = {
    "model.vocab_size",
    "model.num_layers",
    "model.d_model",
    "model.num_heads",
    "model.num_kv_heads",
    "model.head_dim",
    "model.d_ff",
    "moe.d_expert",
    "moe.num_experts",
    "moe.top_k",
    "moe.num_shared_experts",
    "model.kv_lora_rank",
    "model.qk_nope_head_dim",
    "model.qk_rope_head_dim",
    "model.v_head_dim",
    "model.sliding_window",
  }
  training = ("moe.load_balance", "model.mtp_")  # How the model trains, not what it computes.
  out = {k: v for k, v in overrides.items() if k not in sizes and not k.startswith(training)}
  if "model.q_lora_rank" in out:  # Its size is not architectural; whether queries have a latent is.
    out["model.q_lora_rank"] = bool(out["model.q_lora_rank"])
  return out


@pytest.mark.parametrize("case", [c for c in CASES if hf_reference.CASES[c][0]])
def test_preset_is_the_released_architecture(case):
  """The preset sets every architectural option as the released config.json (the fixture's) does."""
  sys.path.insert(0, os.path.join(os.path.dirname(hf_reference.FIXTURES), "..", "..", "configs"))
  import architectures

  preset = hf_reference.CASES[case][0]
  meta, *_ = _fixture(case)
  converted = _architectural(hf.config_overrides(meta["config"]))
  cfg = architectures.get_config(preset)
  skip = {"moe.z_loss_weight"}  # A training choice (OLMoE's paper uses 1e-3; transformers has none).
  for field, value in converted.items():
    if field in skip:
      continue
    section, name = field.split(".")
    ours = bool(cfg[section][name]) if field == "model.q_lora_rank" else cfg[section][name]
    assert ours == value, f"{preset}: {field} is {cfg[section][name]!r}, released {value!r}"


def test_both_expert_layouts_load_the_same_model():
  """Released files hold one tensor per expert (Mixtral: block_sparse_moe.experts.{j}.w1/w3/w2)."""
  meta, weights, arrays, _ = _fixture("mixtral_8x7b")
  legacy = {}
  for name, value in weights.items():
    if ".mlp.experts.gate_up_proj" in name:
      layer = name.split(".mlp.")[0]
      f = value.shape[1] // 2
      for j in range(value.shape[0]):
        legacy[f"{layer}.block_sparse_moe.experts.{j}.w1.weight"] = value[j, :f]
        legacy[f"{layer}.block_sparse_moe.experts.{j}.w3.weight"] = value[j, f:]
    elif ".mlp.experts.down_proj" in name:
      layer = name.split(".mlp.")[0]
      for j in range(value.shape[0]):
        legacy[f"{layer}.block_sparse_moe.experts.{j}.w2.weight"] = value[j]
    else:
      legacy[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = value
  fused = _moejax_model(meta["config"], weights)
  per_expert = _moejax_model(meta["config"], legacy)
  tokens = jnp.asarray(arrays["tokens"])
  np.testing.assert_array_equal(np.asarray(_forward(fused, tokens)[0]), np.asarray(_forward(per_expert, tokens)[0]))


@pytest.mark.parametrize(
  "case",
  ["qwen2_57b_a14b", "olmoe_1b_7b", "qwen2_moe_sparse_step_tied", "deepseek_v2_lite", "deepseek_v3", "gpt_oss_20b"],
)
def test_export_is_the_inverse_of_load(case):
  meta, weights, *_ = _fixture(case)
  model = _moejax_model(meta["config"], weights)
  exported = hf.export_hf_weights(model, meta["config"]["model_type"])
  assert sorted(exported) == sorted(weights)
  for name, value in weights.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_bad_configs_and_checkpoints_name_the_key_or_tensor():
  meta, weights, *_ = _fixture("qwen3_30b_a3b")
  config = meta["config"]
  cases = [
    ({**config, "model_type": "llama"}, "config.model_type"),
    ({**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6, "factor": 4.0}}, "rope_type"),
    (
      {**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "beta": 2}},
      "rope_parameters.beta",
    ),
    (
      {**config, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "factor": 4.0}},
      "rope_parameters.factor",
    ),
    ({**config, "use_sliding_window": True}, "use_sliding_window"),
    ({**config, "hidden_act": "gelu"}, "hidden_act"),
    ({**config, "some_new_option": 1}, "some_new_option"),
  ]
  gpt_oss = _fixture("gpt_oss_120b")[0]["config"]
  cases += [
    ({**gpt_oss, "swiglu_limit": 10.0}, "swiglu_limit"),
    ({**gpt_oss, "layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),  # full first: not every P-th
    ({**gpt_oss, "layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
    ({**gpt_oss, "sliding_window": None}, "sliding_window"),
  ]
  for bad, field in cases:
    with pytest.raises(ConfigError, match=field):
      hf.config_overrides(bad)
  windows = hf.config_overrides({**gpt_oss, "layer_types": ["sliding_attention"] * 2})  # Every block slides.
  assert windows["model.sliding_window"] == 4 and windows["model.full_attention_every"] == 0
  model = _moejax_model(config, weights)
  missing = {k: v for k, v in weights.items() if k != "model.layers.1.self_attn.q_norm.weight"}
  with pytest.raises(ConfigError, match=r"tensor model\.layers\.1\.self_attn\.q_norm\.weight: is missing"):
    hf.load_hf_weights(model, missing, "qwen3_moe")
  with pytest.raises(ConfigError, match="tensor model.layers.9.mlp.gate.weight: has no place"):
    hf.load_hf_weights(model, {**weights, "model.layers.9.mlp.gate.weight": np.zeros((16, 32))}, "qwen3_moe")
  wrong = {**weights, "model.norm.weight": np.zeros(31, np.float32)}
  with pytest.raises(ConfigError, match=r"parameter final_norm\.scale: expects shape \(32,\)"):
    hf.load_hf_weights(model, wrong, "qwen3_moe")


def test_fixtures_are_what_the_script_writes():
  """Every case has its committed fixture, with the versions it was made with (tests/hf_reference.py)."""
  for case in CASES:
    meta, weights, arrays, num_moe = _fixture(case)
    assert meta["case"] == case and meta["preset"] == hf_reference.CASES[case][0]
    assert meta["versions"]["torch"].startswith("2.13.0")
    assert arrays["tokens"].shape == (hf_reference.BATCH, hf_reference.SEQ_LEN)
    assert num_moe >= 1 and np.isfinite(arrays["logits_float32"]).all()


# ----- Live: transformers builds the models now (the `hf` extra; CI runs these). -----


@pytest.mark.parametrize("case", CASES)
def test_live_parity(case):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  model, hf_config, tokens = hf_reference.build(case)
  weights = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  if hf_config.get("tie_word_embeddings"):
    weights.pop("lm_head.weight")
  ref32, experts32, aux_loss = hf_reference.run(model, tokens, "float32")
  ref16, *_ = hf_reference.run(model, tokens, "bfloat16")
  delta32, delta16, theirs16 = _check(case, hf_config, weights, tokens.numpy(), ref32, experts32, ref16, aux_loss)
  print(f"{case}: float32 {delta32:.2e}, bfloat16 {delta16:.3e} (transformers bfloat16 {theirs16:.3e})")


def test_live_config_keys_are_all_known():
  """Every key transformers writes for these architectures is read or known to be bookkeeping."""
  pytest.importorskip("transformers")
  for case in CASES:
    _, hf_config, _ = hf_reference.build(case)
    hf.config_overrides(hf_config)  # Raises ConfigError naming any key moejax does not know.


def test_moejax_config_is_a_valid_config():
  from moejax.config import validate

  for case in CASES:
    meta, *_ = _fixture(case)
    cfg = hf.moejax_config(meta["config"], seq_len=hf_reference.SEQ_LEN)
    validate(cfg, num_devices=1)
    assert override(base_config("lm"), hf.config_overrides(meta["config"])).model.d_model == 32
