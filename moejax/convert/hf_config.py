"""A transformers config.json written from a moejax config alone: `moejax.convert.hf.config_overrides` inverted.

`config_json(cfg)` tries each architecture moejax converts, in `ORDER`: its writer below turns
the moejax config into that model_type's config.json keys, and the candidate counts only if it
converts back (`config_overrides`) to exactly the model cfg describes, every field that decides
the function compared (`differences`). The first that does is returned; if none does, ConfigError
names, for the architecture that came closest, the first field that differs. So nothing is
written that transformers would compute differently: a model with capacity dropping, learned
positions, a GELU FFN, ... has no transformers architecture here and is refused by name.

Fields that do not decide the function (`NOT_THE_FUNCTION`: the activations' dtype, init scale,
kernels and exchanges; training losses, `hf.TRAINING_FIELDS`) are not compared. Keys moejax has no counterpart for get transformers' neutral values: max_position_embeddings is
the run's sequence length (YaRN's original length × factor with YaRN); no dropout; no token ids.
"""

from __future__ import annotations

from moejax.convert import hf
from moejax.errors import ConfigError

# The order architectures are tried in: the most specific first (each writer writes what cfg has;
# the round trip decides).
ORDER = ("deepseek_v3", "deepseek_v2", "gpt_oss", "dbrx", "mixtral", "olmoe", "qwen3_moe", "qwen2_moe")


def _rope(m, max_len: int) -> dict:
  params = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
  if m.rope_scaling == "yarn":
    params = {
      "rope_type": "yarn",
      "rope_theta": float(m.rope_theta),
      "factor": float(m.yarn_factor),
      "original_max_position_embeddings": int(m.yarn_original_max_len),
      "beta_fast": float(m.yarn_beta_fast),
      "beta_slow": float(m.yarn_beta_slow),
    }
    for key, field in (("mscale", "yarn_mscale"), ("mscale_all_dim", "yarn_mscale_all_dim")):
      if m[field]:
        params[key] = float(m[field])
    if m.yarn_attention_factor:
      params["attention_factor"] = float(m.yarn_attention_factor)
    if not m.yarn_truncate:
      params["truncate"] = False
    max_len = int(m.yarn_original_max_len * m.yarn_factor)
  return {"rope_parameters": params, "max_position_embeddings": max_len}


def _common(cfg) -> dict:
  m, e = cfg.model, cfg.moe
  return {
    "vocab_size": m.vocab_size,
    "num_hidden_layers": m.num_layers,
    "hidden_size": m.d_model,
    "num_attention_heads": m.num_heads,
    "num_key_value_heads": m.num_kv_heads or m.num_heads,
    "head_dim": m.head_dim or m.d_model // m.num_heads,
    **_rope(m, cfg.train.seq_len),
    "rms_norm_eps": float(m.norm_eps),
    "tie_word_embeddings": bool(m.tie_embeddings),
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "num_experts_per_tok": e.top_k,
    "router_aux_loss_coef": float(e.load_balance_loss_weight),
  }


def _mixtral(cfg) -> dict:
  out = {**_common(cfg), "num_local_experts": cfg.moe.num_experts, "intermediate_size": cfg.model.d_ff}
  out["sliding_window"] = None
  if cfg.moe.router_noise == "jitter":
    out["router_jitter_noise"] = float(cfg.moe.jitter_eps)
  return out


def _bias(m) -> bool:
  return m.attention_bias == "qkvo"


def _olmoe(cfg) -> dict:
  out = {**_common(cfg), "num_experts": cfg.moe.num_experts, "intermediate_size": cfg.model.d_ff}
  out.update({"attention_bias": _bias(cfg.model), "norm_topk_prob": cfg.moe.combine_weights == "renormalized"})
  return out


def _qwen_layers(cfg) -> dict:
  m, e = cfg.model, cfg.moe
  return {
    "num_experts": e.num_experts,
    "intermediate_size": m.d_ff,
    "moe_intermediate_size": e.d_expert or m.d_ff,
    "decoder_sparse_step": m.moe_every,
    "mlp_only_layers": list(m.dense_layers),
    "norm_topk_prob": e.combine_weights == "renormalized",
    "use_sliding_window": False,
  }


def _qwen3_moe(cfg) -> dict:
  return {**_common(cfg), **_qwen_layers(cfg), "attention_bias": _bias(cfg.model)}


def _qwen2_moe(cfg) -> dict:
  out = {**_common(cfg), **_qwen_layers(cfg), "qkv_bias": cfg.model.attention_bias == "qkv"}
  out["shared_expert_intermediate_size"] = cfg.moe.num_shared_experts * out["moe_intermediate_size"]
  return out


def _gpt_oss(cfg) -> dict:
  m = cfg.model
  out = {**_common(cfg), "num_local_experts": cfg.moe.num_experts, "intermediate_size": m.d_ff}
  out.update({"attention_bias": _bias(m), "swiglu_alpha": 1.702, "swiglu_limit": 7.0})
  if m.sliding_window:
    every = m.full_attention_every
    out["sliding_window"] = m.sliding_window
    full = lambda i: bool(every) and i % every == every - 1
    out["layer_types"] = ["full_attention" if full(i) else "sliding_attention" for i in range(m.num_layers)]
  return out


def _dbrx(cfg) -> dict:
  m, e = cfg.model, cfg.moe
  ffn = {
    "ffn_act_fn": {"name": "silu"},
    "ffn_hidden_size": m.d_ff,
    "hidden_size": m.d_model,
    "moe_num_experts": e.num_experts,
    "moe_top_k": e.top_k,
    "moe_loss_weight": float(e.load_balance_loss_weight),
    "moe_normalize_expert_weights": 1.0,
  }
  if e.router_noise == "jitter":
    ffn["moe_jitter_eps"] = float(e.jitter_eps)
  return {
    "vocab_size": m.vocab_size,
    "n_layers": m.num_layers,
    "d_model": m.d_model,
    "n_heads": m.num_heads,
    "max_seq_len": cfg.train.seq_len,
    "attn_config": {
      "kv_n_heads": m.num_kv_heads or m.num_heads,
      "clip_qkv": m.clip_qkv or None,
      "attn_pdrop": 0.0,
      "rope_theta": float(m.rope_theta),  # transformers' DBRX attention reads it here.
    },
    "ffn_config": ffn,
    "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rope_theta)},
    "tie_word_embeddings": bool(m.tie_embeddings),
    "resid_pdrop": 0.0,
    "emb_pdrop": 0.0,
  }


def _deepseek(cfg, version: int) -> dict:
  m, e = cfg.model, cfg.moe
  first_dense = len(m.dense_layers)
  out = {
    "vocab_size": m.vocab_size,
    "num_hidden_layers": m.num_layers,
    "hidden_size": m.d_model,
    "num_attention_heads": m.num_heads,
    "num_key_value_heads": m.num_heads,
    "q_lora_rank": m.q_lora_rank or None,
    "kv_lora_rank": m.kv_lora_rank,
    "qk_nope_head_dim": m.qk_nope_head_dim,
    "qk_rope_head_dim": m.qk_rope_head_dim,
    "v_head_dim": m.v_head_dim,
    **_rope(m, cfg.train.seq_len),
    "rms_norm_eps": float(m.norm_eps),
    "tie_word_embeddings": bool(m.tie_embeddings),
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "attention_bias": False,
    "intermediate_size": m.d_ff,
    "first_k_dense_replace": first_dense,
    "moe_layer_freq": 1,
    "n_routed_experts": e.num_experts,
    "num_experts_per_tok": e.top_k,
    "moe_intermediate_size": e.d_expert or m.d_ff,
    "n_shared_experts": e.num_shared_experts or None,
    "routed_scaling_factor": float(e.routed_scaling_factor),
    "scoring_func": e.score_function,
    "aux_loss_alpha": float(e.load_balance_loss_weight),
    "seq_aux": e.load_balance_scope == "group",
    "n_group": e.num_expert_groups,
    "topk_group": e.top_expert_groups if e.num_expert_groups > 1 else None,
  }
  if version == 2:
    out["topk_method"] = "group_limited_greedy" if e.num_expert_groups > 1 else "greedy"
  else:
    out.update(
      {
        "topk_method": "noaux_tc",
        "norm_topk_prob": e.combine_weights == "renormalized",
        "rope_interleave": True,
        "num_nextn_predict_layers": m.mtp_depth,
      }
    )
  if out["topk_group"] is None:
    del out["topk_group"]
  return out


# The class transformers' AutoModelForCausalLM builds for each model_type (config.json's "architectures").
CAUSAL_LM = {
  "mixtral": "MixtralForCausalLM",
  "olmoe": "OlmoeForCausalLM",
  "qwen2_moe": "Qwen2MoeForCausalLM",
  "qwen3_moe": "Qwen3MoeForCausalLM",
  "deepseek_v2": "DeepseekV2ForCausalLM",
  "deepseek_v3": "DeepseekV3ForCausalLM",
  "gpt_oss": "GptOssForCausalLM",
  "dbrx": "DbrxForCausalLM",
}

WRITERS = {
  "mixtral": _mixtral,
  "olmoe": _olmoe,
  "qwen2_moe": _qwen2_moe,
  "qwen3_moe": _qwen3_moe,
  "deepseek_v2": lambda cfg: _deepseek(cfg, 2),
  "deepseek_v3": lambda cfg: _deepseek(cfg, 3),
  "gpt_oss": _gpt_oss,
  "dbrx": _dbrx,
}


def differences(hf_config: dict, cfg) -> list[str]:
  """['field: ours vs the config.json's', ...] over every field that decides cfg's function.

  The config.json's model is base_config('lm') with its `config_overrides`; fields either config
  does not read (`inactive_fields`) and training-only fields are not compared.
  """
  from moejax.config import base_config, override, schema

  try:
    theirs = override(base_config("lm"), hf.config_overrides(hf_config))
  except (ConfigError, KeyError, TypeError, ValueError) as e:
    return [f"it does not convert back ({e})"]
  mine, other = _resolved(schema.flatten(cfg)), _resolved(schema.flatten(theirs))
  skip = set(schema.inactive_fields(cfg)) | set(schema.inactive_fields(theirs)) | set(NOT_THE_FUNCTION)
  out = []
  for field, value in mine.items():
    if not field.startswith(("model.", "moe.")) or field.startswith(hf.TRAINING_FIELDS) or field in skip:
      continue
    same = tuple(value) == tuple(other[field]) if isinstance(value, (list, tuple)) else value == other[field]
    if not same:
      out.append(f"{field} is {value!r} here, {other[field]!r} in the nearest transformers model")
  return out


# Fields that change how a model trains or runs, not what it computes.
NOT_THE_FUNCTION = (
  "model.dtype",  # The activations' precision (the weights' dtype is the checkpoint's or --dtype's).
  "model.init_scale",
  "model.remat",  # What the backward pass keeps.
  "model.scan_layers",  # Whether the blocks are compiled as a loop.
  "moe.dead_expert_steps",
  "moe.dropless_block_size",
  "moe.dropless_impl",
  "moe.expert_exchange",
  "moe.permute_backend",
  "moe.allow_noncausal",
)


def _resolved(flat: dict) -> dict:
  """The fields whose 0 means "derived" (head_dim, num_kv_heads, d_expert) as what they derive to; of
  DeepSeek's balancing-bias rate only whether the bias moves (exists): its value is a training choice."""
  out = dict(flat)
  out["moe.bias_update_rate"] = flat["moe.bias_update_rate"] > 0
  out["model.head_dim"] = flat["model.head_dim"] or flat["model.d_model"] // flat["model.num_heads"]
  out["model.num_kv_heads"] = flat["model.num_kv_heads"] or flat["model.num_heads"]
  out["moe.d_expert"] = flat["moe.d_expert"] or flat["model.d_ff"]
  return out


def config_json(cfg) -> dict:
  """The transformers config.json of the decoder cfg describes; ConfigError if no architecture here is that model."""
  if cfg.task != "lm":
    raise ConfigError("task", f"{cfg.task!r}: only decoder LMs have a transformers architecture here")
  if not cfg.model.vocab_size:
    raise ConfigError("model.vocab_size", "is 0 (the dataset's): a saved run's config.json gives the resolved size")
  best = None
  for model_type in ORDER:
    candidate = {"model_type": model_type, **WRITERS[model_type](cfg)}
    differ = differences(candidate, cfg)
    if not differ:
      return {**candidate, "architectures": [CAUSAL_LM[model_type]]}
    converts = not differ[0].startswith("it does not convert back")
    if converts and (best is None or len(differ) < len(best[1])):
      best = (model_type, differ)
  if best is None:
    raise ConfigError(
      "--hf_config", "no transformers architecture moejax converts computes this model; give --hf_config"
    )
  model_type, differ = best
  raise ConfigError(
    "--hf_config",
    f"no transformers architecture moejax converts computes this model (nearest, {model_type}: {differ[0]}"
    f"{f'; and {len(differ) - 1} more' if len(differ) > 1 else ''}); give --hf_config",
  )
