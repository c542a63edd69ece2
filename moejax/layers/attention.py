"""Multi-head self-attention, causal (decoder) or not (ViT), with rotary or no position encoding.

Legend: B batch, L sequence length, N heads, H head dim, d model dim.

`CausalSelfAttention` is multi-head and grouped-query attention with the options of the released
models (QK-norm, biases, sliding windows, attention sinks); `moejax.layers.mla` is DeepSeek's
multi-head latent attention. `dot_attention` is the softmax attention both use where
`jax.nn.dot_product_attention` does not reach (sinks, value dims unlike the key dims).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config.schema import ATTENTION_BIASES, QK_NORM_SCOPES
from moejax.layers.ffn import fan_in_init
from moejax.layers.rope import Rope, apply_rope
from moejax.parallel import param


class CausalSelfAttention(nnx.Module):
  """[B, L, d] -> [B, L, d]; position i attends to positions <= i, or to all L with causal=False.

  num_kv_heads < num_heads is grouped-query attention (Mixtral, Qwen3: each key/value head
  serves num_heads / num_kv_heads query heads); head_dim defaults to d / num_heads. qk_norm
  RMS-normalises queries and keys before RoPE: with qk_norm_scope 'per_head' each head, with one
  [H] weight shared by the heads (Qwen3); with 'projection' the whole [N·H] query and [N_kv·H]
  key projections, a weight per channel (OLMoE). bias: 'qkv' adds biases to the query, key and
  value projections (Qwen2-MoE), 'qkvo' to the output projection too. rope: the rotary
  embedding (`moejax.layers.rope`), None for none. window > 0: each query sees only itself and
  the window - 1 keys before it (sliding-window attention). sinks: a learned logit per query head
  joins each softmax (gpt-oss), zero-initialised. clip_qkv > 0: the q, k and v projections
  (after their biases) clamped to [-clip_qkv, clip_qkv] (DBRX). softcap > 0: the scaled attention
  logits s become softcap·tanh(s / softcap) before the softmax (Grok-1, 30).
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    init_scale: float,
    *,
    rope: Rope | None = None,
    causal: bool = True,
    num_kv_heads: int = 0,
    head_dim: int = 0,
    qk_norm: bool = False,
    qk_norm_scope: str = "per_head",
    bias: str = "none",
    norm_eps: float = 1e-6,
    window: int = 0,
    sinks: bool = False,
    clip_qkv: float = 0.0,
    softcap: float = 0.0,
    rngs: nnx.Rngs,
  ):
    init = fan_in_init(init_scale)
    self.num_heads = num_heads
    self.rope, self.causal, self.window, self.clip_qkv, self.softcap = rope, causal, window, clip_qkv, softcap
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
      # Heads named 'heads': split over 'model' with tensor parallelism (moejax.parallel).
      self.wqkv = param(wqkv.reshape(d_model, 3, num_heads, head_dim), None, None, "heads", None)
      self.wq = self.wkv = None
      self.bqkv = param(zeros(rngs.params(), (3, num_heads, head_dim)), None, "heads", None) if bias != "none" else None
      self.bq = self.bkv = None
    else:
      self.wqkv = self.bqkv = None
      wq = init(rngs.params(), (d_model, num_heads * head_dim)).reshape(d_model, num_heads, head_dim)
      self.wq = param(wq, None, "heads", None)
      wkv = init(rngs.params(), (d_model, 2 * kv_heads * head_dim)).reshape(d_model, 2, kv_heads, head_dim)
      self.wkv = param(wkv, None, None, "kv_heads", None)
      has_bias = bias != "none"
      self.bq = param(zeros(rngs.params(), (num_heads, head_dim)), "heads", None) if has_bias else None
      self.bkv = param(zeros(rngs.params(), (2, kv_heads, head_dim)), None, "kv_heads", None) if has_bias else None
    self.qk_norm_scope = qk_norm_scope
    q_size, k_size = (
      (head_dim, head_dim) if qk_norm_scope == "per_head" else (num_heads * head_dim, kv_heads * head_dim)
    )
    self.q_norm = nnx.RMSNorm(q_size, epsilon=norm_eps, rngs=rngs) if qk_norm else None
    self.k_norm = nnx.RMSNorm(k_size, epsilon=norm_eps, rngs=rngs) if qk_norm else None
    self.wo = param(init(rngs.params(), (num_heads * head_dim, d_model)), "heads", None)  # [N·H, d], head-major
    self.bo = nnx.Param(zeros(rngs.params(), (d_model,))) if bias == "qkvo" else None
    self.sinks = param(zeros(rngs.params(), (num_heads,)), "heads") if sinks else None

  def _qkv(self, x: jax.Array, positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, L, N, H], k, v [B, L, N_kv, H] of x [B, L, d]: projected, clipped, normalised, rotated.

    positions <int32>[L]: the tokens' positions for RoPE (default 0..L-1; decoding passes its offsets).
    """
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
    if self.clip_qkv:
      q, k, v = (jnp.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
    if self.q_norm is not None:
      # In the stream's dtype: the norms' float32 scales would promote bfloat16 queries and keys.
      if self.qk_norm_scope == "per_head":
        q, k = self.q_norm(q).astype(v.dtype), self.k_norm(k).astype(v.dtype)
      else:  # Over all heads of the projection at once: [B, L, N·H].
        q = self.q_norm(q.reshape(b, l, -1)).reshape(q.shape).astype(v.dtype)
        k = self.k_norm(k.reshape(b, l, -1)).reshape(k.shape).astype(v.dtype)
    if self.rope is not None:
      q, k = apply_rope(q, self.rope, positions), apply_rope(k, self.rope, positions)
    return q, k, v

  def __call__(self, x: jax.Array) -> jax.Array:
    b, l, _ = x.shape
    q, k, v = self._qkv(x)
    # Grouped-query attention: query head n reads key/value head n // (N / N_kv).
    if self.sinks is not None or self.softcap:
      sinks = None if self.sinks is None else self.sinks[...]
      out = dot_attention(
        q, k, v, scale=q.shape[-1] ** -0.5, causal=self.causal, window=self.window, sinks=sinks, softcap=self.softcap
      )
    else:
      window = (self.window - 1, 0) if self.window else None
      out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal, local_window_size=window)  # [B, L, N, H]
    return _project(out.reshape(b * l, -1), self.wo[...], self.bo).reshape(b, l, -1)

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    """An empty decoding cache: keys and values {'k', 'v'} <dtype>[B, max_len, N_kv, H] (after norms and RoPE)."""
    shape = (batch, max_len, *self._kv_shape())
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  def _kv_shape(self) -> tuple[int, int]:
    w = self.wqkv[...] if self.wqkv is not None else self.wkv[...]
    return w.shape[2], w.shape[3]

  def decode(self, x: jax.Array, cache: dict, start: jax.Array) -> tuple[jax.Array, dict]:
    """x [B, L, d], row b's tokens at positions start[b] .. start[b] + L - 1, attending to the cache and to themselves.

    start: <int32>[B] (or one offset for every row). cache: `init_cache`'s, holding row b's
    positions 0 .. start[b] - 1; returned with the L new keys and values written in (a slot at or
    past start[b] is overwritten, and until then later than every query of the row, so masked).
    The same function as `__call__` on the whole sequence (prefill: start 0, L the prompt;
    decoding: L = 1).
    """
    b, l, _ = x.shape
    positions = decode_positions(start, b, l)  # [B, L]
    q, k, v = self._qkv(x, positions)
    cache = {"k": write_cache(cache["k"], k, positions), "v": write_cache(cache["v"], v, positions)}
    sinks = None if self.sinks is None else self.sinks[...]
    out = dot_attention(
      q,
      cache["k"].astype(q.dtype),
      cache["v"].astype(q.dtype),
      scale=q.shape[-1] ** -0.5,
      window=self.window,
      sinks=sinks,
      q_positions=positions,
      softcap=self.softcap,
    )
    return _project(out.reshape(b * l, -1), self.wo[...], self.bo).reshape(b, l, -1), cache


def decode_positions(start: jax.Array, batch: int, length: int) -> jax.Array:
  """<int32>[B, L]: row b's positions start[b] .. start[b] + L - 1 (start: [B] or one offset for all rows)."""
  start = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (batch,))
  return start[:, None] + jnp.arange(length, dtype=jnp.int32)


def write_cache(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
  """cache [B, T, ...] with new [B, L, ...] written at each row's positions [B, L] (its dtype kept)."""
  rows = jnp.arange(cache.shape[0])[:, None]
  return cache.at[rows, positions].set(new.astype(cache.dtype))


def dot_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float,
  causal: bool = True,
  window: int = 0,
  sinks: jax.Array | None = None,
  q_positions: jax.Array | None = None,
  softcap: float = 0.0,
) -> jax.Array:
  """Softmax attention written out: q [B, L, N, H], k [B, T, N_kv, H], v [B, T, N_kv, H_v] -> [B, L, N, H_v].

  Query head n reads key/value head n // (N / N_kv). Key j is visible to query i (at position
  q_positions[i], or q_positions[b, i] for row b, default T - L + i: the queries are the last L of the T keys) when j <= i with
  causal, and when i - j < window with window > 0 (sliding-window attention). sinks <float32>[N]:
  a learned logit per head that joins each query's softmax and takes its share of the weight but
  adds no value (gpt-oss's attention sinks). H_v may differ from H (multi-head latent attention).
  softcap > 0: the scaled scores s become softcap·tanh(s / softcap) (Grok-1's logit cap).
  Scores and softmax run in float32; the output has q's dtype.
  """
  b, l, n, h = q.shape
  t, kv_heads = k.shape[1], k.shape[2]
  group = n // kv_heads
  qg = q.reshape(b, l, kv_heads, group, h)  # [B, L, N_kv, G, H]
  scores = jnp.einsum("blkgh,btkh->bkglt", qg, k, preferred_element_type=jnp.float32) * scale  # [B, N_kv, G, L, T]
  if softcap:
    scores = softcap * jnp.tanh(scores / softcap)
  if q_positions is None:
    q_positions = jnp.arange(t - l, t)
  q_positions = q_positions[..., :, None]  # [L, 1] or [B, L, 1]
  kv_positions = jnp.arange(t)
  visible = jnp.ones((l, t), bool)
  if causal:
    visible = kv_positions <= q_positions
  if window:
    visible = visible & (q_positions - kv_positions < window)
  if visible.ndim == 3:  # Per-row query positions: [B, 1, 1, L, T] against the scores' heads.
    visible = visible[:, None, None]
  scores = jnp.where(visible, scores, -jnp.inf)
  if sinks is not None:
    sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(kv_heads, group, 1, 1), (b, kv_heads, group, l, 1))
    weights = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
  else:
    weights = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkglt,btkh->blkgh", weights.astype(v.dtype), v)  # [B, L, N_kv, G, H_v]
  return out.reshape(b, l, n, v.shape[-1]).astype(q.dtype)


def _project(tokens: jax.Array, w: jax.Array, bias: nnx.Param | None = None) -> jax.Array:
  """[T, d] @ w [d, ...] (+ bias [...]) -> [T, prod(...)], w viewed as one [d, prod(...)] matrix."""
  out = tokens @ w.reshape(w.shape[0], -1).astype(tokens.dtype)
  return out if bias is None else out + bias[...].reshape(-1).astype(tokens.dtype)
