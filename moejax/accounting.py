"""Parameter and FLOP accounting from a model's shapes (no weights are allocated).

Active parameters per token count each MoE layer's experts (experts per token)/E times: a token
is processed by K of the E experts under top-k routing (`experts_per_token`: each router family's
rule). Training FLOPs per token follow Kaplan et al. (2020): 6 per active matmul
parameter (forward 2, backward 4) plus 6·n_layers·L·d_attn for attention scores and values, with
no saving from the causal mask; d_attn is the width the scores and values are taken over (d for
d/N-wide heads; N·H for heads of another width; (N·(H_n + H_r) + N·H_v)/2 for latent attention,
whose query-key and value widths differ) and a sliding window of w keys caps L at w. The input embedding lookup costs no FLOPs; a tied unembedding
does. Capacity padding and dropped tokens are not counted: these are *active* FLOPs, the
quantity on which dense and MoE models are compared at "matched FLOPs".
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from moejax import routers
from moejax.layers.moe import MoEConfig
from moejax.models.decoder import DecoderConfig, DecoderLM


@dataclasses.dataclass(frozen=True)
class ModelCost:
  total_params: int
  active_params: int  # Per token.
  train_flops_per_token: float  # Active, forward + backward.
  lookup_params: int = (
    0  # Looked up, not multiplied: embedding tables (DeepSeek's, gpt-oss's active counts leave them out).
  )
  mtp_params: int = 0  # In the multi-token-prediction modules (in the totals; DeepSeek-V3's 671B leaves them out).
  mtp_active_params: int = 0  # Of those, active per token.

  def summary(self) -> str:
    return (
      f"parameters: {self.total_params:,} total, {self.active_params:,} active per token; "
      f"training FLOPs per token (active): {self.train_flops_per_token:.4g}"
    )


def _num_params(module: nnx.Module, min_ndim: int = 0) -> int:
  """Parameters of `module` held in arrays of at least min_ndim dimensions."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)) if x.ndim >= min_ndim)


def _expert_params(layer) -> int:
  """The routed experts' parameters of an MoE layer: their matrices and biases (not router, not shared)."""
  arrays = (layer.wi, layer.wg, layer.wo, layer.bi, layer.bg, layer.bo)
  return sum(p.size for p in arrays if p is not None)


def experts_per_token(cfg: MoEConfig, group_size: int) -> float:
  """How many experts process one token on average (what makes expert parameters "active").

  The router family's rule: top-k / DeepSeek K; hash 1; dense-gated E; expert choice cf (E·C =
  S·cf slots shared by S tokens); soft MoE E·p slots of mixed tokens per S tokens.
  """
  return routers.get(cfg.router).experts_per_token(cfg, group_size)


def model_cost(
  make_model,
  *,
  moe_cfg: MoEConfig,
  group_size: int,
  num_layers: int,
  seq_len: int,
  attention_width: float,
  lookup_params=lambda model: 0,
  extra_matmul: int = 0,
  mtp_modules=lambda model: (),
) -> ModelCost:
  """Counts parameters and FLOPs of the model `make_model()` builds, from `nnx.eval_shape`.

  Args:
    make_model: () -> a model exposing `moe_layers()`.
    lookup_params: model -> how many parameters are looked up or added, not multiplied
      (embedding tables, position embeddings, a class token).
    extra_matmul: matmul parameters used but not held (a tied unembedding).
    mtp_modules: model -> its multi-token-prediction modules (counted, and reported apart).
  """
  model = nnx.eval_shape(make_model)
  total = _num_params(model)
  expert = sum(_expert_params(layer) for layer in model.moe_layers())
  share = min(1.0, experts_per_token(moe_cfg, group_size) / moe_cfg.num_experts)
  inactive = expert * (1.0 - share)
  mtp = list(mtp_modules(model))
  mtp_total = sum(_num_params(m) for m in mtp)
  mtp_expert = sum(_expert_params(m.block.ffn) for m in mtp if hasattr(m.block.ffn, "router"))
  # Matmul weights: every array of >= 2 dims but the lookups; norm scales are vectors.
  lookup = lookup_params(model)
  matmul_active = _num_params(model, min_ndim=2) - lookup - inactive + extra_matmul
  attention = num_layers * seq_len * attention_width
  return ModelCost(
    int(total),
    int(round(total - inactive)),
    6.0 * (matmul_active + attention),
    int(lookup),
    int(mtp_total),
    int(round(mtp_total - mtp_expert * (1.0 - share))),
  )


class _ShapesOnly:
  """Random keys for a model built under eval_shape, where only shapes count: every stream, one key.

  nnx.Rngs would do, but each draw updates its counter through the trace, and each such update
  inspects the whole trace so far: building Qwen3-235B's 94 blocks took 22 s that way, 0.9 s this way.
  """

  def __getattr__(self, stream: str):
    return lambda: jax.random.key(0)


def decoder_cost(cfg: DecoderConfig) -> ModelCost:
  """Parameters and FLOPs of a DecoderLM (abstract arrays only)."""
  return model_cost(
    lambda: DecoderLM(cfg, rngs=_ShapesOnly()),
    moe_cfg=cfg.moe,
    group_size=cfg.moe.group_size or cfg.max_len,
    num_layers=cfg.num_layers,
    seq_len=cfg.max_len,
    attention_width=cfg.attention_width(),
    lookup_params=lambda m: (
      _num_params(m.embed) + (_num_params(m.position_embed) if m.position_embed is not None else 0)
    ),
    extra_matmul=cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0,
    mtp_modules=lambda m: m.mtp or (),
  )


def vit_cost(cfg) -> ModelCost:
  """Parameters and FLOPs per image token of a ViT (abstract arrays only)."""
  from moejax.models.vit import ViT  # Local: accounting does not need the ViT otherwise.

  return model_cost(
    lambda: ViT(cfg, rngs=_ShapesOnly()),
    moe_cfg=cfg.moe,
    group_size=cfg.moe.group_size or cfg.num_tokens,
    num_layers=cfg.num_layers,
    seq_len=cfg.num_tokens,
    attention_width=cfg.d_model,
    lookup_params=lambda m: m.position_embed.size + (m.cls_token.size if m.cls_token is not None else 0),
  )
