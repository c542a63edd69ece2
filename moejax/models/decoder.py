"""Decoder-only transformer language model whose FFNs are dense or MoE.

Legend: B batch, L sequence length, d model dim, V vocabulary.

Pre-norm blocks: x + Attn(Norm(x)), then x + FFN(Norm(x)). With `moe_every = P > 0`, the FFN of
every P-th block (blocks P-1, 2P-1, ...; P = 2 is Switch's every-other-layer) is an MoE layer,
but for the blocks listed in `dense_layers`; `moe_every = 0` is the dense baseline. This is the
architecture of Mixtral, OLMoE and Qwen2/3-MoE (`moejax.convert.hf` maps their weights).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config.schema import DTYPES, POSITIONS, defaults, moe_layer_indices
from moejax.layers.attention import CausalSelfAttention
from moejax.layers.ffn import FeedForward
from moejax.layers.moe import MoEConfig, MoELayer

_MODEL = defaults("lm", "model")  # The schema's defaults (moejax/config/schema.py), stated once.


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Static shape and options of the decoder: the config's model.* fields (meanings in moejax/config/schema.py).

  Built from a config by `moejax.models.build.decoder_config`; max_len is train.seq_len.
  """

  vocab_size: int
  num_layers: int = _MODEL["num_layers"]
  d_model: int = _MODEL["d_model"]
  num_heads: int = _MODEL["num_heads"]
  num_kv_heads: int = _MODEL["num_kv_heads"]
  head_dim: int = _MODEL["head_dim"]
  qk_norm: bool = _MODEL["qk_norm"]
  qk_norm_scope: str = _MODEL["qk_norm_scope"]
  attention_bias: str = _MODEL["attention_bias"]
  rope_theta: float = _MODEL["rope_theta"]
  norm_eps: float = _MODEL["norm_eps"]
  d_ff: int = _MODEL["d_ff"]
  max_len: int = defaults("lm", "train")["seq_len"]
  positions: str = _MODEL["positions"]
  activation: str = _MODEL["activation"]
  moe_every: int = _MODEL["moe_every"]
  dense_layers: tuple = _MODEL["dense_layers"]
  tie_embeddings: bool = _MODEL["tie_embeddings"]
  init_scale: float = _MODEL["init_scale"]
  dtype: str = _MODEL["dtype"]
  moe: MoEConfig = MoEConfig()

  def __post_init__(self):
    object.__setattr__(self, "dense_layers", tuple(self.dense_layers))  # Hashable: the config is static.

  def is_moe_layer(self, index: int) -> bool:
    return index in moe_layer_indices(self)


class TransformerBlock(nnx.Module):
  """Pre-norm block [B, L, d] -> ([B, L, d], aux of its MoE layer or None).

  x + Attn(Norm(x)), then x + FFN(Norm(x)); the FFN is an MoE layer when `moe` is given, else
  dense with hidden size d_ff. Shared with the ViT (`moejax.models.vit`), which is not causal.
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    d_ff: int,
    activation: str,
    init_scale: float,
    *,
    moe: MoEConfig | None,
    rotary: bool,
    causal: bool,
    mesh,
    rngs: nnx.Rngs,
    norm_eps: float = 1e-6,
    **attention,
  ):
    """attention: CausalSelfAttention's options (num_kv_heads, head_dim, qk_norm, bias, rope_theta, ...)."""
    self.attention_norm = nnx.RMSNorm(d_model, epsilon=norm_eps, rngs=rngs)
    self.attention = CausalSelfAttention(
      d_model, num_heads, rotary, init_scale, causal=causal, norm_eps=norm_eps, rngs=rngs, **attention
    )
    self.ffn_norm = nnx.RMSNorm(d_model, epsilon=norm_eps, rngs=rngs)
    if moe is not None:
      self.ffn = MoELayer(d_model, moe, mesh=mesh, rngs=rngs)
    else:
      self.ffn = FeedForward(d_model, d_ff, activation, init_scale, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, rng: jax.Array | None = None, token_ids: jax.Array | None = None):
    """rng: training noise of the router; token_ids: for the hash router."""
    x = x + self.attention(self.attention_norm(x))
    h = self.ffn_norm(x)
    if isinstance(self.ffn, MoELayer):
      h, aux = self.ffn(h, train=train, rng=rng, token_ids=token_ids)
    else:
      h, aux = self.ffn(h), None
    return x + h, aux


class DecoderLM(nnx.Module):
  """tokens <int32>[B, L] -> (logits <float32>[B, L, V], aux of each MoE layer, in order)."""

  def __init__(self, cfg: DecoderConfig, *, mesh: jax.sharding.Mesh | None = None, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.position_embed = (
      nnx.Embed(cfg.max_len, cfg.d_model, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
      if cfg.positions == "learned"
      else None
    )
    self.blocks = nnx.List(
      [
        TransformerBlock(
          cfg.d_model,
          cfg.num_heads,
          cfg.d_ff,
          cfg.activation,
          cfg.init_scale,
          moe=cfg.moe if cfg.is_moe_layer(i) else None,
          rotary=cfg.positions == "rope",
          causal=True,
          mesh=mesh,
          rngs=rngs,
          norm_eps=cfg.norm_eps,
          num_kv_heads=cfg.num_kv_heads,
          head_dim=cfg.head_dim,
          qk_norm=cfg.qk_norm,
          qk_norm_scope=cfg.qk_norm_scope,
          bias=cfg.attention_bias,
          rope_theta=cfg.rope_theta,
        )
        for i in range(cfg.num_layers)
      ]
    )
    self.final_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
    self.unembed = (
      None
      if cfg.tie_embeddings
      else nnx.Linear(
        cfg.d_model,
        cfg.vocab_size,
        use_bias=False,
        rngs=rngs,
        kernel_init=nnx.initializers.variance_scaling(cfg.init_scale, "fan_in", "truncated_normal"),
      )
    )

  def moe_layers(self) -> list[MoELayer]:
    """The MoE layers in block order (the order of the aux list the forward pass returns)."""
    return [block.ffn for block in self.blocks if isinstance(block.ffn, MoELayer)]

  def __call__(self, tokens: jax.Array, *, train: bool = False, rng: jax.Array | None = None):
    """rng: key for the routers' training noise (noisy top-k, jitter, GShard's random 2nd expert)."""
    dtype = jnp.dtype(self.cfg.dtype)
    x = self.embed(tokens)
    if self.position_embed is not None:
      x = x + self.position_embed(jnp.arange(tokens.shape[1]))[None]
    x = x.astype(dtype)
    moe_aux = []
    for i, block in enumerate(self.blocks):
      x, aux = block(x, train=train, rng=None if rng is None else jax.random.fold_in(rng, i), token_ids=tokens)
      if aux is not None:
        moe_aux.append(aux)
    x = self.final_norm(x).astype(jnp.float32)
    # On the flattened [B·L, d] tokens: XLA:CPU runs the weight gradient of a 3-D matmul with
    # extra transposes and copies (issue #11; the same holds for the FFNs and projections).
    b, l, d = x.shape
    flat = x.reshape(b * l, d)
    logits = (self.embed.attend(flat) if self.unembed is None else self.unembed(flat)).reshape(b, l, -1)
    return logits, moe_aux
