"""Vision Transformer image classifier whose FFNs are dense or MoE (V-MoE, Soft MoE style).

Legend: B batch, H = W image side, C channels, p patch side, N = (H/p)² patches, T tokens
(N, or N + 1 with a class token), d model dim, K classes.

The image is cut into non-overlapping p×p patches, each flattened (row, column, channel order)
and mapped to d by one linear layer (a p-strided p×p convolution in matrix form); learned
position embeddings are added. The encoder is the decoder's pre-norm `TransformerBlock` with
non-causal attention and no rotary embedding; its norms are RMSNorm where ViT and V-MoE use
LayerNorm. MoE placement:
  * moe_every = P > 0: blocks P-1, 2P-1, ... (as the decoder; V-MoE's every-other-layer is P = 2);
  * moe_last = n > 0: the last n blocks (Soft MoE puts MoE layers in the second half);
  * both 0: the dense ViT. Setting both is refused.
Each MoE layer routes groups of `moe.group_size` tokens (0: one image's T tokens per group).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config.schema import DTYPES, POOLINGS, defaults
from moejax.layers.attention import CausalSelfAttention
from moejax.layers.ffn import fan_in_init
from moejax.layers.moe import MoEConfig, MoELayer
from moejax.models import remat, scan
from moejax.models.decoder import TransformerBlock

_MODEL = defaults("vit", "model")  # The schema's defaults (moejax/config/schema.py), stated once.


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Static shape and options of the ViT: the config's model.* fields and the images' shape.

  Built from a config and the dataset by `moejax.models.build.vit_config`.

  Attributes:
    image_size: H = W, divisible by patch_size.
    channels: C.
    patch_size: p.
    num_classes: K.
    num_layers, d_model, num_heads, d_ff, activation, init_scale, dtype, moe: as for the decoder.
    moe_every, moe_last: where the MoE FFNs go (module docstring); at most one may be > 0.
    pooling: 'gap' (mean of the final tokens) or 'cls' (a learned class token, prepended
      after the position embeddings as in big_vision, whose final state is classified).
  """

  image_size: int
  channels: int
  num_classes: int
  patch_size: int = _MODEL["patch_size"]
  num_layers: int = _MODEL["num_layers"]
  d_model: int = _MODEL["d_model"]
  num_heads: int = _MODEL["num_heads"]
  d_ff: int = _MODEL["d_ff"]
  activation: str = _MODEL["activation"]
  moe_every: int = _MODEL["moe_every"]
  moe_last: int = _MODEL["moe_last"]
  pooling: str = _MODEL["pooling"]
  init_scale: float = _MODEL["init_scale"]
  norm_eps: float = _MODEL["norm_eps"]
  dtype: str = _MODEL["dtype"]
  remat: str = _MODEL["remat"]
  scan_layers: bool = _MODEL["scan_layers"]
  moe: MoEConfig = MoEConfig()

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
    if self.moe_every > 0 and self.moe_last > 0:
      raise ValueError(f"moe_every={self.moe_every} and moe_last={self.moe_last}: set at most one")
    if not 0 <= self.moe_last <= self.num_layers:
      raise ValueError(f"moe_last={self.moe_last} is not in [0, num_layers={self.num_layers}]")
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling={self.pooling!r}; allowed: {', '.join(POOLINGS)}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r}; allowed: {', '.join(DTYPES)}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_tokens(self) -> int:
    """T, the sequence length the blocks (and the MoE groups) see."""
    return self.num_patches + (self.pooling == "cls")

  def is_moe_layer(self, index: int) -> bool:
    if self.moe_last > 0:
      return index >= self.num_layers - self.moe_last
    return self.moe_every > 0 and index % self.moe_every == self.moe_every - 1


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """<float>[B, H, W, C] -> [B, N, p·p·C]: patches in raster order, each flattened (row, col, channel)."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H/p, W/p, p, p, C]
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class ViT(nnx.Module):
  """images <float32>[B, H, W, C] -> (logits <float32>[B, K], aux of each MoE layer, in order)."""

  def __init__(self, cfg: ViTConfig, *, mesh: jax.sharding.Mesh | None = None, rngs: nnx.Rngs):
    self.cfg = cfg
    patch_dim = cfg.patch_size**2 * cfg.channels
    self.patch_embed = nnx.Linear(patch_dim, cfg.d_model, kernel_init=fan_in_init(cfg.init_scale), rngs=rngs)
    position_init = nnx.initializers.normal(0.02)
    self.position_embed = nnx.Param(position_init(rngs.params(), (cfg.num_patches, cfg.d_model)))
    # Zero-initialised, as in big_vision and vmoe.
    self.cls_token = nnx.Param(jnp.zeros((1, 1, cfg.d_model))) if cfg.pooling == "cls" else None
    # No rotary: learned position embeddings are the only position signal, as in ViT.
    self.blocks = nnx.List(
      [
        TransformerBlock(
          cfg.d_model,
          cfg.d_ff,
          cfg.activation,
          cfg.init_scale,
          attention=functools.partial(
            CausalSelfAttention, cfg.d_model, cfg.num_heads, cfg.init_scale, causal=False, norm_eps=cfg.norm_eps
          ),
          moe=cfg.moe if cfg.is_moe_layer(i) else None,
          mesh=mesh,
          rngs=rngs,
          norm_eps=cfg.norm_eps,
        )
        for i in range(cfg.num_layers)
      ]
    )
    self.final_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
    # Not zero-initialised (big_vision's head_zeroinit): a zero head would hide, at
    # initialisation, every input dependence that tests and diagnostics look at.
    self.head = nnx.Linear(cfg.d_model, cfg.num_classes, kernel_init=fan_in_init(cfg.init_scale), rngs=rngs)

  def moe_layers(self) -> list[MoELayer]:
    """The MoE layers in block order (the order of the aux list the forward pass returns)."""
    return [block.ffn for block in self.blocks if isinstance(block.ffn, MoELayer)]

  def __call__(self, images: jax.Array, *, train: bool = False, rng: jax.Array | None = None):
    """rng: key for the routers' training noise (noisy top-k, jitter, GShard's random 2nd expert).

    The hash router, given no token ids, hashes token positions: patch i always goes to the
    same experts.
    """
    dtype = jnp.dtype(self.cfg.dtype)
    patches = patchify(images.astype(jnp.float32), self.cfg.patch_size)  # [B, N, p·p·C]
    b, n, _ = patches.shape
    x = self.patch_embed(patches.reshape(b * n, -1)).reshape(b, n, -1)  # [B, N, d]; 2-D matmul (see ffn.py)
    x = x + self.position_embed[...][None]
    if self.cls_token is not None:
      cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[2]))
      x = jnp.concatenate([cls, x], axis=1)  # [B, T = N + 1, d]
    x = x.astype(dtype)
    call = remat.block_call(self.cfg.remat, train)
    x, moe_aux = scan.run_blocks(self.blocks, x, call, rng, None, scan=self.cfg.scan_layers)
    x = self.final_norm(x).astype(jnp.float32)
    pooled = x[:, 0] if self.cls_token is not None else x.mean(axis=1)  # [B, d]
    return self.head(pooled), moe_aux
