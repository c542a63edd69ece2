"""Multi-head self-attention, causal (decoder) or not (ViT), with rotary or no position encoding.

Legend: B batch, L sequence length, N heads, H head dim, d model dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config.schema import ATTENTION_BIASES, QK_NORM_SCOPES
from moejax.layers.ffn import fan_in_init


def rotary_embedding(x: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotate the halves of each head by position-dependent angles (RoPE, Su et al.).

  Pair (i, i + H/2) of position t turns by t·base^(-2i/H), as transformers' `rotate_half`
  (not interleaved pairs (2i, 2i+1) as in the paper and Meta's reference code).

  Args:
    x: [B, L, N, H] queries or keys, H even.
    base: transformers' rope_theta (10000 in the paper; Mixtral, Qwen2/3-MoE 1e6).
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
  """[B, L, d] -> [B, L, d]; position i attends to positions <= i, or to all L with causal=False.

  num_kv_heads < num_heads is grouped-query attention (Mixtral, Qwen3: each key/value head
  serves num_heads / num_kv_heads query heads); head_dim defaults to d / num_heads. qk_norm
  RMS-normalises queries and keys before RoPE: with qk_norm_scope 'per_head' each head, with one
  [H] weight shared by the heads (Qwen3); with 'projection' the whole [N·H] query and [N_kv·H]
  key projections, a weight per channel (OLMoE). bias: 'qkv' adds biases to the query, key and
  value projections (Qwen2-MoE), 'qkvo' to the output projection too. rope_theta: the RoPE base.
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    rotary: bool,
    init_scale: float,
    *,
    causal: bool = True,
    num_kv_heads: int = 0,
    head_dim: int = 0,
    qk_norm: bool = False,
    qk_norm_scope: str = "per_head",
    bias: str = "none",
    rope_theta: float = 10000.0,
    norm_eps: float = 1e-6,
    rngs: nnx.Rngs,
  ):
    init = fan_in_init(init_scale)
    self.num_heads = num_heads
    self.rotary = rotary
    self.rope_theta = rope_theta
    self.causal = causal
    head_dim = head_dim or d_model // num_heads
    kv_heads = num_kv_heads or num_heads
    if num_heads % kv_heads:
      raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={kv_heads}")
    if qk_norm_scope not in QK_NORM_SCOPES:
      raise ValueError(f"qk_norm_scope={qk_norm_scope!r}; allowed: {', '.join(QK_NORM_SCOPES)}")
    if bias not in ATTENTION_BIASES:
      raise ValueError(f"bias={bias!r}; allowed: {', '.join(ATTENTION_BIASES)}")
    zeros = nnx.initializers.zeros_init()
    if kv_heads == num_heads:
      # Initialised as one [d, 3·N·H] matrix so that fan-in is d, then split into (q|k|v, head, dim).
      wqkv = init(rngs.params(), (d_model, 3 * num_heads * head_dim))
      self.wqkv = nnx.Param(wqkv.reshape(d_model, 3, num_heads, head_dim))
      self.wq = self.wkv = None
      self.bqkv = nnx.Param(zeros(rngs.params(), (3, num_heads, head_dim))) if bias != "none" else None
      self.bq = self.bkv = None
    else:
      self.wqkv = self.bqkv = None
      self.wq = nnx.Param(init(rngs.params(), (d_model, num_heads * head_dim)).reshape(d_model, num_heads, head_dim))
      self.wkv = nnx.Param(
        init(rngs.params(), (d_model, 2 * kv_heads * head_dim)).reshape(d_model, 2, kv_heads, head_dim)
      )
      has_bias = bias != "none"
      self.bq = nnx.Param(zeros(rngs.params(), (num_heads, head_dim))) if has_bias else None
      self.bkv = nnx.Param(zeros(rngs.params(), (2, kv_heads, head_dim))) if has_bias else None
    self.qk_norm_scope = qk_norm_scope
    q_size, k_size = (
      (head_dim, head_dim) if qk_norm_scope == "per_head" else (num_heads * head_dim, kv_heads * head_dim)
    )
    self.q_norm = nnx.RMSNorm(q_size, epsilon=norm_eps, rngs=rngs) if qk_norm else None
    self.k_norm = nnx.RMSNorm(k_size, epsilon=norm_eps, rngs=rngs) if qk_norm else None
    self.wo = nnx.Param(init(rngs.params(), (num_heads * head_dim, d_model)))
    self.bo = nnx.Param(zeros(rngs.params(), (d_model,))) if bias == "qkvo" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    b, l, d = x.shape
    # The projections are 2-D matmuls on the flattened tokens: XLA:CPU forms the weight gradients of
    # [B, L, d] einsums with extra transposes and copies (issue #11, point 9). The attention's own
    # head-major layout hides most of that cost, so the layer gains less than the dense FFN.
    tokens = x.reshape(b * l, d)  # [B·L, d]
    if self.wqkv is not None:
      wqkv = self.wqkv[...]  # [d, 3, N, H]
      qkv = _project(tokens, wqkv, self.bqkv).reshape(b, l, *wqkv.shape[1:])  # [B, L, 3, N, H]
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, N, H] each
    else:
      wq, wkv = self.wq[...], self.wkv[...]  # [d, N, H], [d, 2, N_kv, H]
      q = _project(tokens, wq, self.bq).reshape(b, l, *wq.shape[1:])  # [B, L, N, H]
      kv = _project(tokens, wkv, self.bkv).reshape(b, l, *wkv.shape[1:])  # [B, L, 2, N_kv, H]
      k, v = kv[:, :, 0], kv[:, :, 1]  # [B, L, N_kv, H] each
    if self.q_norm is not None:
      if self.qk_norm_scope == "per_head":
        q, k = self.q_norm(q), self.k_norm(k)
      else:  # Over all heads of the projection at once: [B, L, N·H].
        q = self.q_norm(q.reshape(b, l, -1)).reshape(q.shape)
        k = self.k_norm(k.reshape(b, l, -1)).reshape(k.shape)
    if self.rotary:
      q, k = rotary_embedding(q, self.rope_theta), rotary_embedding(k, self.rope_theta)
    # Grouped-query attention: query head n reads key/value head n // (N / N_kv).
    out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)  # [B, L, N, H]
    return _project(out.reshape(b * l, -1), self.wo[...], self.bo).reshape(b, l, -1)


def _project(tokens: jax.Array, w: jax.Array, bias: nnx.Param | None = None) -> jax.Array:
  """[T, d] @ w [d, ...] (+ bias [...]) -> [T, prod(...)], w viewed as one [d, prod(...)] matrix."""
  out = tokens @ w.reshape(w.shape[0], -1).astype(tokens.dtype)
  return out if bias is None else out + bias[...].reshape(-1).astype(tokens.dtype)
