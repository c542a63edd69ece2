"""Token permutation: gather tokens into expert rows, and weighted-sum rows back into tokens.

Legend: T tokens, R rows (the E·C buffer rows of a capacity dispatcher, or dropless's padded
expert-sorted rows), d model dim, K max rows per token (top-k routing: k; expert choice: up
to E), BM rows per grid step, BD columns per grid step.

  permute(x, token_of_row)                               [T, d] -> [R, d]
  unpermute(y, token_of_row, weight_of_row, num_tokens)  [R, d] -> [T, d]

A row whose token is out of [0, T) (T by convention) is empty: permute writes zeros there and
unpermute ignores it. Several rows may hold one token; a token may have no row (dropped).

Both directions are one kernel, a weighted row gather:
  out[m] = Σ_k weight[m, k] · src[index[m, k]]   (index out of range: contributes 0)
permute is index = token_of_row[:, None], weight 1. unpermute is the same gather driven by
the inverse map `rows_of_token <int32>[T, K]` (each token's rows, −1 padded; computed in XLA
by a stable sort of token_of_row), with the weights fused in. Why a gather rather than a
scatter-add: several rows add into one token, so a kernel that walks rows and adds into
tokens needs atomics (GPU; float atomics also make the sum order, hence the bits, vary from
run to run) or serialised writes (TPU, where grid steps on the two cores of a megacore chip
must not write the same output block). Walking tokens instead, each grid step owns its
output block outright, reads its ≤ K rows and sums them in a fixed order: race-free and
deterministic, at the price of the sort and K-padded index map, O(R log R + T·K) integer
work in XLA. The gradients are the same kernel again: permute's is an unpermute with weight
1, unpermute's an (unweighted) permute of the cotangent, from which dy = w·g and
dw = Σ_d y·g.

K must bound the rows of every token for the kernel alone to be exact. `max_rows_per_token`
gives it (static); None means K = R (always exact, but O(T·R) index work: pass the real
bound). When the routing breaks the bound, a `lax.cond` falls back to the XLA scatter-add, so
the result is exact either way, and the bound only decides the speed.

Backends:
  'xla'     jnp.take / .at[].add (scatter-add), accumulated in float32.
  'pallas'  `pl.pallas_call` over a grid of (row block, column block), in one of two variants,
            chosen by `platform` (default: 'gpu' on GPU, else 'tpu'):
    'tpu'   (Mosaic) the flat index is scalar-prefetched into SMEM; each grid step starts one
            row DMA HBM -> VMEM per (row, k) it needs (empty rows are zero-filled instead), all
            on one DMA semaphore, waits for them, and sums the K buffers with the weights
            (laid out [K, M, 1] so each is a sublane-major column that broadcasts over d).
    'gpu'   (Triton, which has no scalar prefetch: `num_scalar_prefetch` raises there) the
            index block [BM, K] is an ordinary blocked input; for each k the kernel loads a
            column of row numbers and gathers src[rows, cols] with pointer arithmetic.
            Triton needs power-of-2 tensor shapes: BM and BD are powers of 2, and a d that
            is not a multiple of BD is zero-padded (one copy of src).
  'auto'    'pallas' on gpu/tpu, 'xla' on cpu.
On CPU, 'pallas' interprets the kernels (interpret=None means True there): the 'tpu' variant
with the TPU interpreter (`pltpu.InterpretParams`: simulated DMAs and semaphores, NaN for
uninitialised VMEM), the 'gpu' variant with jax's generic one, which on jax 0.10 fails inside
a shard_map with check_vma=True (its grid loop is not varying-axis aware); hence the 'tpu'
default on CPU. Hardware status: both variants are tested only in interpret mode, and lowered
(not compiled) for 'cuda' (Triton IR) and 'tpu' (Mosaic IR) by tests/test_kernels.py on a CPU
machine. Not yet tried on a GPU or TPU: Triton's compile to PTX, Mosaic's layout passes (the
[BM, 1] weight columns, single-row DMAs and stores, which may be slow or refused for packed
dtypes such as bf16), SMEM capacity for the scalar-prefetched index (M·K int32: a very large
R may need the index as a blocked SMEM input instead), and all speeds.

Everything works inside `jax.shard_map` (per-device routing): cotangents of replicated
operands are summed over the devices, as in `moejax.dropless`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from moejax.kernels.varying import _sum_to_variance_of, _varying_axes, _zeros_varying_like

BACKENDS = ("auto", "pallas", "xla")
PLATFORMS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static settings of one call (hashable: a nondiff argument of the custom VJPs)."""

  backend: str  # 'pallas' or 'xla', resolved
  platform: str  # kernel variant: 'gpu' or 'tpu'
  interpret: bool
  block_rows: int | None
  block_d: int | None
  max_rows_per_token: int | None
  num_tokens: int  # T, the rows of x / the output of unpermute


def _config(backend, platform, interpret, block_rows, block_d, max_rows_per_token, num_tokens):
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  device = jax.default_backend()
  if backend == "auto":
    backend = "pallas" if device in ("gpu", "tpu") else "xla"
  if platform is None:
    platform = "gpu" if device == "gpu" else "tpu"
  if platform not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
  if interpret is None:
    interpret = device == "cpu"
  if max_rows_per_token is not None and max_rows_per_token < 1:
    raise ValueError(f"max_rows_per_token must be >= 1, got {max_rows_per_token}")
  return _Config(backend, platform, bool(interpret), block_rows, block_d, max_rows_per_token,
                 int(num_tokens))


def permute(x: jax.Array, token_of_row: jax.Array, *, backend: str = "auto",
            interpret: bool | None = None, max_rows_per_token: int | None = None,
            block_rows: int | None = None, block_d: int | None = None,
            platform: str | None = None) -> jax.Array:
  """out[r] = x[token_of_row[r]], zeros for empty rows.

  Args:
    x: [T, d] tokens, any float dtype.
    token_of_row: <int32>[R] the token each row reads; out of [0, T) (T by convention) for
      an empty row.
    backend: one of BACKENDS.
    interpret: run the Pallas kernel in interpret mode; default True on CPU only.
    max_rows_per_token: static bound on the rows one token fills, used by the gradient (an
      unpermute); see the module docstring. None: R.
    block_rows: BM, output rows per grid step (default 32 on 'gpu', 128 on 'tpu').
    block_d: BD, columns per grid step (default 128 on 'gpu', 512 on 'tpu' where it divides d,
      else all of d).
    platform: the kernel variant, 'gpu' (Triton) or 'tpu' (Mosaic); default 'gpu' when
      jax.default_backend() is gpu, else 'tpu'.

  Returns:
    [R, d] in x.dtype. Differentiable w.r.t. x (reverse mode); the gradient is
    unpermute(dout, token_of_row, 1).
  """
  cfg = _config(backend, platform, interpret, block_rows, block_d, max_rows_per_token, x.shape[0])
  return _permute(x, token_of_row.astype(jnp.int32), cfg)


def unpermute(y: jax.Array, token_of_row: jax.Array, weight_of_row: jax.Array, num_tokens: int, *,
              backend: str = "auto", interpret: bool | None = None,
              max_rows_per_token: int | None = None, block_rows: int | None = None,
              block_d: int | None = None, platform: str | None = None) -> jax.Array:
  """out[t] = Σ_{r: token_of_row[r] = t} weight_of_row[r] · y[r]; empty rows are ignored.

  Args:
    y: [R, d] rows, any float dtype.
    token_of_row: <int32>[R] as for `permute`.
    weight_of_row: <float32>[R] the weight of each row (ignored for empty rows).
    num_tokens: T (static).
    max_rows_per_token: static K, the most rows any token has (top-k: k; expert choice: E or
      its cap). A smaller K than the routing needs is still exact (an XLA fallback runs);
      None means R. Ignored by 'xla'.
    Others as for `permute`.

  Returns:
    [T, d] in y.dtype, summed in float32; tokens with no row are 0. Differentiable (reverse
    mode) w.r.t. y and weight_of_row.
  """
  cfg = _config(backend, platform, interpret, block_rows, block_d, max_rows_per_token, num_tokens)
  return _unpermute(y, token_of_row.astype(jnp.int32), weight_of_row, cfg)


def inverse_map(token_of_row: jax.Array, num_tokens: int, max_rows_per_token: int) -> jax.Array:
  """<int32>[T, K] the rows of each token in increasing row order, −1 padded.

  Rows past the K-th of a token are left out; `unpermute` detects that and falls back to XLA.
  """
  return _inverse_map(token_of_row.astype(jnp.int32), num_tokens, max_rows_per_token)[0]


# --- Custom VJPs --------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _permute(x, token_of_row, cfg):
  return _permute_impl(x, token_of_row, cfg)


def _permute_fwd(x, token_of_row, cfg):
  return _permute_impl(x, token_of_row, cfg), (x, token_of_row)


def _permute_bwd(cfg, residuals, dout):
  x, token_of_row = residuals
  ones = _zeros_varying_like(token_of_row.shape, jnp.float32, dout, token_of_row) + 1
  dx = _unpermute_impl(dout, token_of_row, ones, cfg).astype(x.dtype)
  return _sum_to_variance_of(dx, x), None


_permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _unpermute(y, token_of_row, weight_of_row, cfg):
  return _unpermute_impl(y, token_of_row, weight_of_row, cfg)


def _unpermute_fwd(y, token_of_row, weight_of_row, cfg):
  return _unpermute_impl(y, token_of_row, weight_of_row, cfg), (y, token_of_row, weight_of_row)


def _unpermute_bwd(cfg, residuals, dout):
  y, token_of_row, weight_of_row = residuals
  grad_rows = _permute_impl(dout, token_of_row, cfg).astype(jnp.float32)  # [R, d]
  dy = (weight_of_row.astype(jnp.float32)[:, None] * grad_rows).astype(y.dtype)
  dweight = jnp.sum(y.astype(jnp.float32) * grad_rows, axis=-1).astype(weight_of_row.dtype)
  return _sum_to_variance_of(dy, y), None, _sum_to_variance_of(dweight, weight_of_row)


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


# --- Forward implementations --------------------------------------------------------------


def _permute_impl(x, token_of_row, cfg):
  """[R, d]: x[token_of_row], zeros for empty rows."""
  t = x.shape[0]
  if cfg.backend == "xla":
    valid = (token_of_row >= 0) & (token_of_row < t)
    return jnp.take(x, jnp.where(valid, token_of_row, t), axis=0, mode="fill", fill_value=0)
  return _gather_rows(x, token_of_row[:, None], None, cfg)


def _unpermute_impl(y, token_of_row, weight_of_row, cfg):
  """[T, d]: Σ weight · y over each token's rows."""
  t, r = cfg.num_tokens, token_of_row.shape[0]
  if cfg.backend == "xla":
    return _unpermute_xla(y, token_of_row, weight_of_row, t)
  k = min(cfg.max_rows_per_token or r, r)
  rows_of_token, max_count = _inverse_map(token_of_row, t, k)  # [T, K]
  has_row = rows_of_token >= 0
  weight = jnp.where(has_row, weight_of_row.astype(jnp.float32)[jnp.where(has_row, rows_of_token, 0)], 0.0)
  if k == r:  # Every token's rows fit.
    return _gather_rows(y, rows_of_token, weight, cfg)
  return jax.lax.cond(max_count > k,
                      lambda: _unpermute_xla(y, token_of_row, weight_of_row, t),
                      lambda: _gather_rows(y, rows_of_token, weight, cfg))


def _unpermute_xla(y, token_of_row, weight_of_row, num_tokens):
  """The scatter-add reference: float32 sums, rows of out-of-range tokens dropped."""
  valid = (token_of_row >= 0) & (token_of_row < num_tokens)
  weighted = weight_of_row.astype(jnp.float32)[:, None] * y.astype(jnp.float32)
  out = _zeros_varying_like((num_tokens, y.shape[1]), jnp.float32, y, token_of_row, weight_of_row)
  out = out.at[jnp.where(valid, token_of_row, num_tokens)].add(weighted, mode="drop")
  return out.astype(y.dtype)


def _inverse_map(token_of_row, num_tokens, k):
  """(<int32>[T, K] rows of each token, −1 padded; <int32>[] the most rows of any token)."""
  r = token_of_row.shape[0]
  valid = (token_of_row >= 0) & (token_of_row < num_tokens)
  key = jnp.where(valid, token_of_row, num_tokens)  # empty rows sort last
  order = jnp.argsort(key, stable=True).astype(jnp.int32)  # rows grouped by token
  sorted_key = key[order]
  counts = jnp.bincount(key, length=num_tokens + 1).astype(jnp.int32)  # [T+1]
  start = jnp.cumsum(counts) - counts
  rank = jnp.arange(r, dtype=jnp.int32) - start[sorted_key]  # position among the token's rows
  keep = (sorted_key < num_tokens) & (rank < k)
  rows_of_token = _zeros_varying_like((num_tokens, k), jnp.int32, token_of_row) - 1
  # Left-out entries aim at row T, out of bounds, and are dropped.
  rows_of_token = rows_of_token.at[jnp.where(keep, sorted_key, num_tokens), jnp.where(keep, rank, 0)].set(
      order, mode="drop")
  max_count = jnp.max(counts[:num_tokens], initial=0)
  return rows_of_token, max_count


# --- Pallas kernels -----------------------------------------------------------------------


def _round_up(n, m):
  return -(-n // m) * m


def _gather_rows(src, index, weight, cfg):
  """<[M, d] src.dtype> Σ_k weight[m, k] · src[index[m, k]] (weight None: 1), float32 sums."""
  if cfg.platform == "tpu":
    return _gather_rows_tpu(src, index, weight, cfg)
  return _gather_rows_gpu(src, index, weight, cfg)


def _gather_rows_gpu(src, index, weight, cfg):
  """The Triton variant: blocked index/weight inputs, pointer-arithmetic gathers of src."""
  n, d = src.shape
  m, k = index.shape
  bm = min(cfg.block_rows or 32, pl.next_power_of_2(m))
  bd = min(cfg.block_d or 128, pl.next_power_of_2(d))
  if bm & (bm - 1) or bd & (bd - 1):
    raise ValueError(f"the 'gpu' kernel needs power-of-2 blocks, got block_rows={bm}, block_d={bd}")
  m_pad, d_pad = _round_up(m, bm), _round_up(d, bd)
  if d_pad != d:  # Ragged d: pad src's columns (a copy); the output is sliced back.
    src = jnp.pad(src, ((0, 0), (0, d_pad - d)))
  index = jnp.pad(index, ((0, m_pad - m), (0, 0)), constant_values=-1)
  operands = [index] + ([] if weight is None else [jnp.pad(weight, ((0, m_pad - m), (0, 0)))]) + [src]
  operands = _same_variance(*operands)
  row_block = pl.BlockSpec((bm, k), lambda i, j: (i, 0))
  kernel = functools.partial(_gpu_kernel, num_src=n, k_rows=k, block_d=bd, weighted=weight is not None)
  out = pl.pallas_call(
      kernel,
      out_shape=_out_shape((m_pad, d_pad), src.dtype, operands[0]),
      grid=(m_pad // bm, d_pad // bd),
      in_specs=[row_block] * (len(operands) - 1) + [pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((bm, bd), lambda i, j: (i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=4),
      interpret=cfg.interpret,
      name="moejax_gather_rows",
  )(*operands)
  return out[:m, :d]


def _gpu_kernel(index_ref, *refs, num_src, k_rows, block_d, weighted):
  """One [BM, BD] output block: K masked row gathers of src, summed in float32."""
  weight_ref, src_ref, out_ref = refs if weighted else (None, *refs)
  cols = pl.ds(pl.multiple_of(pl.program_id(1) * block_d, block_d), block_d)
  acc = jnp.zeros(out_ref.shape, jnp.float32)
  for k in range(k_rows):  # K is small (top-k); unrolled.
    rows = index_ref[:, k]  # [BM]
    valid = (rows >= 0) & (rows < num_src)
    # Empty rows read row 0 (in bounds, and cached after the first) and are masked out.
    values = src_ref[jnp.where(valid, rows, 0), cols].astype(jnp.float32)  # [BM, BD]
    if weighted:
      values = weight_ref[:, k][:, None] * values
    acc += jnp.where(valid[:, None], values, 0.0)
  out_ref[...] = acc.astype(out_ref.dtype)


def _gather_rows_tpu(src, index, weight, cfg):
  """The Mosaic variant: scalar-prefetched flat index, one row DMA per (row, k)."""
  n, d = src.shape
  m, k = index.shape
  sublanes = 8 * max(1, 4 // src.dtype.itemsize)  # rows per (8, 128) tile: 16 for bf16
  bm = min(cfg.block_rows or 128, _round_up(m, sublanes))
  bd = cfg.block_d or 512
  bd = bd if d % bd == 0 else d  # lane tiling: a multiple of 128, or all of d
  m_pad = _round_up(m, bm)
  index = jnp.pad(index, ((0, m_pad - m), (0, 0)), constant_values=-1).reshape(-1)  # [M·K]
  operands, in_specs = [], []
  if weight is not None:
    # [K, M, 1]: weight[k] is a [BM, 1] column that broadcasts over a [BM, BD] block.
    operands.append(jnp.pad(weight, ((0, m_pad - m), (0, 0))).T[:, :, None])
    in_specs.append(pl.BlockSpec((k, bm, 1), lambda i, j, index: (0, i, 0)))
  operands.append(src)
  in_specs.append(pl.BlockSpec(memory_space=pl.ANY))  # stays in HBM; rows are DMA'd by hand
  index, *operands = _same_variance(index, *operands)
  kernel = functools.partial(_tpu_kernel, num_src=n, k_rows=k, block_rows=bm, block_d=bd,
                             weighted=weight is not None)
  out = pl.pallas_call(
      kernel,
      out_shape=_out_shape((m_pad, d), src.dtype, index),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(m_pad // bm, d // bd),
          in_specs=in_specs,
          out_specs=pl.BlockSpec((bm, bd), lambda i, j, index: (i, j)),
          scratch_shapes=[pltpu.VMEM((k, bm, bd), src.dtype), pltpu.SemaphoreType.DMA(())]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      # The TPU interpreter simulates the DMAs and semaphores (uninitialised VMEM reads as NaN),
      # and unlike the generic one it runs inside shard_map with check_vma.
      interpret=pltpu.InterpretParams() if cfg.interpret else False,
      name="moejax_gather_rows",
  )(index, *operands)
  return out[:m]


def _tpu_kernel(index_smem, *refs, num_src, k_rows, block_rows, block_d, weighted):
  """One [BM, BD] output block: BM·K row DMAs into VMEM buffers, then a weighted sum."""
  weight_ref, src_hbm, out_ref, buffers, sem = refs if weighted else (None, *refs)
  block, col_block = pl.program_id(0), pl.program_id(1)

  def row_copy(row, k):
    """(whether the entry names a row, its DMA src[entry, cols] -> buffers[k, row])."""
    entry = index_smem[(block * block_rows + row) * k_rows + k]
    valid = (entry >= 0) & (entry < num_src)
    source = src_hbm.at[pl.ds(jnp.where(valid, entry, 0), 1), pl.ds(col_block * block_d, block_d)]
    return valid, pltpu.make_async_copy(source, buffers.at[k, pl.ds(row, 1)], sem)

  def start(row, carry):
    for k in range(k_rows):
      valid, copy = row_copy(row, k)
      pl.when(valid)(copy.start)

      @pl.when(jnp.logical_not(valid))
      def _():
        buffers[k, pl.ds(row, 1), :] = jnp.zeros((1, block_d), buffers.dtype)
    return carry

  def wait(row, carry):
    # All copies share one semaphore; each wait consumes one row's worth of bytes.
    for k in range(k_rows):
      valid, copy = row_copy(row, k)
      pl.when(valid)(copy.wait)
    return carry

  jax.lax.fori_loop(0, block_rows, start, 0)
  jax.lax.fori_loop(0, block_rows, wait, 0)
  acc = jnp.zeros(out_ref.shape, jnp.float32)
  for k in range(k_rows):
    values = buffers[k].astype(jnp.float32)  # [BM, BD]
    acc += weight_ref[k] * values if weighted else values
  out_ref[...] = acc.astype(out_ref.dtype)


# --- shard_map helpers beyond those of moejax.kernels.varying


def _same_variance(*operands):
  """The operands, each made varying over every shard_map axis that any of them varies over."""
  axes = set().union(*(_varying_axes(a) for a in operands))
  cast = lambda a: jax.lax.pcast(a, tuple(sorted(axes - _varying_axes(a))), to="varying")
  return [cast(a) if axes - _varying_axes(a) else a for a in operands]


def _out_shape(shape, dtype, like: jax.Array):
  """A pallas_call out_shape that varies over the shard_map axes `like` varies over."""
  aval = jax.typeof(like)
  manual = getattr(aval, "manual_axis_type", None)
  if manual is not None:  # jax 0.10
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual)
  vma = getattr(aval, "vma", None)
  return jax.ShapeDtypeStruct(shape, dtype, vma=vma) if vma else jax.ShapeDtypeStruct(shape, dtype)
