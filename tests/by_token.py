"""Token permutation from a row -> token map alone, for the kernel tests.

The library's dispatchers know both maps from their routing decision (`RowMap.from_rows`); these
helpers build the RowMap with a stable sort instead, so that tests can drive the kernels from
hand-written row -> token maps. When a token has more rows than the static bound K, a
`lax.cond` falls back to the XLA gather / scatter-add, so the result is exact either way.
"""

import jax
import jax.numpy as jnp

from moejax.kernels.permute import RowMap, _gather_xla, _scatter_add_xla, permute, unpermute
from moejax.kernels.varying import _zeros_varying_like


def inverse_map(token_of_row: jax.Array, num_tokens: int, max_rows_per_token: int) -> jax.Array:
  """<int32>[T, K] the rows of each token in increasing row order, −1 padded.

  Rows past the K-th of a token are left out; the `*_by_token` ops detect that and fall back.
  """
  row_of_choice, _ = _inverse_map(token_of_row.astype(jnp.int32), num_tokens, max_rows_per_token)
  return jnp.where(row_of_choice < token_of_row.shape[0], row_of_choice, -1)


def permute_by_token(
  x: jax.Array, token_of_row: jax.Array, *, max_rows_per_token: int | None = None, **kwargs
) -> jax.Array:
  """`permute` from a row -> token map alone: out[r] = x[token_of_row[r]], 0 out of [0, T).

  max_rows_per_token: static K, the most rows any token has (top-k: k; expert choice: E or
  its cap). A smaller K than the routing needs is still exact (an XLA fallback runs); None
  means R. kwargs: as for `permute`.
  """
  t = x.shape[0]
  row_map, overflow = _row_map_by_token(token_of_row, t, max_rows_per_token)
  fast = lambda: permute(x, row_map, **kwargs)
  if overflow is None:
    return fast()
  # The RowMap lost the rows past a token's K-th: gather from the full map instead.
  slow = lambda: _gather_xla(x, token_of_row.astype(jnp.int32)[:, None], None)
  return jax.lax.cond(overflow, slow, fast)


def unpermute_by_token(
  y: jax.Array,
  token_of_row: jax.Array,
  weight_of_row: jax.Array,
  num_tokens: int,
  *,
  max_rows_per_token: int | None = None,
  **kwargs,
) -> jax.Array:
  """`unpermute` from a row -> token map: out[t] = Σ_{r: token_of_row[r] = t} weight_of_row[r] · y[r].

  weight_of_row: <float>[R]; num_tokens: T (static); the rest as for `permute_by_token`.
  """
  row_map, overflow = _row_map_by_token(token_of_row, num_tokens, max_rows_per_token)
  padded = jnp.concatenate([weight_of_row, jnp.zeros((1,), weight_of_row.dtype)])
  fast = lambda: unpermute(y, row_map, padded[row_map.row_of_choice], **kwargs)
  if overflow is None:
    return fast()
  scatter = lambda: _scatter_add_xla(y, token_of_row.astype(jnp.int32), weight_of_row, num_tokens)
  return jax.lax.cond(overflow, scatter, fast)


def _row_map_by_token(token_of_row, num_tokens, max_rows_per_token):
  """(RowMap, whether some token has more than K rows, or None when K = R cannot overflow)."""
  r = token_of_row.shape[0]
  if max_rows_per_token is not None and max_rows_per_token < 1:
    raise ValueError(f"max_rows_per_token must be >= 1, got {max_rows_per_token}")
  k = min(max_rows_per_token or r, r)
  row_of_choice, max_count = _inverse_map(token_of_row.astype(jnp.int32), num_tokens, k)
  row_map = RowMap.from_rows(row_of_choice, r)
  return row_map, (None if k == r else max_count > k)


def _inverse_map(token_of_row, num_tokens, k):
  """(<int32>[T, K] rows of each token, R padded; <int32>[] the most rows of any token)."""
  r = token_of_row.shape[0]
  valid = (token_of_row >= 0) & (token_of_row < num_tokens)
  key = jnp.where(valid, token_of_row, num_tokens)  # empty rows sort last
  order = jnp.argsort(key, stable=True).astype(jnp.int32)  # rows grouped by token
  sorted_key = key[order]
  counts = jnp.bincount(key, length=num_tokens + 1).astype(jnp.int32)  # [T+1]
  start = jnp.cumsum(counts) - counts
  rank = jnp.arange(r, dtype=jnp.int32) - start[sorted_key]  # position among the token's rows
  keep = (sorted_key < num_tokens) & (rank < k)
  row_of_choice = _zeros_varying_like((num_tokens, k), jnp.int32, token_of_row) + r
  # Left-out entries aim at token T, out of bounds, and are dropped.
  row_of_choice = row_of_choice.at[jnp.where(keep, sorted_key, num_tokens), jnp.where(keep, rank, 0)].set(
    order, mode="drop"
  )
  max_count = jnp.max(counts[:num_tokens], initial=0)
  return row_of_choice, max_count
