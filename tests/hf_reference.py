"""Tiny random transformers models of the released MoE architectures, for the parity tests.

Each case is a released model's config.json with only the sizes made small (>= 2 layers, >= 8
experts, top-k >= 2, grouped-query attention and head_dim != d/N where the release has them),
its weights drawn at random, run on fixed tokens in float32 and bfloat16 by transformers itself.

  pip install -e '.[hf]'           # torch==2.13.0 (CPU build on these machines), transformers
  python tests/hf_reference.py     # rewrites tests/fixtures/hf/<case>.safetensors and .json
  python tests/hf_reference.py --generation  # rewrites tests/fixtures/hf/generation.json from them

tests/test_hf_parity.py compares moejax with the committed files (no torch needed) and, when
torch and transformers are installed, with models this module builds afresh.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
BATCH, SEQ_LEN = 2, 12

# The released config.json values of the architectural options (Hugging Face Hub, as of 2026-12).
MIXTRAL_8X7B = dict(  # mistralai/Mixtral-8x7B-v0.1
  model_type="mixtral",
  rope_theta=1e6,
  rms_norm_eps=1e-5,
  sliding_window=None,
  num_local_experts=8,
  num_experts_per_tok=2,
  router_aux_loss_coef=0.02,
  tie_word_embeddings=False,
)
MIXTRAL_8X22B = {**MIXTRAL_8X7B, "router_aux_loss_coef": 0.001}  # mistralai/Mixtral-8x22B-v0.1
OLMOE = dict(  # allenai/OLMoE-1B-7B-0924
  model_type="olmoe",
  rope_theta=10000.0,
  rms_norm_eps=1e-5,
  clip_qkv=None,
  attention_bias=False,
  norm_topk_prob=False,
  router_aux_loss_coef=0.01,
  tie_word_embeddings=False,
)
QWEN3_30B_A3B = dict(  # Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B
  model_type="qwen3_moe",
  rope_theta=1e6,
  rms_norm_eps=1e-6,
  attention_bias=False,
  norm_topk_prob=True,
  decoder_sparse_step=1,
  mlp_only_layers=[],
  use_sliding_window=False,
  router_aux_loss_coef=0.001,
  tie_word_embeddings=False,
)
QWEN2_MOE = dict(  # Qwen/Qwen2-57B-A14B and Qwen/Qwen1.5-MoE-A2.7B
  model_type="qwen2_moe",
  rope_theta=1e6,
  rms_norm_eps=1e-6,
  norm_topk_prob=False,
  decoder_sparse_step=1,
  mlp_only_layers=[],
  use_sliding_window=False,
  router_aux_loss_coef=0.001,
  tie_word_embeddings=False,
)

# deepseek-ai/DeepSeek-V2: YaRN to 160k tokens (factor 40 over 4k), mscale = mscale_all_dim = 0.707;
# device-limited routing (8 groups, the best 3 by their best expert), softmax affinities, weights
# × 16; one dense block first; DeepSeek's own balance loss per sequence (α 0.003).
DEEPSEEK_V2 = dict(
  model_type="deepseek_v2",
  rope_parameters=dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=40.0,
    beta_fast=32,
    beta_slow=1,
    mscale=0.707,
    mscale_all_dim=0.707,
    original_max_position_embeddings=4096,
  ),
  max_position_embeddings=163840,
  rms_norm_eps=1e-6,
  attention_bias=False,
  first_k_dense_replace=1,
  n_group=8,
  topk_group=3,
  topk_method="group_limited_greedy",
  routed_scaling_factor=16.0,
  norm_topk_prob=False,
  scoring_func="softmax",
  aux_loss_alpha=0.003,
  seq_aux=True,
  ep_size=1,
  moe_layer_freq=1,
  tie_word_embeddings=False,
)
# deepseek-ai/DeepSeek-V2-Lite: no query latent, no group limit, weights × 1, α 0.001.
DEEPSEEK_V2_LITE = {
  **DEEPSEEK_V2,
  "n_group": 1,
  "topk_group": 1,
  "topk_method": "greedy",
  "routed_scaling_factor": 1.0,
  "aux_loss_alpha": 0.001,
}
# deepseek-ai/DeepSeek-V3: sigmoid affinities with the balancing bias (e_score_correction_bias),
# node-limited routing (8 groups, the best 4 by their top-2 sum), renormalised weights × 2.5,
# three dense blocks first, interleaved RoPE with YaRN (mscale = mscale_all_dim = 1), one MTP module.
DEEPSEEK_V3 = dict(
  model_type="deepseek_v3",
  rope_parameters={**DEEPSEEK_V2["rope_parameters"], "mscale": 1.0, "mscale_all_dim": 1.0},
  max_position_embeddings=163840,
  rms_norm_eps=1e-6,
  attention_bias=False,
  first_k_dense_replace=3,
  n_group=8,
  topk_group=4,
  topk_method="noaux_tc",
  routed_scaling_factor=2.5,
  norm_topk_prob=True,
  scoring_func="sigmoid",
  rope_interleave=True,
  aux_loss_alpha=0.001,
  seq_aux=True,
  ep_size=1,
  moe_layer_freq=1,
  num_nextn_predict_layers=1,
  tie_word_embeddings=False,
)
# openai/gpt-oss-20b and openai/gpt-oss-120b: YaRN (factor 32 over 4k, the ramp not truncated),
# a 128-token sliding window in every other block (even blocks), attention sinks, biases on q, k,
# v, o, a router bias, clamped SwiGLU experts with biases (α 1.702, limit 7).
GPT_OSS = dict(
  model_type="gpt_oss",
  rope_parameters=dict(
    rope_type="yarn",
    rope_theta=150000.0,
    factor=32.0,
    beta_fast=32.0,
    beta_slow=1.0,
    truncate=False,
    original_max_position_embeddings=4096,
  ),
  max_position_embeddings=131072,
  rms_norm_eps=1e-5,
  attention_bias=True,
  swiglu_alpha=1.702,
  swiglu_limit=7.0,
  router_aux_loss_coef=0.9,
  tie_word_embeddings=False,
)

# databricks/dbrx-base and dbrx-instruct: LayerNorm without bias, Wqkv clipped to ±8, RoPE base
# 5e5, 16 experts top-4 renormalised, router jitter 0.01 in training, balance loss 0.05.
DBRX = dict(
  model_type="dbrx",
  rope_theta=500000.0,
  attn_config=dict(clip_qkv=8.0, kv_n_heads=2, rope_theta=500000.0),  # kv_n_heads 8 of 48 heads in the release
  ffn_config=dict(moe_jitter_eps=0.01, moe_loss_weight=0.05, moe_num_experts=16, moe_top_k=4),
  resid_pdrop=0.0,
  emb_pdrop=0.0,
  tie_word_embeddings=False,
)

# MLA's small sizes: no key/value heads apart from the query heads (transformers needs them equal).
_MLA = dict(
  vocab_size=128,
  hidden_size=32,
  num_attention_heads=4,
  num_key_value_heads=4,
  kv_lora_rank=16,
  qk_nope_head_dim=8,
  qk_rope_head_dim=8,
  v_head_dim=12,
  intermediate_size=48,
  moe_intermediate_size=16,
)

# gpt-oss's: a 4-token window (the release's 128 would cover the 12 test tokens), 8 heads on 2 kv heads.
_OSS = dict(
  vocab_size=128,
  hidden_size=32,
  num_attention_heads=8,
  num_key_value_heads=2,
  head_dim=8,
  intermediate_size=16,
  num_experts_per_tok=4,
  sliding_window=4,
)

# Small sizes; head_dim != hidden_size / heads only where the release has it (Qwen3: 128 vs 64).
_GQA = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
_MHA = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=4)

# case: (preset it checks or None, released options, small sizes, seed).
CASES = {
  "mixtral_8x7b": ("mixtral_8x7b", MIXTRAL_8X7B, dict(_GQA, num_hidden_layers=2, intermediate_size=24), 0),
  "mixtral_8x22b": ("mixtral_8x22b", MIXTRAL_8X22B, dict(_GQA, num_hidden_layers=3, intermediate_size=16), 1),
  "olmoe_1b_7b": (
    "olmoe_1b_7b",
    OLMOE,
    dict(_MHA, num_hidden_layers=2, intermediate_size=16, num_experts=16, num_experts_per_tok=4),
    2,
  ),
  "qwen3_30b_a3b": (
    "qwen3_30b_a3b",
    QWEN3_30B_A3B,
    dict(
      _GQA,
      num_hidden_layers=2,
      head_dim=16,
      intermediate_size=48,
      moe_intermediate_size=16,
      num_experts=16,
      num_experts_per_tok=4,
    ),
    3,
  ),
  "qwen3_235b_a22b": (  # Released options as Qwen3-30B-A3B's; 16 query heads per key/value head, top-8.
    "qwen3_235b_a22b",
    QWEN3_30B_A3B,
    dict(
      vocab_size=128,
      hidden_size=32,
      num_attention_heads=8,
      num_key_value_heads=2,
      head_dim=8,
      num_hidden_layers=3,
      intermediate_size=48,
      moe_intermediate_size=16,
      num_experts=16,
      num_experts_per_tok=8,
    ),
    8,
  ),
  "qwen2_57b_a14b": (
    "qwen2_57b_a14b",
    QWEN2_MOE,
    dict(
      _GQA,
      num_hidden_layers=2,
      intermediate_size=48,
      moe_intermediate_size=16,
      shared_expert_intermediate_size=32,
      num_experts=16,
      num_experts_per_tok=4,
    ),
    4,
  ),
  "qwen1_5_moe_a2_7b": (
    "qwen1_5_moe_a2_7b",
    QWEN2_MOE,
    dict(
      _MHA,
      num_hidden_layers=2,
      intermediate_size=48,
      moe_intermediate_size=16,
      shared_expert_intermediate_size=64,
      num_experts=12,
      num_experts_per_tok=4,
    ),
    5,
  ),
  "deepseek_v2": (  # 24 experts in 8 groups of 3, the best 3 groups, top-4; 2 shared experts.
    "deepseek_v2",
    DEEPSEEK_V2,
    dict(_MLA, num_hidden_layers=3, q_lora_rank=24, n_routed_experts=24, num_experts_per_tok=4, n_shared_experts=2),
    9,
  ),
  "deepseek_v2_lite": (
    "deepseek_v2_lite",
    DEEPSEEK_V2_LITE,
    dict(_MLA, num_hidden_layers=3, q_lora_rank=None, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2),
    10,
  ),
  "deepseek_v3": (  # 32 experts in 8 groups of 4, the best 4 groups, top-4; 1 shared expert.
    "deepseek_v3",
    DEEPSEEK_V3,
    dict(_MLA, num_hidden_layers=5, q_lora_rank=24, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1),
    11,
  ),
  "dbrx": ("dbrx", DBRX, dict(vocab_size=128, d_model=32, n_heads=4, n_layers=2, ffn_config_size=16), 14),
  # A clip that cuts (the release's ±8 is far beyond these small weights' q, k, v).
  "dbrx_tight_clip": (
    None,
    {**DBRX, "attn_config": dict(clip_qkv=0.3, kv_n_heads=2, rope_theta=500000.0)},
    dict(vocab_size=128, d_model=32, n_heads=4, n_layers=2, ffn_config_size=16),
    15,
  ),
  "gpt_oss_20b": ("gpt_oss_20b", GPT_OSS, dict(_OSS, num_hidden_layers=4, num_local_experts=8), 12),
  "gpt_oss_120b": ("gpt_oss_120b", GPT_OSS, dict(_OSS, num_hidden_layers=2, num_local_experts=16), 13),
  # Options the releases leave at their defaults but transformers implements: dense blocks among
  # the MoE ones, MoE every 2nd block, tied embeddings, top-k renormalisation in Qwen2-MoE.
  "qwen3_moe_dense_layers": (
    None,
    {**QWEN3_30B_A3B, "mlp_only_layers": [0, 2]},
    dict(
      _GQA,
      num_hidden_layers=4,
      head_dim=16,
      intermediate_size=48,
      moe_intermediate_size=16,
      num_experts=8,
      num_experts_per_tok=2,
    ),
    6,
  ),
  "qwen2_moe_sparse_step_tied": (
    None,
    {**QWEN2_MOE, "decoder_sparse_step": 2, "tie_word_embeddings": True, "norm_topk_prob": True},
    dict(
      _GQA,
      num_hidden_layers=4,
      intermediate_size=48,
      moe_intermediate_size=16,
      shared_expert_intermediate_size=16,
      num_experts=8,
      num_experts_per_tok=2,
    ),
    7,
  ),
}

_CLASSES = {
  "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
  "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
  "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
  "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
  "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
  "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
  "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
  "dbrx": ("DbrxConfig", "DbrxForCausalLM"),
}


def build(case: str):
  """(transformers model in float32 eval mode, its config.json dict, tokens <int64>[B, L]) of a case."""
  import torch
  import transformers

  _, released, sizes, seed = CASES[case]
  options = dict(released)
  model_type = options.pop("model_type")
  config_cls, model_cls = (getattr(transformers, name) for name in _CLASSES[model_type])
  if "rope_parameters" not in options:
    options["rope_parameters"] = {"rope_type": "default", "rope_theta": options.pop("rope_theta")}
  sizes = dict(sizes)
  if "ffn_config_size" in sizes:  # DBRX nests the experts' size in ffn_config.
    options["ffn_config"] = {**options["ffn_config"], "ffn_hidden_size": sizes.pop("ffn_config_size")}
  config = config_cls(**options, **sizes)
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  # Weights of std 0.1 (logits of order 1, router logits well apart) and norm weights near 1 but
  # not 1, so that a norm weight left out of the conversion would show.
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith(".weight") and "norm" in name.split(".")[-2]:  # RMSNorm / LayerNorm scales
        param.copy_(1.0 + 0.1 * torch.randn_like(param))
      else:
        param.copy_(0.1 * torch.randn_like(param))
      if name.endswith("experts.gate_up_proj") and model_type == "gpt_oss":
        # Pre-activations of std ~8: many beyond gpt-oss's clamp at ±7, so that the clamp shows.
        param.copy_(1.5 * torch.randn_like(param))
      if name.endswith("experts.down_proj") and model_type == "gpt_oss":
        param.copy_(0.02 * torch.randn_like(param))
    for name, buffer in model.named_buffers():
      if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's balancing bias: non-zero, so that it shows.
        buffer.copy_(0.05 * torch.randn_like(buffer))
  generator = torch.Generator().manual_seed(seed)
  tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN), generator=generator)
  hf_config = {k: v for k, v in config.to_dict().items() if k not in ("transformers_version",)}
  return model, hf_config, tokens


def run(model, tokens, dtype: str):
  """(logits <float32>[B, L, V], [<int32>[B·L, K] chosen experts of each MoE layer, sorted], aux loss) in `dtype`.

  The aux loss is transformers' load_balancing_loss_func before router_aux_loss_coef.
  """
  import torch

  model = model.to(getattr(torch, dtype))
  if model.config.model_type.startswith("deepseek"):
    logits, experts, aux_loss = _run_deepseek(model, tokens)
  else:
    with torch.no_grad():
      out = model(tokens, output_router_logits=True)
    k = model.config.ffn_config.moe_top_k if model.config.model_type == "dbrx" else model.config.num_experts_per_tok
    experts = [
      np.sort(torch.topk(r.float(), k, dim=-1).indices.numpy(), axis=-1).astype(np.int32) for r in out.router_logits
    ]
    logits, aux_loss = out.logits.float().numpy(), float(out.aux_loss)
  model.to(torch.float32)
  return logits, experts, aux_loss


def _run_deepseek(model, tokens):
  """DeepSeek's run: the experts each router chose (group limits and bias included) and its balance loss.

  transformers computes no balance loss for DeepSeek; this is the one DeepSeek's own modeling code
  computes (MoEGate with seq_aux, before aux_loss_alpha), per MoE layer and summed: for each
  sequence of T tokens, Σ_i f_i·P_i with f_i = E/(K·T)·(tokens choosing i) and P_i the mean over
  the sequence of the affinities (V2: softmax; V3: sigmoid normalised to sum 1, the V3 paper's
  s'), then the mean over sequences.
  """
  import torch

  chosen, logits_of = [], []

  def record(module, inputs, out):  # The router's (logits, weights, chosen experts); returns None: output kept.
    logits_of.append(out[0])
    chosen.append(out[2])

  gates = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
  hooks = [g.register_forward_hook(record) for g in gates]
  try:
    with torch.no_grad():
      out = model(tokens)
  finally:
    for hook in hooks:
      hook.remove()
  b, t = tokens.shape
  num_experts, k = model.config.n_routed_experts, model.config.num_experts_per_tok
  experts, aux_loss = [], 0.0
  for router_logits, index in zip(logits_of, chosen):
    index = index.numpy().reshape(b, t, k)
    experts.append(np.sort(index.reshape(b * t, k), axis=-1).astype(np.int32))
    logits = router_logits.float().numpy().astype(np.float64).reshape(b, t, num_experts)
    if model.config.model_type == "deepseek_v3":
      scores = 1 / (1 + np.exp(-logits))
      scores = scores / scores.sum(-1, keepdims=True)
    else:
      scores = np.exp(logits - logits.max(-1, keepdims=True))
      scores = scores / scores.sum(-1, keepdims=True)
    counts = np.stack([np.bincount(index[s].reshape(-1), minlength=num_experts) for s in range(b)])  # [B, E]
    f = counts * num_experts / (k * t)
    aux_loss += float(np.mean(np.sum(f * scores.mean(axis=1), axis=-1)))
  return out.logits.float().numpy(), experts, aux_loss


def reference(case: str) -> dict:
  """Everything a fixture holds: config, weights, tokens, float32 and bfloat16 logits, experts."""
  import torch
  import transformers

  model, hf_config, tokens = build(case)
  weights = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  if hf_config.get("tie_word_embeddings"):
    weights.pop("lm_head.weight", None)  # The same tensor as the embedding (safetensors stores one).
  logits32, experts, aux_loss = run(model, tokens, "float32")
  logits16, experts16, _ = run(model, tokens, "bfloat16")
  return dict(
    config=hf_config,
    weights=weights,
    tokens=tokens.numpy().astype(np.int32),
    logits_float32=logits32,
    logits_bfloat16=logits16,
    experts=experts,
    experts_bfloat16=experts16,
    aux_loss=np.float32(aux_loss),
    versions={"transformers": transformers.__version__, "torch": torch.__version__},
  )


def load_fixture(case: str) -> tuple[dict, dict, dict]:
  """(the fixture's json: config, preset, versions; the transformers state dict; every array it holds)."""
  from safetensors.numpy import load_file

  with open(os.path.join(FIXTURES, f"{case}.json")) as f:
    meta = json.load(f)
  arrays = load_file(os.path.join(FIXTURES, f"{case}.safetensors"))
  weights = {k.removeprefix("weights/"): v for k, v in arrays.items() if k.startswith("weights/")}
  return meta, weights, arrays


def write(case: str, directory: str = FIXTURES) -> str:
  """Writes <case>.safetensors (arrays) and <case>.json (config, versions); returns the .json path."""
  from safetensors.numpy import save_file

  ref = reference(case)
  arrays = {f"weights/{k}": np.ascontiguousarray(v) for k, v in ref["weights"].items()}
  arrays["tokens"] = ref["tokens"]
  arrays["logits_float32"], arrays["logits_bfloat16"] = ref["logits_float32"], ref["logits_bfloat16"]
  arrays["aux_loss"] = np.asarray(ref["aux_loss"], np.float32)
  for i, (e32, e16) in enumerate(zip(ref["experts"], ref["experts_bfloat16"])):
    arrays[f"experts/{i}"], arrays[f"experts_bfloat16/{i}"] = e32, e16
  os.makedirs(directory, exist_ok=True)
  save_file(arrays, os.path.join(directory, f"{case}.safetensors"))
  preset = CASES[case][0]
  meta = {"case": case, "preset": preset, "config": ref["config"], "versions": ref["versions"]}
  path = os.path.join(directory, f"{case}.json")
  with open(path, "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True, default=str)
    f.write("\n")
  return path


# Greedy generation by transformers' generate, from the committed fixtures' weights (tests/test_generate.py).
GENERATION_CASES = ("mixtral_8x7b", "qwen3_30b_a3b", "deepseek_v3", "gpt_oss_20b", "dbrx")
# The prompts: (row, first, end) slices of the fixture's tokens, of lengths 5, 3 and 7; tokens drawn.
GENERATION_SLICES, NEW_TOKENS = ((0, 0, 5), (1, 0, 3), (1, 3, 10)), 10


def generation_prompts(arrays: dict) -> list[list[int]]:
  """Prompts of different lengths cut from the fixture's tokens (GENERATION_SLICES)."""
  return [np.asarray(arrays["tokens"])[row, a:b].tolist() for row, a, b in GENERATION_SLICES]


def generated_by_transformers(case: str, hf_dir: str) -> dict[str, list[list[int]]]:
  """Greedy tokens of the model saved in hf_dir for each prompt alone (no padding), two ways:
  'generated' by transformers' generate (its KV cache), 'forward' by the argmax of a full forward
  pass over the sequence so far at each step (the model's function, no cache)."""
  import torch
  import transformers

  _, _, arrays = load_fixture(case)
  model = transformers.AutoModelForCausalLM.from_pretrained(
    hf_dir, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  out = {"generated": [], "forward": []}
  with torch.no_grad():
    for prompt in generation_prompts(arrays):
      ids = model.generate(
        torch.as_tensor([prompt]),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
      )
      out["generated"].append(ids[0, len(prompt) :].tolist())
      sequence = list(prompt)
      for _ in range(NEW_TOKENS):
        sequence.append(int(model(torch.as_tensor([sequence])).logits[0, -1].argmax()))
      out["forward"].append(sequence[len(prompt) :])
  return out


def write_hf_dir(path: str, config: dict, state: dict) -> None:
  """A Hugging Face model directory: config.json and model.safetensors."""
  from safetensors.numpy import save_file

  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, os.path.join(path, "model.safetensors"))


def write_generation(directory: str = FIXTURES) -> str:
  """Writes generation.json: for each GENERATION_CASES case, its prompts and transformers' greedy tokens (both ways)."""
  import tempfile

  import torch
  import transformers

  result = {"versions": {"transformers": transformers.__version__, "torch": torch.__version__}, "cases": {}}
  for case in GENERATION_CASES:
    meta, state, arrays = load_fixture(case)
    with tempfile.TemporaryDirectory() as tmp:
      write_hf_dir(tmp, meta["config"], state)
      result["cases"][case] = {"prompts": generation_prompts(arrays), **generated_by_transformers(case, tmp)}
  path = os.path.join(directory, "generation.json")
  with open(path, "w") as f:  # A case a line.
    cases = ",\n".join(f"  {json.dumps(c)}: {json.dumps(v, sort_keys=True)}" for c, v in result["cases"].items())
    f.write(f'{{"versions": {json.dumps(result["versions"])},\n "cases": {{\n{cases}\n }}\n}}\n')
  return path


if __name__ == "__main__":
  if sys.argv[1:] == ["--generation"]:
    print(write_generation())
    sys.exit()
  for name in sys.argv[1:] or CASES:
    print(write(name))
