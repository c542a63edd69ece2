"""Multi-head latent attention (MLA; DeepSeek-V2, Liu et al. 2024, §2.1; DeepSeek-V3).

Legend: B batch, L query length, T key length, d model dim, N heads, r_q query rank, r kv rank,
H_n per-head dims without position (qk_nope_head_dim), H_r rotary dims (qk_rope_head_dim), H_v
value dims (v_head_dim).

Keys and values of all heads come from one latent per token, c = RMSNorm(x·W_dkv) [r]; each
head's key is [c·W_uk (H_n), k_rope (H_r)], its value c·W_uv (H_v), where k_rope = RoPE(x·W_kr)
is one rotary key that every head shares (the "decoupled" RoPE: a position-dependent rotation
could not be absorbed into W_uk). Queries likewise, from their own latent when q_lora_rank > 0
(V2, V3) or straight from x (V2-Lite): q = [q_nope (H_n), RoPE(q_rope) (H_r)] per head. The
softmax scale is (H_n + H_r)^-1/2 × YaRN's mscale² (`Rope.softmax_scale_factor`).

The decoding cache is the latent and the rotary key, r + H_r numbers per token and layer
(DeepSeek-V2: 512 + 64, against 2·128·128 for its 128 heads of multi-head attention):
`latent_cache` computes them, `attend_latent` attends from them with the up-projections
absorbed, W_uk into the queries (q_nope·W_ukᵀ scores against c directly) and W_uv into the
output (the weighted sum of c goes through W_uv·W_o). Both give the naive form's output
(tests/test_mla.py); KV-cache decoding itself is issue #15's.

Weights: wq [d, N, H_n + H_r] or wq_a [d, r_q], q_norm, wq_b [r_q, N, H_n + H_r]; wkv_a
[d, r + H_r] (transformers' kv_a_proj_with_mqa: the latent then the rotary key), kv_norm,
wkv_b [r, N, H_n + H_v] (each head's W_uk then W_uv), wo [N·H_v, d]. The latent norms use
epsilon 1e-6, as DeepSeek's released code does whatever rms_norm_eps says.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers.attention import decode_positions, dot_attention, write_cache
from moejax.layers.ffn import fan_in_init
from moejax.layers.rope import Rope, apply_rope
from moejax.parallel import param

LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nnx.Module):
  """[B, L, d] -> [B, L, d], causal; see the module docstring for the shapes and the cache."""

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    init_scale: float,
    *,
    q_lora_rank: int,
    kv_lora_rank: int,
    qk_nope_head_dim: int,
    qk_rope_head_dim: int,
    v_head_dim: int,
    rope: Rope,
    rngs: nnx.Rngs,
  ):
    if qk_rope_head_dim % 2:
      raise ValueError(f"qk_rope_head_dim={qk_rope_head_dim} must be even (RoPE turns pairs of dims)")
    init = fan_in_init(init_scale)
    self.num_heads, self.rope = num_heads, rope
    self.nope_dim, self.rope_dim, self.v_dim, self.kv_rank = (
      qk_nope_head_dim,
      qk_rope_head_dim,
      v_head_dim,
      kv_lora_rank,
    )
    qk_dim = qk_nope_head_dim + qk_rope_head_dim
    if q_lora_rank:
      self.wq = None
      self.wq_a = nnx.Param(init(rngs.params(), (d_model, q_lora_rank)))
      self.q_norm = nnx.RMSNorm(q_lora_rank, epsilon=LATENT_NORM_EPS, rngs=rngs)
      # The up-projections and the output, per head, named 'heads' (split over 'model' with tensor
      # parallelism); the latent down-projections are replicated.
      wq_b = init(rngs.params(), (q_lora_rank, num_heads * qk_dim)).reshape(q_lora_rank, num_heads, qk_dim)
      self.wq_b = param(wq_b, None, "heads", None)
    else:
      wq = init(rngs.params(), (d_model, num_heads * qk_dim)).reshape(d_model, num_heads, qk_dim)
      self.wq = param(wq, None, "heads", None)
      self.wq_a = self.q_norm = self.wq_b = None
    self.wkv_a = nnx.Param(init(rngs.params(), (d_model, kv_lora_rank + qk_rope_head_dim)))
    self.kv_norm = nnx.RMSNorm(kv_lora_rank, epsilon=LATENT_NORM_EPS, rngs=rngs)
    kv_dim = qk_nope_head_dim + v_head_dim
    wkv_b = init(rngs.params(), (kv_lora_rank, num_heads * kv_dim)).reshape(kv_lora_rank, num_heads, kv_dim)
    self.wkv_b = param(wkv_b, None, "heads", None)
    self.wo = param(init(rngs.params(), (num_heads * v_head_dim, d_model)), "heads", None)

  @property
  def scale(self) -> float:
    return (self.nope_dim + self.rope_dim) ** -0.5 * self.rope.softmax_scale_factor

  def queries(self, x: jax.Array, positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(q_nope [B, L, N, H_n], rotated q_rope [B, L, N, H_r]) of x [B, L, d]."""
    dtype = x.dtype
    if self.wq is not None:
      q = jnp.einsum("bld,dnh->blnh", x, self.wq[...].astype(dtype))
    else:
      # The norms' float32 scales would promote a bfloat16 stream: their outputs keep x's dtype.
      q_latent = self.q_norm(x @ self.wq_a[...].astype(dtype)).astype(dtype)  # [B, L, r_q]
      q = jnp.einsum("blr,rnh->blnh", q_latent, self.wq_b[...].astype(dtype))
    return q[..., : self.nope_dim], apply_rope(q[..., self.nope_dim :], self.rope, positions)

  def latent_cache(self, x: jax.Array, positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """What a decoding cache holds per token: (latent c [B, L, r], rotated shared key k_rope [B, L, H_r])."""
    compressed = x @ self.wkv_a[...].astype(x.dtype)  # [B, L, r + H_r]
    latent = self.kv_norm(compressed[..., : self.kv_rank]).astype(x.dtype)
    k_rope = apply_rope(compressed[..., None, self.kv_rank :], self.rope, positions)[:, :, 0]
    return latent, k_rope

  def __call__(self, x: jax.Array) -> jax.Array:
    """The naive form: every head's keys and values materialised from the latent."""
    b, l, _ = x.shape
    q_nope, q_rope = self.queries(x)
    latent, k_rope = self.latent_cache(x)
    kv = jnp.einsum("blr,rnh->blnh", latent, self.wkv_b[...].astype(x.dtype))  # [B, L, N, H_n + H_v]
    k_nope, v = kv[..., : self.nope_dim], kv[..., self.nope_dim :]
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (b, l, self.num_heads, self.rope_dim))], -1)
    out = dot_attention(q, k, v, scale=self.scale)  # [B, L, N, H_v]
    return out.reshape(b, l, -1) @ self.wo[...].astype(x.dtype)

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    """An empty decoding cache: {'latent' [B, max_len, r], 'k_rope' [B, max_len, H_r]} (MLA's compressed cache)."""
    return {
      "latent": jnp.zeros((batch, max_len, self.kv_rank), dtype),
      "k_rope": jnp.zeros((batch, max_len, self.rope_dim), dtype),
    }

  def decode(self, x: jax.Array, cache: dict, start: jax.Array) -> tuple[jax.Array, dict]:
    """x [B, L, d], row b's tokens at positions start[b] .. start[b] + L - 1 (start: [B] or one offset):
    writes their latents into the cache and attends with the absorbed projections (`attend_latent`);
    the same function as `__call__` on the whole sequence (`CausalSelfAttention.decode`'s cache rules)."""
    positions = decode_positions(start, x.shape[0], x.shape[1])  # [B, L]
    latent, k_rope = self.latent_cache(x, positions)
    cache = {
      "latent": write_cache(cache["latent"], latent, positions),
      "k_rope": write_cache(cache["k_rope"], k_rope, positions),
    }
    dtype = x.dtype
    return self.attend_latent(x, cache["latent"].astype(dtype), cache["k_rope"].astype(dtype), positions), cache

  def attend_latent(
    self, x: jax.Array, latent: jax.Array, k_rope: jax.Array, q_positions: jax.Array | None = None
  ) -> jax.Array:
    """x [B, L, d] attending to a cache (latent [B, T, r], k_rope [B, T, H_r]) with absorbed projections.

    q_positions <int32>[L] or [B, L]: the queries' positions (default T - L .. T - 1); key j is visible to a
    query at position p when j <= p. Equals `__call__` when the cache is `latent_cache(x)`.
    """
    l = x.shape[1]
    if q_positions is None:
      q_positions = jnp.arange(latent.shape[1] - l, latent.shape[1])
    q_nope, q_rope = self.queries(x, q_positions)
    wkv_b = self.wkv_b[...].astype(x.dtype)
    w_uk, w_uv = wkv_b[..., : self.nope_dim], wkv_b[..., self.nope_dim :]  # [r, N, H_n], [r, N, H_v]
    q_latent = jnp.einsum("blnh,rnh->blnr", q_nope, w_uk)  # W_uk absorbed into the queries.
    # One "head" of dim r + H_r shared by all N query heads: multi-query attention on the cache.
    q = jnp.concatenate([q_latent, q_rope], axis=-1)  # [B, L, N, r + H_r]
    k = jnp.concatenate([latent, k_rope], axis=-1)[:, :, None]  # [B, T, 1, r + H_r]
    out_latent = dot_attention(q, k, latent[:, :, None], scale=self.scale, q_positions=q_positions)  # [B, L, N, r]
    wo = self.wo[...].astype(x.dtype).reshape(self.num_heads, self.v_dim, -1)  # [N, H_v, d]
    w_out = jnp.einsum("rnv,nvd->nrd", w_uv, wo)  # W_uv absorbed into the output projection: [N, r, d]
    return jnp.einsum("blnr,nrd->bld", out_latent, w_out)
