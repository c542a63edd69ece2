"""Multi-head self-attention, causal (decoder) or not (ViT), with rotary or no position encoding.

Legend: B batch, L sequence length, N heads, H head dim, d model dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers.ffn import fan_in_init


def rotary_embedding(x: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotate the halves of each head by position-dependent angles (RoPE, Su et al.).

  Args:
    x: [B, L, N, H] queries or keys, H even.
  """
  _, length, _, head_dim = x.shape
  half = head_dim // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # [L, H/2]
  sin, cos = jnp.sin(angle)[None, :, None, :], jnp.cos(angle)[None, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class CausalSelfAttention(nnx.Module):
  """[B, L, d] -> [B, L, d]; position i attends to positions <= i, or to all L with causal=False."""

  def __init__(self, d_model: int, num_heads: int, rotary: bool, init_scale: float, *,
               causal: bool = True, rngs: nnx.Rngs):
    init = fan_in_init(init_scale)
    self.num_heads = num_heads
    self.rotary = rotary
    self.causal = causal
    head_dim = d_model // num_heads
    # Initialised as one [d, 3·d] matrix so that fan-in is d, then split into (q|k|v, head, dim).
    wqkv = init(rngs.params(), (d_model, 3 * num_heads * head_dim))
    self.wqkv = nnx.Param(wqkv.reshape(d_model, 3, num_heads, head_dim))
    self.wo = nnx.Param(init(rngs.params(), (num_heads * head_dim, d_model)))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, l, _ = x.shape
    qkv = jnp.einsum("bld,dtnh->tblnh", x, self.wqkv[...].astype(x.dtype))
    q, k, v = qkv[0], qkv[1], qkv[2]  # [B, L, N, H] each
    if self.rotary:
      q, k = rotary_embedding(q), rotary_embedding(k)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)  # [B, L, N, H]
    return out.reshape(b, l, -1) @ self.wo[...].astype(x.dtype)
