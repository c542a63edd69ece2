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

A config.json key that moejax does not model is refused with the key's name (`ConfigError`),
never dropped: a converted model computes the released function or does not convert.
"""

from __future__ import annotations

import dataclasses
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


def _rope_theta(r: _Reader) -> float:
  """The RoPE base from transformers 5's rope_parameters or transformers 4's rope_theta / rope_scaling."""
  params = r.get("rope_parameters") or {}
  scaling = r.get("rope_scaling") or {}
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind != "default":
    raise ConfigError(
      r.field("rope_parameters.rope_type"), f"{kind!r} is not supported; moejax implements 'default' RoPE"
    )
  theta = params.get("rope_theta", r.get("rope_theta"))
  if theta is None:
    raise ConfigError(r.field("rope_theta"), "is missing from the config (and from rope_parameters)")
  return float(theta)


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
    "model.positions": "rope",
    "model.rope_theta": _rope_theta(r),
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


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What moejax knows of one transformers model_type.

  overrides: config.json reader -> {'section.field': value}.
  moe_prefix: the MoE block's name in a layer ('mlp'; Mixtral's released files 'block_sparse_moe').
  expert_names: per-expert file names of (gate, up, down).
  shared_expert: the shared expert's and its gate's names in the MoE block, or None.
  """

  model_type: str
  overrides: Callable[[_Reader], dict]
  moe_prefix: str = "mlp"
  expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
  shared_expert: tuple[str, str] | None = None


ARCHITECTURES = {
  a.model_type: a
  for a in (
    Architecture("mixtral", _mixtral, moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2")),
    Architecture("olmoe", _olmoe),
    Architecture("qwen2_moe", _qwen2_moe, shared_expert=("shared_expert", "shared_expert_gate")),
    Architecture("qwen3_moe", _qwen3_moe),
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
    if f"{layer}.{prefix}.gate.weight" in weights:
      return prefix
  return "mlp"


def hf_to_moejax(weights: Mapping[str, np.ndarray], cfg, model_type: str) -> dict:
  """{moejax parameter path (tuple): array} of a transformers state dict, for a model built from `cfg`.

  cfg: the DecoderConfig the model was built with (`moejax.models.build.decoder_config`);
  model_type: the transformers architecture (a key of ARCHITECTURES).
  Raises ConfigError naming a tensor that is missing or that no moejax parameter takes.
  """
  arch = architecture({"model_type": model_type})
  used: set = set()
  out = {("embed", "embedding"): _take(weights, "model.embed_tokens.weight", used)}
  out[("final_norm", "scale")] = _take(weights, "model.norm.weight", used)
  if cfg.tie_embeddings:
    if "lm_head.weight" in weights:  # A tied state dict may list it again; it must be the embedding.
      if not np.array_equal(np.asarray(weights["lm_head.weight"]), out[("embed", "embedding")]):
        raise ConfigError("tensor lm_head.weight", "differs from model.embed_tokens.weight, but the config ties them")
      used.add("lm_head.weight")
  else:
    out[("unembed", "kernel")] = _linear(_take(weights, "lm_head.weight", used))
  for i in range(cfg.num_layers):
    layer, block = f"model.layers.{i}", ("blocks", i)
    out[(*block, "attention_norm", "scale")] = _take(weights, f"{layer}.input_layernorm.weight", used)
    out[(*block, "ffn_norm", "scale")] = _take(weights, f"{layer}.post_attention_layernorm.weight", used)
    out.update(_attention_to_moejax(weights, f"{layer}.self_attn", (*block, "attention"), cfg, used))
    ffn = (*block, "ffn")
    if cfg.is_moe_layer(i):
      prefix = _moe_prefix(weights, layer, arch)
      out[(*ffn, "router", "kernel")] = _linear(_take(weights, f"{layer}.{prefix}.gate.weight", used))
      gate, up, down = _expert_stacks(weights, layer, arch, cfg.moe.num_experts, used)
      out[(*ffn, "wi")], out[(*ffn, "wg")], out[(*ffn, "wo")] = gate, up, down
      if arch.shared_expert:
        shared, shared_gate = arch.shared_expert
        for ours, theirs in _FFN_NAMES:
          out[(*ffn, "shared", ours)] = _linear(_take(weights, f"{layer}.{prefix}.{shared}.{theirs}.weight", used))
        out[(*ffn, "shared_gate")] = _linear(_take(weights, f"{layer}.{prefix}.{shared_gate}.weight", used))
    else:
      for ours, theirs in _FFN_NAMES:
        out[(*ffn, ours)] = _linear(_take(weights, f"{layer}.mlp.{theirs}.weight", used))
  unused = sorted(set(weights) - used)
  if unused:
    raise ConfigError(f"tensor {unused[0]}", "has no place in the moejax model built from this config")
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
  return out


def load_hf_weights(model, weights: Mapping[str, np.ndarray], model_type: str) -> None:
  """Copies a transformers state dict of architecture `model_type` into a moejax DecoderLM in place.

  Raises ConfigError naming the first tensor that is missing, left over, or of the wrong shape.
  Arrays are cast to the model's parameter dtype (float32).
  """
  from flax import nnx

  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  arrays = hf_to_moejax(weights, model.cfg, model_type)
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
  from flax import nnx

  cfg = model.cfg
  arch = architecture({"model_type": model_type})
  flat = {path: np.asarray(p.get_value()) for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  out = {"model.embed_tokens.weight": flat[("embed", "embedding")], "model.norm.weight": flat[("final_norm", "scale")]}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = _linear(flat[("unembed", "kernel")])
  for i in range(cfg.num_layers):
    layer, block = f"model.layers.{i}", ("blocks", i)
    out[f"{layer}.input_layernorm.weight"] = flat[(*block, "attention_norm", "scale")]
    out[f"{layer}.post_attention_layernorm.weight"] = flat[(*block, "ffn_norm", "scale")]
    att, pre = (*block, "attention"), f"{layer}.self_attn"
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
    ffn = (*block, "ffn")
    if cfg.is_moe_layer(i):
      out[f"{layer}.mlp.gate.weight"] = _linear(flat[(*ffn, "router", "kernel")])
      gate, up, down = flat[(*ffn, "wi")], flat[(*ffn, "wg")], flat[(*ffn, "wo")]  # [E, d, f] ×2, [E, f, d]
      out[f"{layer}.mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=2).transpose(0, 2, 1)
      out[f"{layer}.mlp.experts.down_proj"] = np.ascontiguousarray(down.transpose(0, 2, 1))
      if arch.shared_expert:
        shared, shared_gate = arch.shared_expert
        for ours, theirs in _FFN_NAMES:
          out[f"{layer}.mlp.{shared}.{theirs}.weight"] = _linear(flat[(*ffn, "shared", ours)])
        out[f"{layer}.mlp.{shared_gate}.weight"] = _linear(flat[(*ffn, "shared_gate")])
    else:
      for ours, theirs in _FFN_NAMES:
        out[f"{layer}.mlp.{theirs}.weight"] = _linear(flat[(*ffn, ours)])
  return out
