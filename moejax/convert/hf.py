"""Hugging Face transformers <-> moejax: each architecture's config fields and parameter names.

Legend: V vocabulary, d model dim, N heads, N_kv key/value heads, H head dim, E experts,
f expert hidden dim, F dense hidden dim.

One table per transformers `model_type` (`ARCHITECTURES`): which config.json keys it reads and
what moejax fields they become (`config_overrides`), and where each tensor of a transformers
state dict goes in a moejax `DecoderLM` (`load_hf_weights`) and back (`export_hf_weights`). The
parity tests (tests/test_hf_parity.py) and checkpoint loading use these and nothing else.

Weights of a transformers state dict are `torch.nn.Linear` weights, [out, in]; moejax multiplies
x·W, so every projection is transposed. Experts come in two layouts, both read:
  fused (transformers >= 5, what `model.state_dict()` holds): `mlp.experts.gate_up_proj`
    [E, 2f, d] (the gate half first) and `mlp.experts.down_proj` [E, d, f];
  per expert (the released safetensors files, transformers 4): `mlp.experts.{j}.gate_proj.weight`
    [f, d], `up_proj` [f, d], `down_proj` [d, f]; Mixtral names them `block_sparse_moe.experts.{j}.w1`
    (gate), `w3` (up), `w2` (down), its router `block_sparse_moe.gate`.
moejax's SwiGLU is silu(x·wi) ⊙ (x·wg) · wo: wi is transformers' gate, wg its up projection.
DeepSeek-V2/V3 (`deepseek_v2`, `deepseek_v3`): multi-head latent attention (q_a_proj,
q_a_layernorm, q_b_proj or q_proj; kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj; o_proj ->
moejax.layers.mla), `mlp.shared_experts`, V3's `mlp.gate.e_score_correction_bias` (the router's
balancing bias, state) and its multi-token-prediction module `model.layers.{L}` (enorm, hnorm,
eh_proj, shared_head.norm, and a decoder layer; the copies of the shared embedding and head it
may hold must equal them, and export writes them).

A config.json key that moejax does not model is refused with the key's name (`ConfigError`),
never dropped: a converted model computes the released function or does not convert.

Why one module of ~1,100 lines: it is the one place that knows each architecture's names, config
keys and layouts (as MaxText keeps each family's parameter names in one place), read by the parity
tests, the converter (`moejax.convert.checkpoints`) and the loaders alike; split per architecture,
the shared attention/expert/MTP rules would be repeated or scattered.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import numpy as np

from moejax.errors import ConfigError

# PretrainedConfig bookkeeping: none of these changes the function a model computes.
GENERIC_KEYS = frozenset(
  {
    "_name_or_path",
    "architectures",
    "bos_token_id",
    "chunk_size_feed_forward",
    "dtype",
    "eos_token_id",
    "id2label",
    "initializer_range",
    "is_encoder_decoder",
    "label2id",
    "max_position_embeddings",  # The context the model was trained for; RoPE itself has no limit.
    "model_type",
    "output_attentions",
    "output_hidden_states",
    "output_router_logits",
    "pad_token_id",
    "problem_type",
    "return_dict",
    "tokenizer_class",
    "torch_dtype",
    "transformers_version",
    "use_bfloat16",
    "use_cache",
  }
)


# Fields a config.json sets that shape training, not the function (compared nowhere).
TRAINING_FIELDS = (
  "moe.load_balance",
  "moe.device_balance",
  "moe.comm_balance",
  "moe.z_loss_weight",
  "moe.router_noise",
  "moe.jitter",
  "moe.importance_loss",
  "moe.load_loss",
  "model.mtp_loss",
)


class _Reader:
  """A config.json dict read key by key; `unread()` names what no rule looked at."""

  def __init__(self, hf: Mapping, model_type: str):
    self.hf, self.model_type, self.read = dict(hf), model_type, set(GENERIC_KEYS)

  def get(self, key: str, default=None):
    self.read.add(key)
    return self.hf.get(key, default)

  def require(self, key: str):
    if key not in self.hf:
      raise ConfigError(self.field(key), "is missing from the config")
    return self.get(key)

  def expect(self, key: str, allowed, why: str):
    """The key's value, which must be one of `allowed` (missing counts as allowed[0])."""
    value = self.get(key, allowed[0])
    if value not in allowed:
      raise ConfigError(self.field(key), f"{value!r} is not supported ({why}); moejax converts {allowed[0]!r}")
    return value

  def field(self, key: str) -> str:
    return f"{self.model_type} config.{key}"

  def unread(self) -> list[str]:
    return sorted(set(self.hf) - self.read)


# transformers' YaRN parameters -> moejax's model.yarn_* fields (moejax/layers/rope.py).
_YARN_KEYS = {
  "factor": "yarn_factor",
  "original_max_position_embeddings": "yarn_original_max_len",
  "beta_fast": "yarn_beta_fast",
  "beta_slow": "yarn_beta_slow",
  "truncate": "yarn_truncate",
  "mscale": "yarn_mscale",
  "mscale_all_dim": "yarn_mscale_all_dim",
  "attention_factor": "yarn_attention_factor",
}


def _rope(r: _Reader) -> dict:
  """RoPE fields from transformers 5's rope_parameters or transformers 4's rope_theta / rope_scaling.

  'default' and 'yarn' RoPE convert; any other rope_type, or a parameter moejax does not model,
  is refused by name.
  """
  params = {**(r.get("rope_scaling") or {}), **(r.get("rope_parameters") or {})}
  kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
  params.pop("type", None)
  theta = params.pop("rope_theta", r.get("rope_theta"))
  if theta is None:
    raise ConfigError(r.field("rope_theta"), "is missing from the config (and from rope_parameters)")
  out = {"model.positions": "rope", "model.rope_theta": float(theta)}
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise ConfigError(r.field("rope_parameters.partial_rotary_factor"), "moejax rotates every dim of the RoPE part")
  params.pop("partial_rotary_factor", None)
  if kind == "yarn":
    out["model.rope_scaling"] = "yarn"
    if params.get("factor") is None:  # transformers: the context ratio (DeepSeek-V3's convention).
      original = params.get("original_max_position_embeddings") or r.get("max_position_embeddings")
      params["factor"] = r.get("max_position_embeddings") / original
    for key, field in _YARN_KEYS.items():
      value = params.pop(key, None)
      if value is not None:
        out[f"model.{field}"] = (
          bool(value) if key == "truncate" else (int(value) if field.endswith("len") else float(value))
        )
    if "model.yarn_original_max_len" not in out:  # transformers: the model's max_position_embeddings.
      out["model.yarn_original_max_len"] = int(r.get("max_position_embeddings"))
  elif kind != "default":
    raise ConfigError(
      r.field("rope_parameters.rope_type"), f"{kind!r} is not supported; moejax implements 'default' and 'yarn' RoPE"
    )
  if params:
    raise ConfigError(r.field(f"rope_parameters.{min(params)}"), f"is not a {kind!r} RoPE parameter moejax models")
  return out


def _attention_and_sizes(r: _Reader) -> dict:
  """The fields every architecture here shares: sizes, attention, norms, embeddings."""
  d, heads = r.require("hidden_size"), r.require("num_attention_heads")
  head_dim = r.get("head_dim") or d // heads
  r.expect("hidden_act", ("silu",), "the experts are SwiGLU")
  r.expect("attention_dropout", (0.0, 0), "moejax's attention has no dropout")
  return {
    "model.vocab_size": r.require("vocab_size"),
    "model.num_layers": r.require("num_hidden_layers"),
    "model.d_model": d,
    "model.num_heads": heads,
    "model.num_kv_heads": r.get("num_key_value_heads") or heads,
    "model.head_dim": head_dim,
    **_rope(r),
    "model.norm_eps": float(r.require("rms_norm_eps")),
    "model.tie_embeddings": bool(r.get("tie_word_embeddings", False)),
    "model.activation": "swiglu",
    "moe.router": "top_k",
    "moe.num_experts": r.get("num_local_experts") or r.require("num_experts"),
    "moe.top_k": r.require("num_experts_per_tok"),
    # transformers never drops a token; its aux loss is one E·Σ f·P over all layers' router
    # logits with any-of-top-K density (shares sum to K), and it has no z-loss.
    "moe.dispatcher": "dropless",
    "moe.load_balance_loss_weight": float(r.get("router_aux_loss_coef", 0.0)),
    "moe.load_balance_density": "topk_sum",
    "moe.load_balance_pooling": "all_layers",
    "moe.load_balance_scope": "global_batch",
    "moe.z_loss_weight": 0.0,
  }


def _mixtral(r: _Reader) -> dict:
  out = _attention_and_sizes(r)
  r.expect("sliding_window", (None,), "moejax's attention is full causal")
  jitter = float(r.get("router_jitter_noise", 0.0))
  out.update(
    {
      "model.d_ff": r.require("intermediate_size"),
      "model.moe_every": 1,
      "moe.combine_weights": "renormalized",  # Softmax over all E, top-2, renormalised.
    }
  )
  if jitter:  # Training only: the hidden states fed to the router and the experts, × U(1 − ε, 1 + ε).
    out.update({"moe.router_noise": "jitter", "moe.jitter_eps": jitter, "moe.jitter_scope": "router_and_experts"})
  return out


def _olmoe(r: _Reader) -> dict:
  out = _attention_and_sizes(r)
  r.expect("clip_qkv", (None,), "moejax does not clip the q, k, v projections")
  out.update(
    {
      "model.d_ff": r.require("intermediate_size"),
      "model.moe_every": 1,
      "model.qk_norm": True,
      "model.qk_norm_scope": "projection",  # One RMSNorm over all heads of q (and of k).
      "model.attention_bias": "qkvo" if r.get("attention_bias", False) else "none",
      "moe.combine_weights": "renormalized" if r.get("norm_topk_prob", False) else "raw",
    }
  )
  return out


def _qwen_moe_layers(r: _Reader) -> dict:
  """Qwen2/3-MoE: dense FFNs of intermediate_size, experts of moe_intermediate_size, which blocks are MoE."""
  r.expect("use_sliding_window", (False,), "moejax's attention is full causal")
  r.get("sliding_window")  # Read only with use_sliding_window (refused above).
  r.get("max_window_layers")  # Likewise.
  layer_types = r.get("layer_types") or []  # Every layer 'full_attention' without sliding windows.
  if any(t != "full_attention" for t in layer_types):
    raise ConfigError(r.field("layer_types"), f"{layer_types!r}: moejax converts 'full_attention' layers only")
  step = r.get("decoder_sparse_step", 1)
  return {
    "model.d_ff": r.require("intermediate_size"),
    "model.moe_every": step,
    "model.dense_layers": tuple(sorted(r.get("mlp_only_layers") or ())),
    "moe.d_expert": r.require("moe_intermediate_size"),
    "moe.combine_weights": "renormalized" if r.get("norm_topk_prob", False) else "raw",
  }


def _qwen3_moe(r: _Reader) -> dict:
  out = _attention_and_sizes(r)
  out.update(_qwen_moe_layers(r))
  out.update(
    {
      "model.qk_norm": True,
      "model.qk_norm_scope": "per_head",
      "model.attention_bias": "qkvo" if r.get("attention_bias", False) else "none",
    }
  )
  return out


def _qwen2_moe(r: _Reader) -> dict:
  out = _attention_and_sizes(r)
  out.update(_qwen_moe_layers(r))
  shared, expert = r.require("shared_expert_intermediate_size"), out["moe.d_expert"]
  if shared % expert:
    raise ConfigError(
      r.field("shared_expert_intermediate_size"),
      f"{shared} must be a multiple of moe_intermediate_size ({expert}): moejax's shared experts have the experts' size",
    )
  out.update(
    {
      "model.attention_bias": "qkv" if r.get("qkv_bias", True) else "none",  # transformers 4: always.
      "moe.num_shared_experts": shared // expert,
      "moe.shared_expert_gate": "sigmoid",
    }
  )
  return out


def _sliding_windows(r: _Reader) -> dict:
  """model.sliding_window and full_attention_every from layer_types, which must be a pattern moejax has."""
  types = r.get("layer_types") or []
  window = r.get("sliding_window")
  unknown = sorted({t for t in types} - {"sliding_attention", "full_attention"})
  if unknown:
    raise ConfigError(
      r.field("layer_types"), f"holds {unknown[0]!r}; moejax has 'sliding_attention' and 'full_attention'"
    )
  full = [i for i, t in enumerate(types) if t == "full_attention"]
  if len(full) == len(types):
    return {}
  every = full[0] + 1 if full else 0
  if full != [i for i in range(len(types)) if every and i % every == every - 1]:
    raise ConfigError(
      r.field("layer_types"), f"full attention in blocks {full}: moejax places it in every P-th block (P-1, 2P-1, ...)"
    )
  if not window:
    raise ConfigError(r.field("sliding_window"), f"is {window!r}, but layer_types has sliding_attention blocks")
  return {"model.sliding_window": int(window), "model.full_attention_every": every}


def _gpt_oss(r: _Reader) -> dict:
  """gpt-oss: sinks, alternating sliding windows, q/k/v/o biases, router bias, clamped SwiGLU experts with biases."""
  out = _attention_and_sizes(r)
  r.expect("swiglu_alpha", (1.702,), "moejax's 'clamped_swiglu' is gpt-oss's, α = 1.702")
  r.expect("swiglu_limit", (7.0,), "moejax's 'clamped_swiglu' clamps at 7")
  out.update(_sliding_windows(r))
  out.update(
    {
      "model.d_ff": r.require("intermediate_size"),  # The experts' hidden size (no block is dense).
      "model.moe_every": 1,
      "model.activation": "clamped_swiglu",
      "model.attention_bias": "qkvo" if r.get("attention_bias", True) else "none",
      "model.attention_sinks": True,
      "moe.router_bias": True,
      "moe.expert_bias": True,
      "moe.combine_weights": "renormalized",  # Softmax over the top-k logits = all E, renormalised.
    }
  )
  return out


def _dbrx(r: _Reader) -> dict:
  """DBRX: LayerNorm without bias, fused Wqkv clipped to ±clip_qkv, 16 fine-grained experts top-4.

  Its config nests attn_config and ffn_config; each is read key by key as the top level is.
  """
  attn = _Reader(r.require("attn_config"), "dbrx attn_config")
  ffn = _Reader(r.require("ffn_config"), "dbrx ffn_config")
  for sub in (attn, ffn):
    sub.read.update({"model_type", "transformers_version", "dtype", "_name_or_path"})
  attn.expect("attn_pdrop", (0.0, 0), "moejax's attention has no dropout")
  for key in ("resid_pdrop", "emb_pdrop"):
    r.expect(key, (0.0, 0), "moejax has no dropout")
  act = ffn.get("ffn_act_fn") or {"name": "silu"}
  if act != {"name": "silu"}:
    raise ConfigError(ffn.field("ffn_act_fn"), f"{act!r} is not supported; the experts are SwiGLU ({{'name': 'silu'}})")
  p = ffn.get("moe_normalize_expert_weights", 1.0)
  if p not in (1, 1.0):
    raise ConfigError(
      ffn.field("moe_normalize_expert_weights"), f"{p!r}: moejax renormalises the top-k weights to sum 1 (p = 1)"
    )
  d, heads = r.require("d_model"), r.require("n_heads")
  if ffn.get("hidden_size", d) != d:
    raise ConfigError(ffn.field("hidden_size"), "differs from d_model")
  r.get("num_key_value_heads")  # transformers copies attn_config.kv_n_heads here.
  r.get("max_seq_len")  # DBRX's max_position_embeddings: the context it was trained for.
  params = r.get("rope_parameters") or {}
  theta = params.get("rope_theta", attn.get("rope_theta"))
  attn.get("rope_theta")
  rope = _rope(_Reader({"rope_parameters": {**params, "rope_theta": theta}}, "dbrx"))
  clip = attn.get("clip_qkv")
  out = {
    "model.vocab_size": r.require("vocab_size"),
    "model.num_layers": r.require("n_layers"),
    "model.d_model": d,
    "model.num_heads": heads,
    "model.num_kv_heads": attn.require("kv_n_heads"),
    "model.head_dim": d // heads,
    **rope,
    "model.norm": "layer",
    "model.norm_eps": 1e-5,  # nn.LayerNorm's default; DBRX's config has no epsilon.
    "model.clip_qkv": float(clip or 0.0),
    "model.tie_embeddings": bool(r.get("tie_word_embeddings", False)),
    "model.activation": "swiglu",
    "model.d_ff": ffn.require("ffn_hidden_size"),
    "model.moe_every": 1,
    "moe.router": "top_k",
    "moe.num_experts": ffn.require("moe_num_experts"),
    "moe.top_k": ffn.require("moe_top_k"),
    "moe.combine_weights": "renormalized",  # Softmax over all, top-k, divided by their 1-norm.
    "moe.dispatcher": "dropless",
    # transformers' load_balancing_loss_func × moe_loss_weight.
    "moe.load_balance_loss_weight": float(ffn.get("moe_loss_weight", 0.0)),
    "moe.load_balance_density": "topk_sum",
    "moe.load_balance_pooling": "all_layers",
    "moe.load_balance_scope": "global_batch",
    "moe.z_loss_weight": 0.0,
  }
  jitter = ffn.get("moe_jitter_eps")
  if jitter:  # Training only: the router multiplies its input in place, so the experts see it too.
    out.update(
      {"moe.router_noise": "jitter", "moe.jitter_eps": float(jitter), "moe.jitter_scope": "router_and_experts"}
    )
  for sub in (attn, ffn):
    if sub.unread():
      raise ConfigError(sub.field(sub.unread()[0]), "is not a key moejax knows how to convert")
  return out


def _dbrx_to_canonical(weights: Mapping, cfg) -> tuple[dict, dict]:
  """DBRX's tensors under the Llama-style names the rest of this module reads: (weights, {name: DBRX name}).

  Wqkv [(N + 2·N_kv)·H, d] splits into q, k, v; the experts' w1, v1 (gate, up) and w2 [E·f, d]
  become gate_up_proj [E, 2f, d] and down_proj [E, d, f]. Tensors it does not know keep their names.
  """
  out, origin = {}, {}
  head_dim = cfg.d_model // cfg.num_heads
  q_size, kv_size = cfg.num_heads * head_dim, cfg.num_kv_heads * head_dim
  e, f = cfg.moe.num_experts, cfg.d_ff

  def put(name, value, source):
    out[name], origin[name] = value, source

  for name, value in weights.items():
    parts = name.split(".")
    if name == "transformer.wte.weight":
      put("model.embed_tokens.weight", value, name)
    elif name == "transformer.norm_f.weight":
      put("model.norm.weight", value, name)
    elif parts[:2] == ["transformer", "blocks"] and len(parts) > 3:
      layer, rest = f"model.layers.{parts[2]}", ".".join(parts[3:])
      value = np.asarray(value)
      if rest == "norm_attn_norm.norm_1.weight":
        put(f"{layer}.input_layernorm.weight", value, name)
      elif rest == "norm_attn_norm.norm_2.weight":
        put(f"{layer}.post_attention_layernorm.weight", value, name)
      elif rest == "norm_attn_norm.attn.out_proj.weight":
        put(f"{layer}.self_attn.o_proj.weight", value, name)
      elif rest == "norm_attn_norm.attn.Wqkv.weight":
        if value.shape[0] != q_size + 2 * kv_size:
          raise ConfigError(f"tensor {name}", f"has {value.shape[0]} rows; the config gives {q_size + 2 * kv_size}")
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, [q_size, q_size + kv_size])):
          put(f"{layer}.self_attn.{proj}.weight", part, name)
      elif rest == "ffn.router.layer.weight":
        put(f"{layer}.mlp.gate.weight", value, name)
      elif rest in ("ffn.experts.mlp.w1", "ffn.experts.mlp.v1", "ffn.experts.mlp.w2"):
        if value.shape != (e * f, cfg.d_model):
          raise ConfigError(f"tensor {name}", f"has shape {value.shape}; the config gives {(e * f, cfg.d_model)}")
        out[rest] = out.get(rest, {})
        out[rest][layer] = value.reshape(e, f, cfg.d_model)
        origin[f"{layer}.{rest}"] = name
      else:
        put(name, value, name)
    else:
      put(name, value, name)
  stacks = {k: out.pop(k) for k in ("ffn.experts.mlp.w1", "ffn.experts.mlp.v1", "ffn.experts.mlp.w2") if k in out}
  for layer in sorted({layer for per_layer in stacks.values() for layer in per_layer}):
    missing = [
      k for k in ("ffn.experts.mlp.w1", "ffn.experts.mlp.v1", "ffn.experts.mlp.w2") if layer not in stacks.get(k, {})
    ]
    if missing:
      raise ConfigError(
        f"tensor {layer.replace('model.layers', 'transformer.blocks')}.{missing[0]}", "is missing from the checkpoint"
      )
    w1, v1, w2 = (stacks[k][layer] for k in ("ffn.experts.mlp.w1", "ffn.experts.mlp.v1", "ffn.experts.mlp.w2"))
    put(f"{layer}.mlp.experts.gate_up_proj", np.concatenate([w1, v1], axis=1), origin[f"{layer}.ffn.experts.mlp.w1"])
    put(
      f"{layer}.mlp.experts.down_proj",
      np.ascontiguousarray(w2.transpose(0, 2, 1)),
      origin[f"{layer}.ffn.experts.mlp.w2"],
    )
  return out, origin


def _dbrx_from_canonical(weights: dict, cfg) -> dict:
  """The inverse of `_dbrx_to_canonical`: DBRX's names and fused layouts."""
  out = {}
  for name, value in weights.items():
    parts = name.split(".")
    if name == "model.embed_tokens.weight":
      out["transformer.wte.weight"] = value
    elif name == "model.norm.weight":
      out["transformer.norm_f.weight"] = value
    elif parts[:2] == ["model", "layers"]:
      block, rest = f"transformer.blocks.{parts[2]}", ".".join(parts[3:])
      renamed = {
        "input_layernorm.weight": "norm_attn_norm.norm_1.weight",
        "post_attention_layernorm.weight": "norm_attn_norm.norm_2.weight",
        "self_attn.o_proj.weight": "norm_attn_norm.attn.out_proj.weight",
        "mlp.gate.weight": "ffn.router.layer.weight",
      }
      if rest in renamed:
        out[f"{block}.{renamed[rest]}"] = value
      elif rest == "self_attn.q_proj.weight":
        layer = f"model.layers.{parts[2]}.self_attn"
        qkv = [weights[f"{layer}.{p}_proj.weight"] for p in ("q", "k", "v")]
        out[f"{block}.norm_attn_norm.attn.Wqkv.weight"] = np.concatenate(qkv, axis=0)
      elif rest == "mlp.experts.gate_up_proj":
        f = value.shape[1] // 2
        out[f"{block}.ffn.experts.mlp.w1"] = value[:, :f].reshape(-1, value.shape[2])
        out[f"{block}.ffn.experts.mlp.v1"] = value[:, f:].reshape(-1, value.shape[2])
      elif rest == "mlp.experts.down_proj":
        out[f"{block}.ffn.experts.mlp.w2"] = np.ascontiguousarray(value.transpose(0, 2, 1)).reshape(-1, value.shape[1])
      elif rest not in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        out[name] = value
    else:
      out[name] = value
  return out


def _deepseek(r: _Reader, version: int) -> dict:
  """DeepSeek-V2 (V2-Lite) and V3: multi-head latent attention, DeepSeekMoE with shared experts.

  Reads the keys transformers' DeepseekV2Config / DeepseekV3Config write and those of the
  released config.json files (DeepSeek's own modeling code: aux_loss_alpha, seq_aux, ep_size,
  scoring_func, moe_layer_freq).
  """
  d, heads = r.require("hidden_size"), r.require("num_attention_heads")
  r.expect("hidden_act", ("silu",), "the experts are SwiGLU")
  r.expect("attention_dropout", (0.0, 0), "moejax's attention has no dropout")
  r.expect("attention_bias", (False,), "moejax's latent attention has no biases")
  r.expect("mlp_bias", (False,), "moejax's FFNs have no biases")
  r.expect("pretraining_tp", (1, None), "a tensor-parallel emulation of the matmuls")
  r.expect("moe_layer_freq", (1,), "every block after first_k_dense_replace is MoE")
  r.get("ep_size")  # Devices the released training split the experts over: no effect on the function.
  kv_heads = r.get("num_key_value_heads") or heads
  if kv_heads != heads:
    raise ConfigError(
      r.field("num_key_value_heads"), f"{kv_heads} != num_attention_heads ({heads}): MLA has a latent, not kv heads"
    )
  rope_dim = r.require("qk_rope_head_dim")
  nope_dim = r.require("qk_nope_head_dim")
  for key, want in (("head_dim", rope_dim), ("qk_head_dim", nope_dim + rope_dim)):  # Derived by transformers.
    if r.get(key, want) != want:
      raise ConfigError(r.field(key), f"{r.get(key)} is not the derived {want}")
  scoring = r.expect(
    "scoring_func", ("softmax",) if version == 2 else ("sigmoid",), f"DeepSeek-V{version}'s affinities"
  )
  methods = ("greedy", "group_limited_greedy") if version == 2 else ("noaux_tc",)
  method = r.expect("topk_method", methods, f"DeepSeek-V{version}'s routing")
  groups = r.get("n_group") or 1
  if version == 2:
    # transformers' V2 router ignores norm_topk_prob; DeepSeek's own code renormalises with it: refused.
    r.expect("norm_topk_prob", (False, None), "transformers' DeepSeek-V2 never renormalises")
    combine = "raw"
    if method == "greedy":
      groups = 1
  else:
    combine = "renormalized" if r.get("norm_topk_prob", True) else "raw"
  if version == 3:
    r.expect("rope_interleave", (True,), "DeepSeek-V3's RoPE pairs are interleaved")
  first_dense = r.get("first_k_dense_replace") or 0
  num_layers = r.require("num_hidden_layers")
  out = {
    "model.vocab_size": r.require("vocab_size"),
    "model.num_layers": num_layers,
    "model.d_model": d,
    "model.num_heads": heads,
    "model.attention": "mla",
    "model.q_lora_rank": r.get("q_lora_rank") or 0,
    "model.kv_lora_rank": r.require("kv_lora_rank"),
    "model.qk_nope_head_dim": nope_dim,
    "model.qk_rope_head_dim": rope_dim,
    "model.v_head_dim": r.require("v_head_dim"),
    **_rope(r),
    "model.rope_interleaved": True,
    "model.norm_eps": float(r.require("rms_norm_eps")),
    "model.tie_embeddings": bool(r.get("tie_word_embeddings", False)),
    "model.activation": "swiglu",
    "model.d_ff": r.require("intermediate_size"),
    "model.moe_every": 1,
    "model.dense_layers": tuple(range(min(first_dense, num_layers))),
    "moe.router": "deepseek",
    "moe.score_function": scoring,
    "moe.num_experts": r.require("n_routed_experts"),
    "moe.top_k": r.require("num_experts_per_tok"),
    "moe.d_expert": r.require("moe_intermediate_size"),
    "moe.num_shared_experts": r.get("n_shared_experts") or 0,
    "moe.combine_weights": combine,
    "moe.routed_scaling_factor": float(r.get("routed_scaling_factor", 1.0)),
    "moe.num_expert_groups": groups,
    "moe.dispatcher": "dropless",
    # DeepSeek's balance loss (its own code; transformers has none): α·Σ_i f_i·P_i per MoE layer,
    # f_i = E/(K·T)·(tokens choosing i), P_i the mean affinity, over each sequence with seq_aux.
    "moe.load_balance_loss_weight": float(r.get("aux_loss_alpha", 0.0)),
    "moe.load_balance_density": "topk",
    "moe.load_balance_pooling": "per_layer",
    "moe.load_balance_scope": "group" if r.get("seq_aux", True) else "global_batch",
    "moe.z_loss_weight": 0.0,
  }
  if groups > 1:
    out["moe.top_expert_groups"] = r.require("topk_group")
    out["moe.group_score"] = "max" if version == 2 else "top2_sum"
  else:
    r.get("topk_group")  # Read only with groups.
  if version == 2:
    out["moe.bias_update_rate"] = 0.0  # V2 has no balancing bias.
  else:
    # The multi-token-prediction modules the checkpoint holds (model.layers.{L + k}; transformers
    # drops them): a training objective, not part of the logits.
    out["model.mtp_depth"] = r.get("num_nextn_predict_layers") or 0
  return out


def _deepseek_v2(r: _Reader) -> dict:
  return _deepseek(r, 2)


def _deepseek_v3(r: _Reader) -> dict:
  return _deepseek(r, 3)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What moejax knows of one transformers model_type.

  overrides: config.json reader -> {'section.field': value}.
  moe_prefix: the MoE block's name in a layer ('mlp'; Mixtral's released files 'block_sparse_moe').
  expert_names: per-expert file names of (gate, up, down).
  shared_expert: the shared expert's and its gate's names in the MoE block (the gate None if it
    has none), or None.
  router_bias: the router's balancing-bias buffer (DeepSeek-V3's e_score_correction_bias), or None.
  router_name: the router's name in the MoE block ('gate'; gpt-oss 'router', with a learned bias).
  expert_layout: 'fused' (gate_up_proj [E, 2f, d], the gate half first; or per expert) |
    'interleaved' (gpt-oss: gate_up_proj [E, d, 2f] with gate and up in alternate columns,
    down_proj [E, f, d], both already [in, out], and their biases).
  """

  model_type: str
  overrides: Callable[[_Reader], dict]
  moe_prefix: str = "mlp"
  expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
  shared_expert: tuple[str, str | None] | None = None
  router_bias: str | None = None
  router_name: str = "gate"
  expert_layout: str = "fused"
  # (weights, cfg) -> (weights under the Llama-style names, {name: the checkpoint's name}), and back.
  to_canonical: Callable | None = None
  from_canonical: Callable | None = None


ARCHITECTURES = {
  a.model_type: a
  for a in (
    Architecture("mixtral", _mixtral, moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2")),
    Architecture("olmoe", _olmoe),
    Architecture("qwen2_moe", _qwen2_moe, shared_expert=("shared_expert", "shared_expert_gate")),
    Architecture("qwen3_moe", _qwen3_moe),
    Architecture("deepseek_v2", _deepseek_v2, shared_expert=("shared_experts", None)),
    Architecture(
      "deepseek_v3", _deepseek_v3, shared_expert=("shared_experts", None), router_bias="e_score_correction_bias"
    ),
    Architecture("gpt_oss", _gpt_oss, router_name="router", expert_layout="interleaved"),
    Architecture("dbrx", _dbrx, to_canonical=_dbrx_to_canonical, from_canonical=_dbrx_from_canonical),
  )
}


def architecture(hf_config: Mapping) -> Architecture:
  """The table of hf_config's model_type; ConfigError naming the ones moejax converts otherwise."""
  model_type = hf_config.get("model_type")
  if model_type not in ARCHITECTURES:
    raise ConfigError(
      "config.model_type", f"{model_type!r} is not converted; moejax converts {', '.join(sorted(ARCHITECTURES))}"
    )
  return ARCHITECTURES[model_type]


def config_overrides(hf_config: Mapping) -> dict:
  """{'section.field': value} that make moejax's decoder the model of a transformers config.json dict.

  Raises ConfigError naming the first key whose value moejax does not model, or a key it does not know.
  """
  arch = architecture(hf_config)
  reader = _Reader(hf_config, arch.model_type)
  out = arch.overrides(reader)
  unread = reader.unread()
  if unread:
    raise ConfigError(
      reader.field(unread[0]), "is not a key moejax knows how to convert; it may change the model's function"
    )
  return out


def moejax_config(hf_config: Mapping, seq_len: int = 0):
  """base_config('lm') with `config_overrides(hf_config)` applied (and train.seq_len if given)."""
  from moejax.config import base_config, override

  cfg = override(base_config("lm"), config_overrides(hf_config))
  if seq_len:
    cfg.train.seq_len = seq_len
  return cfg


# ----- Weights. -----


# A SwiGLU FFN's moejax parameter and transformers' name for it (dense MLPs and shared experts).
_FFN_NAMES = (("wi", "gate_proj"), ("wg", "up_proj"), ("wo", "down_proj"))


def _linear(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> moejax kernel [in, out]."""
  return np.ascontiguousarray(np.asarray(w).T)


def _expert_stacks(weights: Mapping, layer: str, arch: Architecture, num_experts: int, used: set):
  """(gate [E, d, f], up [E, d, f], down [E, f, d]) of one MoE layer from either layout."""
  if arch.expert_layout == "interleaved":
    gate_up = _take(weights, f"{layer}.mlp.experts.gate_up_proj", used)  # [E, d, 2f]
    return gate_up[..., 0::2], gate_up[..., 1::2], _take(weights, f"{layer}.mlp.experts.down_proj", used)
  for prefix in dict.fromkeys((arch.moe_prefix, "mlp")):
    fused = f"{layer}.{prefix}.experts.gate_up_proj"
    if fused in weights:
      gate_up, down = _take(weights, fused, used), _take(weights, f"{layer}.{prefix}.experts.down_proj", used)
      f = gate_up.shape[1] // 2
      gate, up = gate_up[:, :f].transpose(0, 2, 1), gate_up[:, f:].transpose(0, 2, 1)  # [E, d, f]
      return gate, up, down.transpose(0, 2, 1)
    first = f"{layer}.{prefix}.experts.0.{arch.expert_names[0]}.weight"
    if first in weights:
      stacks = []
      for name in arch.expert_names:
        keys = [f"{layer}.{prefix}.experts.{j}.{name}.weight" for j in range(num_experts)]
        missing = [k for k in keys if k not in weights]
        if missing:
          raise ConfigError(f"tensor {missing[0]}", "is missing from the checkpoint")
        used.update(keys)
        stacks.append(np.stack([_linear(weights[k]) for k in keys]))
      return tuple(stacks)
  raise ConfigError(f"tensor {layer}.{arch.moe_prefix}.experts", "holds neither gate_up_proj nor experts.0.*")


def _take(weights: Mapping, name: str, used: set) -> np.ndarray:
  if name not in weights:
    raise ConfigError(f"tensor {name}", "is missing from the checkpoint")
  used.add(name)
  return np.asarray(weights[name])


def _moe_prefix(weights: Mapping, layer: str, arch: Architecture) -> str:
  """Where the layer's router lives: 'mlp' (transformers 5) or the architecture's file name."""
  for prefix in dict.fromkeys(("mlp", arch.moe_prefix)):
    if f"{layer}.{prefix}.{arch.router_name}.weight" in weights:
      return prefix
  return "mlp"


def hf_to_moejax(weights: Mapping[str, np.ndarray], cfg, model_type: str) -> dict:
  """{moejax parameter path (tuple): array} of a transformers state dict, for a model built from `cfg`.

  cfg: the DecoderConfig the model was built with (`moejax.models.build.decoder_config`);
  model_type: the transformers architecture (a key of ARCHITECTURES).
  Raises ConfigError naming a tensor that is missing or that no moejax parameter takes.
  """
  out = {}
  for _, arrays in iter_hf_to_moejax(weights, cfg, model_type):
    out.update(arrays)
  return out


_LAYER_NAME = re.compile(r"^(?:model\.layers|transformer\.blocks)\.(\d+)\.")


def iter_hf_to_moejax(weights: Mapping[str, np.ndarray], cfg, model_type: str):
  """`hf_to_moejax` one part at a time: yields (part, {moejax path: array}).

  Parts: 'globals' (the embedding, the final norm and the head, each yielded alone), then
  'layer {i}' for each decoder layer and 'mtp {k}' for each multi-token-prediction module. Each
  part reads only its own tensors of `weights` (which may be lazy, e.g.
  `moejax.convert.files.HFCheckpoint`), so a caller that writes each part away before asking for
  the next holds one part at a time. After the last part, a tensor that no part took is refused
  (ConfigError naming it).
  """
  arch = architecture({"model_type": model_type})
  by_layer: dict[int | None, list[str]] = {}
  for name in weights:
    by_layer.setdefault(layer_index(name), []).append(name)
  global_names = by_layer.get(None, [])
  parts = [("globals", None)] + [(f"layer {i}", i) for i in range(cfg.num_layers)]
  parts += [(f"mtp {k}", cfg.num_layers + k) for k in range(cfg.mtp_depth)]
  for part, index in parts:
    own = _Subset(weights, by_layer.pop(index, []))
    canonical, origin = (own, {}) if arch.to_canonical is None else arch.to_canonical(own, cfg)
    used: set = set()
    try:
      if index is None:  # The embedding, final norm and head one at a time: the largest tensors of many models.
        yield from ((part, arrays) for arrays in _globals_to_moejax(canonical, cfg, used))
      elif index < cfg.num_layers:
        block = ("blocks", index)
        yield (
          part,
          _block_to_moejax(canonical, f"model.layers.{index}", block, cfg.is_moe_layer(index), cfg, arch, used),
        )
      else:  # An MTP module also reads the shared embedding and head, to compare its copies with them.
        readable = _Subset(weights, list(own) + global_names)
        yield part, _mtp_to_moejax(readable, index, cfg, arch, cfg.is_moe_layer(cfg.num_layers - 1), used)
      unused = sorted(set(canonical) - used)
      if unused:
        raise ConfigError(f"tensor {unused[0]}", "has no place in the moejax model built from this config")
    except ConfigError as error:  # Name the checkpoint's tensor, not its Llama-style name.
      name = error.field.removeprefix("tensor ")
      if name not in origin:
        raise
      raise ConfigError(f"tensor {origin[name]}", str(error).split(": ", 1)[1]) from None
    except (ValueError, IndexError) as error:  # A reshape or split the tensors' shapes do not allow.
      where = "the embedding, final norm and head" if index is None else f"layer {index} of the checkpoint"
      first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
      raise ConfigError(f"tensors of {where}", f"do not have the shapes config.json gives ({first})") from None
  leftover = sorted(name for names in by_layer.values() for name in names)
  if leftover:
    raise ConfigError(f"tensor {leftover[0]}", "has no place in the moejax model built from this config")


def layer_index(name: str) -> int | None:
  """The decoder layer a checkpoint tensor belongs to (model.layers.{i}. / transformer.blocks.{i}.), or None."""
  match = _LAYER_NAME.match(name)
  return int(match.group(1)) if match else None


def subset(weights: Mapping, names) -> Mapping:
  """The tensors `names` of `weights` as a Mapping that reads each only when asked for."""
  return _Subset(weights, names)


class _Subset(Mapping):
  """The tensors `names` of `weights`, read only when asked for (a view, no copy)."""

  def __init__(self, weights: Mapping, names):
    self._weights, self._names = weights, list(names)
    self._set = set(self._names)

  def __getitem__(self, name):
    if name not in self._set:
      raise KeyError(name)
    return self._weights[name]

  def __iter__(self):
    return iter(self._names)

  def __len__(self):
    return len(self._names)

  def __contains__(self, name):
    return name in self._set


def _globals_to_moejax(weights: Mapping, cfg, used: set):
  """Yields the embedding, the final norm and the (untied) head, one {path: array} each."""
  yield {("embed", "embedding"): _take(weights, "model.embed_tokens.weight", used)}
  yield {("final_norm", "scale"): _take(weights, "model.norm.weight", used)}
  if not cfg.tie_embeddings:
    yield {("unembed", "kernel"): _linear(_take(weights, "lm_head.weight", used))}
  elif "lm_head.weight" in weights:  # A tied state dict may list it again; it must be the embedding.
    if not np.array_equal(np.asarray(weights["lm_head.weight"]), np.asarray(weights["model.embed_tokens.weight"])):
      raise ConfigError("tensor lm_head.weight", "differs from model.embed_tokens.weight, but the config ties them")
    used.add("lm_head.weight")


def _mtp_to_moejax(weights: Mapping, index: int, cfg, arch: Architecture, last_is_moe: bool, used: set) -> dict:
  """DeepSeek-V3's MTP module k + 1, layer L + k of the checkpoint (its norms, projection and block)."""
  k = index - cfg.num_layers
  layer, path = f"model.layers.{index}", ("mtp", k)
  if f"{layer}.eh_proj.weight" not in weights:
    raise ConfigError(
      f"tensor {layer}.eh_proj.weight",
      "is missing: the config has model.mtp_depth > 0 (num_nextn_predict_layers) but the checkpoint no MTP "
      "module (transformers' state dicts drop it); set model.mtp_depth=0 (from-hf: --without_mtp) to load the main "
      "model alone",
    )
  out = {
    (*path, "embed_norm", "scale"): _take(weights, f"{layer}.enorm.weight", used),
    (*path, "hidden_norm", "scale"): _take(weights, f"{layer}.hnorm.weight", used),
    (*path, "proj"): _linear(_take(weights, f"{layer}.eh_proj.weight", used)),
    (*path, "norm", "scale"): _take(weights, f"{layer}.shared_head.norm.weight", used),
  }
  head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
  for copy, shared in (("embed_tokens.weight", "model.embed_tokens.weight"), ("shared_head.head.weight", head)):
    name = f"{layer}.{copy}"
    if name in weights:  # The checkpoint's copies of the shared embedding and head must be them.
      if shared not in weights or not np.array_equal(np.asarray(weights[name]), np.asarray(weights[shared])):
        raise ConfigError(f"tensor {name}", f"differs from {shared}, which the MTP module shares")
      used.add(name)
  out.update(_block_to_moejax(weights, layer, (*path, "block"), last_is_moe, cfg, arch, used))
  return out


def _block_to_moejax(weights, layer: str, block: tuple, is_moe: bool, cfg, arch: Architecture, used: set) -> dict:
  """One decoder layer of the checkpoint (its norms, attention, FFN or MoE) at moejax path `block`."""
  out = {
    (*block, "attention_norm", "scale"): _take(weights, f"{layer}.input_layernorm.weight", used),
    (*block, "ffn_norm", "scale"): _take(weights, f"{layer}.post_attention_layernorm.weight", used),
  }
  to_moejax = _latent_attention_to_moejax if cfg.attention == "mla" else _attention_to_moejax
  out.update(to_moejax(weights, f"{layer}.self_attn", (*block, "attention"), cfg, used))
  ffn = (*block, "ffn")
  if not is_moe:
    for ours, theirs in _FFN_NAMES:
      out[(*ffn, ours)] = _linear(_take(weights, f"{layer}.mlp.{theirs}.weight", used))
    return out
  prefix = _moe_prefix(weights, layer, arch)
  router = f"{layer}.{prefix}.{arch.router_name}"
  out[(*ffn, "router", "kernel")] = _linear(_take(weights, f"{router}.weight", used))
  if arch.router_bias:
    out[(*ffn, "router", "bias")] = _take(weights, f"{router}.{arch.router_bias}", used)
  if cfg.moe.router_bias:
    out[(*ffn, "router", "kernel_bias")] = _take(weights, f"{router}.bias", used)
  gate, up, down = _expert_stacks(weights, layer, arch, cfg.moe.num_experts, used)
  out[(*ffn, "wi")], out[(*ffn, "wg")], out[(*ffn, "wo")] = gate, up, down
  if cfg.moe.expert_bias:  # gpt-oss: [E, 2f] in the gate/up column order of gate_up_proj.
    gate_up_bias = _take(weights, f"{layer}.mlp.experts.gate_up_proj_bias", used)
    out[(*ffn, "bi")], out[(*ffn, "bg")] = gate_up_bias[:, 0::2], gate_up_bias[:, 1::2]
    out[(*ffn, "bo")] = _take(weights, f"{layer}.mlp.experts.down_proj_bias", used)
  if arch.shared_expert:
    shared, shared_gate = arch.shared_expert
    for ours, theirs in _FFN_NAMES:
      out[(*ffn, "shared", ours)] = _linear(_take(weights, f"{layer}.{prefix}.{shared}.{theirs}.weight", used))
    if shared_gate:
      out[(*ffn, "shared_gate")] = _linear(_take(weights, f"{layer}.{prefix}.{shared_gate}.weight", used))
  return out


def _attention_to_moejax(weights, prefix: str, path: tuple, cfg, used: set) -> dict:
  """q/k/v/o projections (and biases, q/k norms) of one layer, in moejax's head-split layout."""
  d, heads = cfg.d_model, cfg.num_heads
  kv_heads = cfg.num_kv_heads or heads
  head_dim = cfg.head_dim or d // heads
  q = _linear(_take(weights, f"{prefix}.q_proj.weight", used)).reshape(d, heads, head_dim)
  k = _linear(_take(weights, f"{prefix}.k_proj.weight", used)).reshape(d, kv_heads, head_dim)
  v = _linear(_take(weights, f"{prefix}.v_proj.weight", used)).reshape(d, kv_heads, head_dim)
  out = {(*path, "wo"): _linear(_take(weights, f"{prefix}.o_proj.weight", used))}
  has_bias = cfg.attention_bias != "none"
  if has_bias:
    bq = _take(weights, f"{prefix}.q_proj.bias", used).reshape(heads, head_dim)
    bk = _take(weights, f"{prefix}.k_proj.bias", used).reshape(kv_heads, head_dim)
    bv = _take(weights, f"{prefix}.v_proj.bias", used).reshape(kv_heads, head_dim)
  if cfg.attention_bias == "qkvo":
    out[(*path, "bo")] = _take(weights, f"{prefix}.o_proj.bias", used)
  if kv_heads == heads:
    out[(*path, "wqkv")] = np.stack([q, k, v], axis=1)  # [d, 3, N, H]
    if has_bias:
      out[(*path, "bqkv")] = np.stack([bq, bk, bv])  # [3, N, H]
  else:
    out[(*path, "wq")], out[(*path, "wkv")] = q, np.stack([k, v], axis=1)  # [d, N, H], [d, 2, N_kv, H]
    if has_bias:
      out[(*path, "bq")], out[(*path, "bkv")] = bq, np.stack([bk, bv])
  if cfg.qk_norm:
    out[(*path, "q_norm", "scale")] = _take(weights, f"{prefix}.q_norm.weight", used)
    out[(*path, "k_norm", "scale")] = _take(weights, f"{prefix}.k_norm.weight", used)
  if cfg.attention_sinks:
    out[(*path, "sinks")] = _take(weights, f"{prefix}.sinks", used)
  return out


# Multi-head latent attention: moejax parameter, transformers' Linear, the moejax shape of its kernel
# (in terms of N heads, the query dims H_q = H_n + H_r and key/value dims H_kv = H_n + H_v).
def _latent_attention_to_moejax(weights, prefix: str, path: tuple, cfg, used: set) -> dict:
  """q (or q_a, q_norm, q_b), kv_a, kv_norm, kv_b and o projections of one MLA layer."""
  heads = cfg.num_heads
  q_dim, kv_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_nope_head_dim + cfg.v_head_dim
  out = {}
  if cfg.q_lora_rank:
    out[(*path, "wq_a")] = _linear(_take(weights, f"{prefix}.q_a_proj.weight", used))
    out[(*path, "q_norm", "scale")] = _take(weights, f"{prefix}.q_a_layernorm.weight", used)
    out[(*path, "wq_b")] = _linear(_take(weights, f"{prefix}.q_b_proj.weight", used)).reshape(-1, heads, q_dim)
  else:
    out[(*path, "wq")] = _linear(_take(weights, f"{prefix}.q_proj.weight", used)).reshape(-1, heads, q_dim)
  out[(*path, "wkv_a")] = _linear(_take(weights, f"{prefix}.kv_a_proj_with_mqa.weight", used))
  out[(*path, "kv_norm", "scale")] = _take(weights, f"{prefix}.kv_a_layernorm.weight", used)
  out[(*path, "wkv_b")] = _linear(_take(weights, f"{prefix}.kv_b_proj.weight", used)).reshape(-1, heads, kv_dim)
  out[(*path, "wo")] = _linear(_take(weights, f"{prefix}.o_proj.weight", used))
  return out


def _model_arrays(model) -> dict:
  """{path: variable} of a model's parameters and routing state (DeepSeek's balancing bias)."""
  from flax import nnx

  from moejax.layers.router import RouterBias

  return dict(nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, RouterBias))))


def absent_defaults(shapes: Mapping[tuple, tuple], model_type: str) -> dict:
  """{path: array} of the model variables (paths and shapes given) an architecture's checkpoints never hold.

  The routing bias of an architecture that chooses experts without one (DeepSeek-V2): zero is its function.
  """
  if architecture({"model_type": model_type}).router_bias:
    return {}
  return {
    path: np.zeros(shape, np.float32) for path, shape in shapes.items() if path[-1] == "bias" and "router" in path
  }


def load_hf_weights(model, weights: Mapping[str, np.ndarray], model_type: str) -> None:
  """Copies a transformers state dict of architecture `model_type` into a moejax DecoderLM in place.

  Raises ConfigError naming the first tensor that is missing, left over, or of the wrong shape.
  Arrays are cast to the model's parameter dtype (float32).
  """
  from flax import nnx

  params = _model_arrays(model)
  arrays = hf_to_moejax(weights, model.cfg, model_type)
  arrays.update(absent_defaults({path: v.get_value().shape for path, v in params.items()}, model_type))
  missing = sorted(set(params) - set(arrays), key=str)
  if missing:
    raise ConfigError(f"parameter {'.'.join(map(str, missing[0]))}", "has no tensor in the transformers state dict")
  for path, value in arrays.items():
    if path not in params:
      raise ConfigError(f"parameter {'.'.join(map(str, path))}", "does not exist in the moejax model")
    want = params[path].get_value().shape
    if tuple(value.shape) != tuple(want):
      raise ConfigError(
        f"parameter {'.'.join(map(str, path))}", f"expects shape {tuple(want)}, the checkpoint gives {value.shape}"
      )
    params[path].set_value(np.asarray(value, dtype=params[path].get_value().dtype))
  nnx.update(model, nnx.from_flat_state(params))


def export_hf_weights(model, model_type: str) -> dict[str, np.ndarray]:
  """A moejax DecoderLM's parameters as a transformers >= 5 state dict (fused experts), float32 numpy.

  The inverse of `load_hf_weights`: load_hf_weights(m, export_hf_weights(m, t), t) leaves m unchanged.
  """
  flat = {path: np.asarray(p.get_value()) for path, p in _model_arrays(model).items()}
  out = {}
  for part, _ in export_parts(model.cfg):
    out.update(export_part(flat, part, model.cfg, model_type))
  return out


def export_parts(cfg) -> list[tuple[str, tuple]]:
  """[(part, the moejax path prefix of its arrays)] in the order `export_part` takes them.

  'embedding' ('embed',), 'final norm' ('final_norm',), 'head' ('unembed',; none when tied),
  'layer {i}' ('blocks', i), 'mtp {k}' ('mtp', k): one tensor or one layer each.
  """
  parts = [("embedding", ("embed",)), ("final norm", ("final_norm",))]
  parts += [] if cfg.tie_embeddings else [("head", ("unembed",))]
  parts += [(f"layer {i}", ("blocks", i)) for i in range(cfg.num_layers)]
  return parts + [(f"mtp {k}", ("mtp", k)) for k in range(cfg.mtp_depth)]


def export_part(flat: Mapping[tuple, np.ndarray], part: str, cfg, model_type: str) -> dict[str, np.ndarray]:
  """One part (`export_parts`) of `export_hf_weights`: its tensors from the moejax arrays `flat` holds for it."""
  arch = architecture({"model_type": model_type})
  kind, _, index = part.partition(" ")
  # The MTP modules' copies of the shared embedding and head, as DeepSeek-V3's release holds them
  # (model.layers.{L + k}.embed_tokens, .shared_head.head): the same arrays, written again.
  mtp_layers = [f"model.layers.{cfg.num_layers + k}" for k in range(cfg.mtp_depth)]
  if part == "embedding":
    embedding = flat[("embed", "embedding")]
    out = {"model.embed_tokens.weight": embedding}
    out.update({f"{layer}.embed_tokens.weight": embedding for layer in mtp_layers})
    if cfg.tie_embeddings:
      out.update({f"{layer}.shared_head.head.weight": embedding for layer in mtp_layers})
  elif part == "final norm":
    out = {"model.norm.weight": flat[("final_norm", "scale")]}
  elif part == "head":
    head = _linear(flat[("unembed", "kernel")])
    out = {"lm_head.weight": head, **{f"{layer}.shared_head.head.weight": head for layer in mtp_layers}}
  elif kind == "layer":
    i = int(index)
    out = _block_to_hf(flat, f"model.layers.{i}", ("blocks", i), cfg.is_moe_layer(i), cfg, arch, model_type)
  else:
    k = int(index)
    layer, path = f"model.layers.{cfg.num_layers + k}", ("mtp", k)
    out = {
      f"{layer}.enorm.weight": flat[(*path, "embed_norm", "scale")],
      f"{layer}.hnorm.weight": flat[(*path, "hidden_norm", "scale")],
      f"{layer}.eh_proj.weight": _linear(flat[(*path, "proj")]),
      f"{layer}.shared_head.norm.weight": flat[(*path, "norm", "scale")],
    }
    last_is_moe = cfg.is_moe_layer(cfg.num_layers - 1)
    out.update(_block_to_hf(flat, layer, (*path, "block"), last_is_moe, cfg, arch, model_type))
  return out if arch.from_canonical is None else arch.from_canonical(out, cfg)


def _block_to_hf(flat: dict, layer: str, block: tuple, is_moe: bool, cfg, arch: Architecture, model_type: str) -> dict:
  """One decoder layer as transformers names it (the inverse of `_block_to_moejax`)."""
  out = {
    f"{layer}.input_layernorm.weight": flat[(*block, "attention_norm", "scale")],
    f"{layer}.post_attention_layernorm.weight": flat[(*block, "ffn_norm", "scale")],
  }
  to_hf = _latent_attention_to_hf if cfg.attention == "mla" else _attention_to_hf
  out.update(to_hf(flat, (*block, "attention"), f"{layer}.self_attn", cfg))
  ffn = (*block, "ffn")
  if not is_moe:
    for ours, theirs in _FFN_NAMES:
      out[f"{layer}.mlp.{theirs}.weight"] = _linear(flat[(*ffn, ours)])
    return out
  router = f"{layer}.mlp.{arch.router_name}"
  out[f"{router}.weight"] = _linear(flat[(*ffn, "router", "kernel")])
  if (*ffn, "router", "kernel_bias") in flat:
    out[f"{router}.bias"] = flat[(*ffn, "router", "kernel_bias")]
  bias = flat.get((*ffn, "router", "bias"))
  if arch.router_bias:
    out[f"{router}.{arch.router_bias}"] = bias
  elif bias is not None and np.any(bias):
    raise ConfigError(
      f"parameter {'.'.join(map(str, ffn))}.router.bias",
      f"is non-zero, and {model_type} has no balancing bias to hold it",
    )
  gate, up, down = flat[(*ffn, "wi")], flat[(*ffn, "wg")], flat[(*ffn, "wo")]  # [E, d, f] ×2, [E, f, d]
  if arch.expert_layout == "interleaved":
    out[f"{layer}.mlp.experts.gate_up_proj"] = np.stack([gate, up], axis=-1).reshape(*gate.shape[:2], -1)
    out[f"{layer}.mlp.experts.down_proj"] = down
  else:
    out[f"{layer}.mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=2).transpose(0, 2, 1)
    out[f"{layer}.mlp.experts.down_proj"] = np.ascontiguousarray(down.transpose(0, 2, 1))
  if (*ffn, "bi") in flat:
    bi, bg = flat[(*ffn, "bi")], flat[(*ffn, "bg")]
    out[f"{layer}.mlp.experts.gate_up_proj_bias"] = np.stack([bi, bg], axis=-1).reshape(bi.shape[0], -1)
    out[f"{layer}.mlp.experts.down_proj_bias"] = flat[(*ffn, "bo")]
  if arch.shared_expert:
    shared, shared_gate = arch.shared_expert
    for ours, theirs in _FFN_NAMES:
      out[f"{layer}.mlp.{shared}.{theirs}.weight"] = _linear(flat[(*ffn, "shared", ours)])
    if shared_gate:
      out[f"{layer}.mlp.{shared_gate}.weight"] = _linear(flat[(*ffn, "shared_gate")])
  return out


def _attention_to_hf(flat: dict, att: tuple, pre: str, cfg) -> dict:
  """One multi-head / grouped-query attention layer's q, k, v, o (biases, q/k norms) as transformers names them."""
  out = {}
  if (*att, "wqkv") in flat:
    w = flat[(*att, "wqkv")]
    q, k, v = w[:, 0], w[:, 1], w[:, 2]
    biases = flat.get((*att, "bqkv"))
  else:
    q, kv = flat[(*att, "wq")], flat[(*att, "wkv")]
    k, v = kv[:, 0], kv[:, 1]
    biases = None if (*att, "bq") not in flat else (flat[(*att, "bq")], *flat[(*att, "bkv")])
  for name, w in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
    out[f"{pre}.{name}.weight"] = _linear(w.reshape(w.shape[0], -1))
  if biases is not None:
    for name, b in zip(("q_proj", "k_proj", "v_proj"), biases):
      out[f"{pre}.{name}.bias"] = np.asarray(b).reshape(-1)
  out[f"{pre}.o_proj.weight"] = _linear(flat[(*att, "wo")])
  if (*att, "bo") in flat:
    out[f"{pre}.o_proj.bias"] = flat[(*att, "bo")]
  if cfg.qk_norm:
    out[f"{pre}.q_norm.weight"] = flat[(*att, "q_norm", "scale")]
    out[f"{pre}.k_norm.weight"] = flat[(*att, "k_norm", "scale")]
  if cfg.attention_sinks:
    out[f"{pre}.sinks"] = flat[(*att, "sinks")]
  return out


def _latent_attention_to_hf(flat: dict, att: tuple, pre: str, cfg) -> dict:
  """One MLA layer as transformers names it (the inverse of `_latent_attention_to_moejax`)."""
  out = {}
  for ours, theirs in (("wq_a", "q_a_proj"), ("wq_b", "q_b_proj"), ("wq", "q_proj"), ("wkv_a", "kv_a_proj_with_mqa")):
    if (*att, ours) in flat:
      w = flat[(*att, ours)]
      out[f"{pre}.{theirs}.weight"] = _linear(w.reshape(w.shape[0], -1))
  if cfg.q_lora_rank:
    out[f"{pre}.q_a_layernorm.weight"] = flat[(*att, "q_norm", "scale")]
  out[f"{pre}.kv_a_layernorm.weight"] = flat[(*att, "kv_norm", "scale")]
  out[f"{pre}.kv_b_proj.weight"] = _linear(flat[(*att, "wkv_b")].reshape(cfg.kv_lora_rank, -1))
  out[f"{pre}.o_proj.weight"] = _linear(flat[(*att, "wo")])
  return out
