"""Token permutation: gather tokens into expert rows, and weighted-sum rows back into tokens.

Legend: T tokens, K choices per token (top-k: k; expert choice: E or its cap), R rows (the
E·G·C buffer rows of a capacity dispatcher, or dropless's padded expert-sorted rows), d model
dim, BM rows per grid step, BD columns per grid step.

A `RowMap` pairs the K choices of each token with rows, both ways:
  row_of_choice <int32>[T, K]  the row each choice fills; R for a choice with no row (dropped)
  choice_of_row <int32>[R]     the choice t·K + k filling each row; T·K for an empty row
and the two ops move data along it:
  permute(x, row_map)               [T, d] -> [R, d]   out[r] = x[token of r], 0 for empty rows
  unpermute(y, row_map, weight)     [R, d] -> [T, d]   out[t] = Σ_k weight[t, k] · y[row_of_choice[t, k]]

Both directions of both ops, forward and backward, are one kernel, a weighted row gather:
  out[m] = Σ_k weight[m, k] · src[index[m, k]]   (index out of range: contributes 0)
permute is index = token_of_row[:, None]; its gradient gathers each token's K rows
(index = row_of_choice). unpermute is index = row_of_choice with the weights fused in; its
gradient gathers the cotangent into rows (index = token_of_row) and from that
dy = weight · g and dweight = Σ_d y · g. Why only gathers, never a scatter-add: several rows
add into one token, so a kernel that walks rows and adds into tokens needs atomics (GPU;
float atomics also make the sum order, hence the bits, vary from run to run) or serialised
writes (TPU, where the two cores of a megacore chip must not write the same output block).
Walking tokens instead, each grid step owns its output block outright, reads its ≤ K rows
and sums them in a fixed order: race-free and deterministic. A dispatcher knows both maps
from its routing decision (`RowMap.from_rows` inverts row_of_choice with one int32 scatter),
so no sort is needed. Gathering K rows per token reads T·K rows; when K is large (expert
choice with K = E) that is more than the R rows themselves, so for K > `MAX_GATHER_K` the
rows-into-tokens direction is an XLA scatter-add over the rows instead, on every backend.

Backends:
  'xla'     jnp.take gathers, accumulated in float32.
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
  'auto'    'xla' on every platform for now: the Pallas kernels have not yet been compiled
            or timed on a GPU or TPU (below), and on CPU they only run interpreted, far
            slower than XLA. `moe.permute_backend='pallas'` forces them.
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
# Above this many choices per token, rows are summed into tokens by an XLA scatter-add (R row
# reads) rather than a gather of every token's K rows (T·K row reads).
MAX_GATHER_K = 8


@functools.partial(jax.tree_util.register_dataclass, data_fields=["row_of_choice", "choice_of_row"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class RowMap:
  """The rows of each token's choices and the choice of each row (a partial bijection).

  Attributes:
    row_of_choice: <int32>[T, K] the row filled by choice k of token t; R if it has none.
    choice_of_row: <int32>[R] the flat choice t·K + k filling each row; T·K if the row is empty.
  """

  row_of_choice: jax.Array
  choice_of_row: jax.Array

  @classmethod
  def from_rows(cls, row_of_choice: jax.Array, num_rows: int) -> "RowMap":
    """From <int32>[T, K] rows (each row used at most once; out of [0, R): no row)."""
    t, k = row_of_choice.shape
    valid = (row_of_choice >= 0) & (row_of_choice < num_rows)
    row_of_choice = jnp.where(valid, row_of_choice, num_rows).astype(jnp.int32)
    choices = jnp.arange(t * k, dtype=jnp.int32)
    choice_of_row = _zeros_varying_like((num_rows,), jnp.int32, row_of_choice) + t * k
    # Choices with no row aim at row R, out of bounds, and are dropped.
    choice_of_row = choice_of_row.at[row_of_choice.reshape(-1)].set(choices, mode="drop", unique_indices=True)
    return cls(row_of_choice, choice_of_row)

  @property
  def num_tokens(self) -> int:
    return self.row_of_choice.shape[0]

  @property
  def num_rows(self) -> int:
    return self.choice_of_row.shape[0]

  @property
  def token_of_row(self) -> jax.Array:
    """<int32>[R] the token each row reads; T for an empty row."""
    return self.choice_of_row // self.row_of_choice.shape[1]


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static settings of one call (hashable: a nondiff argument of the custom VJPs)."""

  backend: str  # 'pallas' or 'xla', resolved
  platform: str  # kernel variant: 'gpu' or 'tpu'
  interpret: bool
  block_rows: int | None
  block_d: int | None


def _config(backend, platform, interpret, block_rows, block_d):
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  device = jax.default_backend()
  if backend == "auto":
    backend = "xla"  # See the module docstring: until the kernels are measured on hardware.
  if platform is None:
    platform = "gpu" if device == "gpu" else "tpu"
  if platform not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
  if interpret is None:
    interpret = device == "cpu"
  return _Config(backend, platform, bool(interpret), block_rows, block_d)


def permute(
  x: jax.Array,
  row_map: RowMap,
  *,
  backend: str = "auto",
  interpret: bool | None = None,
  block_rows: int | None = None,
  block_d: int | None = None,
  platform: str | None = None,
) -> jax.Array:
  """out[r] = x[row_map.token_of_row[r]], zeros for empty rows.

  Args:
    x: [T, d] tokens, any float dtype.
    row_map: a RowMap with T tokens.
    backend: one of BACKENDS.
    interpret: run the Pallas kernel in interpret mode; default True on CPU only.
    block_rows: BM, output rows per grid step (default 32 on 'gpu', 128 on 'tpu').
    block_d: BD, columns per grid step (default 128 on 'gpu', 512 on 'tpu' where it divides d,
      else all of d).
    platform: the kernel variant, 'gpu' (Triton) or 'tpu' (Mosaic); default 'gpu' when
      jax.default_backend() is gpu, else 'tpu'.

  Returns:
    [R, d] in x.dtype. Differentiable w.r.t. x (reverse mode): the gradient sums each token's
    rows (a gather of its K rows, float32 sums).
  """
  return _permute(x, row_map, _config(backend, platform, interpret, block_rows, block_d))


def unpermute(
  y: jax.Array,
  row_map: RowMap,
  weight: jax.Array,
  *,
  backend: str = "auto",
  interpret: bool | None = None,
  block_rows: int | None = None,
  block_d: int | None = None,
  platform: str | None = None,
) -> jax.Array:
  """out[t] = Σ_k weight[t, k] · y[row_map.row_of_choice[t, k]]; choices with no row add 0.

  Args:
    y: [R, d] rows, any float dtype.
    row_map: a RowMap with R rows.
    weight: <float>[T, K] the weight of each choice.
    Others as for `permute`.

  Returns:
    [T, d] in y.dtype, summed in float32; tokens with no row are 0. Differentiable (reverse
    mode) w.r.t. y and weight.
  """
  return _unpermute(y, row_map, weight, _config(backend, platform, interpret, block_rows, block_d))


# --- Custom VJPs: every direction is a gather ----------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _permute(x, row_map, cfg):
  return _gather_rows(x, row_map.token_of_row[:, None], None, cfg)


def _permute_fwd(x, row_map, cfg):
  return _permute(x, row_map, cfg), (x, row_map)


def _permute_bwd(cfg, residuals, dout):
  x, row_map = residuals
  dx = _rows_to_tokens(dout, row_map, None, cfg).astype(x.dtype)
  return _sum_to_variance_of(dx, x), None


_permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _unpermute(y, row_map, weight, cfg):
  return _rows_to_tokens(y, row_map, weight, cfg)


def _unpermute_fwd(y, row_map, weight, cfg):
  return _unpermute(y, row_map, weight, cfg), (y, row_map, weight)


def _unpermute_bwd(cfg, residuals, dout):
  y, row_map, weight = residuals
  grad_rows = _gather_rows(dout, row_map.token_of_row[:, None], None, cfg).astype(jnp.float32)  # [R, d]
  flat_weight = jnp.concatenate([weight.reshape(-1).astype(jnp.float32), jnp.zeros((1,), jnp.float32)])
  dy = (flat_weight[row_map.choice_of_row][:, None] * grad_rows).astype(y.dtype)  # empty rows: 0
  drow = jnp.sum(y.astype(jnp.float32) * grad_rows, axis=-1)  # [R]
  dweight = jnp.concatenate([drow, jnp.zeros((1,), jnp.float32)])[row_map.row_of_choice]  # [T, K]
  return _sum_to_variance_of(dy, y), None, _sum_to_variance_of(dweight.astype(weight.dtype), weight)


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def _rows_to_tokens(rows, row_map, weight, cfg):
  """<[T, d] rows.dtype> Σ_k weight[t, k] · rows[row_of_choice[t, k]] (weight None: 1)."""
  t, k = row_map.row_of_choice.shape
  if k > MAX_GATHER_K:  # Reading T·K rows would cost more than the R rows: scatter-add them.
    flat = (
      None
      if weight is None
      else jnp.concatenate([weight.reshape(-1), jnp.zeros((1,), weight.dtype)])[row_map.choice_of_row]
    )
    return _scatter_add_xla(rows, row_map.token_of_row, flat, t)
  return _gather_rows(rows, row_map.row_of_choice, weight, cfg)


def _scatter_add_xla(y, token_of_row, weight_of_row, num_tokens):
  """Σ of (weighted) rows into their tokens, float32 sums; rows of out-of-range tokens dropped."""
  valid = (token_of_row >= 0) & (token_of_row < num_tokens)
  rows = y.astype(jnp.float32)
  if weight_of_row is not None:
    rows = weight_of_row.astype(jnp.float32)[:, None] * rows
  out = _zeros_varying_like((num_tokens, y.shape[1]), jnp.float32, y, token_of_row, weight_of_row)
  out = out.at[jnp.where(valid, token_of_row, num_tokens)].add(rows, mode="drop")
  return out.astype(y.dtype)


def _gather_rows(src, index, weight, cfg):
  """<[M, d] src.dtype> Σ_k weight[m, k] · src[index[m, k]] (weight None: 1), float32 sums."""
  if cfg.backend == "xla":
    return _gather_xla(src, index, weight)
  if cfg.platform == "tpu":
    return _gather_rows_tpu(src, index, weight, cfg)
  return _gather_rows_gpu(src, index, weight, cfg)


def _gather_xla(src, index, weight):
  """The XLA gather: out-of-range indices read zeros."""
  n = src.shape[0]
  index = jnp.where((index >= 0) & (index < n), index, n)
  if index.shape[1] == 1 and weight is None:  # A plain gather: no sum, no float32 detour.
    return jnp.take(src, index[:, 0], axis=0, mode="fill", fill_value=0)
  rows = jnp.take(src, index, axis=0, mode="fill", fill_value=0).astype(jnp.float32)  # [M, K, d]
  if weight is not None:
    rows = weight.astype(jnp.float32)[..., None] * rows
  return rows.sum(axis=1).astype(src.dtype)


# --- Pallas kernels -----------------------------------------------------------------------


def _round_up(n, m):
  return -(-n // m) * m


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
  kernel = functools.partial(_tpu_kernel, num_src=n, k_rows=k, block_rows=bm, block_d=bd, weighted=weight is not None)
  out = pl.pallas_call(
    kernel,
    out_shape=_out_shape((m_pad, d), src.dtype, index),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(m_pad // bm, d // bd),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, bd), lambda i, j, index: (i, j)),
      scratch_shapes=[pltpu.VMEM((k, bm, bd), src.dtype), pltpu.SemaphoreType.DMA(())],
    ),
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
