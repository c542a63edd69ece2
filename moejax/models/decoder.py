"""Decoder-only transformer language model whose FFNs are dense or MoE.

Legend: B batch, L sequence length, d model dim, V vocabulary.

Pre-norm blocks: x + Attn(Norm(x)), then x + FFN(Norm(x)). With `moe_every = P > 0`, the FFN of
every P-th block (blocks P-1, 2P-1, ...; P = 2 is Switch's every-other-layer) is an MoE layer;
`moe_every = 0` is the dense baseline.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers.attention import CausalSelfAttention
from moejax.layers.ffn import FeedForward
from moejax.layers.moe import MoEConfig, MoELayer

POSITIONS = ("rope", "learned")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Static shape and options of the decoder (field meanings as in `moejax.config`)."""

  vocab_size: int
  num_layers: int = 4
  d_model: int = 128
  num_heads: int = 4
  d_ff: int = 512
  max_len: int = 128
  positions: str = "rope"
  activation: str = "gelu"
  moe_every: int = 2
  tie_embeddings: bool = False
  init_scale: float = 1.0
  dtype: str = "float32"
  moe: MoEConfig = MoEConfig()

  def is_moe_layer(self, index: int) -> bool:
    return self.moe_every > 0 and index % self.moe_every == self.moe_every - 1


class DecoderBlock(nnx.Module):
  """Pre-norm attention + (dense or MoE) FFN block."""

  def __init__(self, cfg: DecoderConfig, use_moe: bool, mesh, *, rngs: nnx.Rngs):
    self.attention_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
    self.attention = CausalSelfAttention(cfg.d_model, cfg.num_heads, cfg.positions == "rope",
                                         cfg.init_scale, rngs=rngs)
    self.ffn_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
    if use_moe:
      self.ffn = MoELayer(cfg.d_model, cfg.moe, mesh=mesh, rngs=rngs)
    else:
      self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.init_scale, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool):
    x = x + self.attention(self.attention_norm(x))
    h = self.ffn_norm(x)
    if isinstance(self.ffn, MoELayer):
      h, aux = self.ffn(h, train=train)
    else:
      h, aux = self.ffn(h), None
    return x + h, aux


class DecoderLM(nnx.Module):
  """tokens <int32>[B, L] -> (logits <float32>[B, L, V], aux of each MoE layer, in order)."""

  def __init__(self, cfg: DecoderConfig, *, mesh: jax.sharding.Mesh | None = None, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model,
                           embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.position_embed = (nnx.Embed(cfg.max_len, cfg.d_model, embedding_init=nnx.initializers.normal(0.02),
                                     rngs=rngs) if cfg.positions == "learned" else None)
    self.blocks = nnx.List([DecoderBlock(cfg, cfg.is_moe_layer(i), mesh, rngs=rngs)
                            for i in range(cfg.num_layers)])
    self.final_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
    self.unembed = None if cfg.tie_embeddings else nnx.Linear(
        cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs,
        kernel_init=nnx.initializers.variance_scaling(cfg.init_scale, "fan_in", "truncated_normal"))

  def __call__(self, tokens: jax.Array, *, train: bool = False):
    dtype = jnp.dtype(self.cfg.dtype)
    x = self.embed(tokens)
    if self.position_embed is not None:
      x = x + self.position_embed(jnp.arange(tokens.shape[1]))[None]
    x = x.astype(dtype)
    moe_aux = []
    for block in self.blocks:
      x, aux = block(x, train=train)
      if aux is not None:
        moe_aux.append(aux)
    x = self.final_norm(x).astype(jnp.float32)
    if self.unembed is None:
      logits = self.embed.attend(x)
    else:
      logits = self.unembed(x)
    return logits, moe_aux
