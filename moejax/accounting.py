"""Parameter and FLOP accounting from a model's shapes (no weights are allocated).

Active parameters per token count each MoE layer's experts K/E times: a token is processed by
K of the E experts. Training FLOPs per token follow Kaplan et al. (2020): 6 per active matmul
parameter (forward 2, backward 4) plus 6·n_layers·L·d for attention scores and values, with no
saving from the causal mask. The input embedding lookup costs no FLOPs; a tied unembedding
does. Capacity padding and dropped tokens are not counted: these are *active* FLOPs, the
quantity on which dense and MoE models are compared at "matched FLOPs".
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from moejax.layers.moe import MoELayer
from moejax.models.decoder import DecoderConfig, DecoderLM


@dataclasses.dataclass(frozen=True)
class ModelCost:
  total_params: int
  active_params: int  # Per token.
  train_flops_per_token: float  # Active, forward + backward.

  def summary(self) -> str:
    return (f"parameters: {self.total_params:,} total, {self.active_params:,} active per token; "
            f"training FLOPs per token (active): {self.train_flops_per_token:.4g}")


def _num_params(module: nnx.Module, min_ndim: int = 0) -> int:
  """Parameters of `module` held in arrays of at least min_ndim dimensions."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)) if x.ndim >= min_ndim)


def decoder_cost(cfg: DecoderConfig) -> ModelCost:
  """Counts parameters and FLOPs of a DecoderLM from `nnx.eval_shape` (abstract arrays only)."""
  model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  total = _num_params(model)
  expert = sum(_num_params(m, min_ndim=3) for _, m in nnx.iter_graph(model) if isinstance(m, MoELayer))
  inactive = expert * (1.0 - cfg.moe.top_k / cfg.moe.num_experts)
  # Matmul weights: every matrix but the embedding tables (a lookup); norm scales are vectors.
  lookup = _num_params(model.embed) + (_num_params(model.position_embed) if model.position_embed else 0)
  matmul_active = _num_params(model, min_ndim=2) - lookup - inactive
  if cfg.tie_embeddings:
    matmul_active += cfg.vocab_size * cfg.d_model  # The table is also the unembedding matmul.
  attention = cfg.num_layers * cfg.max_len * cfg.d_model
  return ModelCost(int(total), int(round(total - inactive)), 6.0 * (matmul_active + attention))
