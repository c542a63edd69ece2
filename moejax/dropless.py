"""Dropless expert computation (MegaBlocks): every (token, choice) reaches its expert.

Legend: T tokens, K choices per token, N = T·K assignments, E experts, n_e assignments of
expert e, d model dim, f expert hidden dim, B block size (rows), NB number of blocks.

No capacity: nothing is padded to a fixed per-expert buffer and nothing is dropped, and no
expert computes on a token that did not choose it. The N assignments are stable-sorted by
expert and each expert's run is padded up to a multiple of B rows, so every block of B rows
belongs to one expert. NB = floor((N + min(E, N)·(B−1)) / B) bounds Σ_e ceil(n_e / B) for any
routing, so all shapes are static (jit-friendly); blocks past the used ones are spare.

Cost of impl='blocks' (the CPU path):
  FLOPs   forward 2·R·d·f per weight matrix (2, or 3 for swiglu), backward twice that, where
          R = Σ_e ceil(n_e / B)·B ≤ N + E·(B−1) rows: the ideal N rows plus at most B−1
          padding rows per expert. Spare blocks are skipped (a loop with a dynamic trip
          count), and the weights are read in place, not gathered per block.
          Computing every expert on every token and masking would cost E·T rows instead.
  memory  the padded rows O(NB·B·d) and the saved pre-activations O(NB·B·f) (×2 for swiglu);
          float32 weight gradients O(E·d·f) in the backward pass.
  Reverse-mode only (custom VJP over while loops): no jax.jvp / forward-over-reverse.
  Under jax.vmap the loop runs the largest trip count of the batch for every member.
impl='ragged_dot' runs `jax.lax.ragged_dot` on the sorted rows (no padding): the accelerator
path. On XLA:CPU ragged_dot lowers to a dense dot masked per group, E× the ideal FLOPs.

Timings: `python -m experiments.moe_layer_benchmark` times the MoE layer with the dropless
dispatcher (block loop on CPU) against a dense FFN of hidden size K·f on the same tokens, i.e.
the same ideal FLOPs (README "Performance"). The gap on CPU is the backward pass: its weight-
gradient matmuls contract over only B rows per block. Plain autodiff through a per-block weight
gather with a batched einsum, or through a lax.scan over blocks, was slower (measured in a
scratch benchmark, not kept).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moejax import kernels
from moejax.kernels.varying import _sum_to_variance_of, _zeros_varying_like
from moejax.layers.ffn import ACTIVATIONS, GATED, activate

IMPLS = ("auto", "blocks", "ragged_dot", "gather")
# The name (jax.ad_checkpoint.checkpoint_name) of the experts' per-row outputs, before the weighted
# combine: what model.remat 'moe' keeps (moejax.models.remat).
EXPERT_OUTPUT = "moe_expert_output"
# 'auto' on CPU takes 'gather' for at most this many assignments per expert (N ≤ GATHER_ROWS_PER_EXPERT·E):
# decoding a few tokens. `python -m experiments.inference` (2026-12-04, the 2-core dev VM; E = 8,
# K = 2, d = 128, f = 512) times decode steps with both: gather took 0.27-0.61× the block loop's
# time at N = 2 to 32 (= 4·E). Above it the copies grow as N/E times the expert weights.
GATHER_ROWS_PER_EXPERT = 4


def num_blocks(num_assignments: int, num_experts: int, block_size: int) -> int:
  """NB, the static bound on Σ_e ceil(n_e / B): each non-empty expert wastes < B rows."""
  nonempty = min(num_experts, num_assignments)
  return max(1, (num_assignments + nonempty * (block_size - 1)) // block_size)


def dropless_flops(
  num_assignments: int, d: int, f: int, num_experts: int, block_size: int, activation: str
) -> tuple[int, int]:
  """(ideal, worst case) forward matmul FLOPs of 'blocks': 2·N·d·f vs 2·(N + E·(B−1))·d·f per matrix."""
  matrices = 3 if activation in GATED else 2
  padded = num_assignments + min(num_experts, num_assignments) * (block_size - 1)
  return 2 * num_assignments * d * f * matrices, 2 * padded * d * f * matrices


def dropless_expert_ffn(
  tokens: jax.Array,
  expert_index: jax.Array,
  combine_weight: jax.Array,
  wi: jax.Array,
  wo: jax.Array,
  wg: jax.Array | None,
  activation: str,
  *,
  impl: str = "auto",
  block_size: int = 64,
  permute_backend: str = "auto",
  biases: tuple | None = None,
) -> jax.Array:
  """out[t] = Σ_k combine_weight[t, k] · FFN_{expert_index[t, k]}(tokens[t]), no token dropped.

  Args:
    tokens: <float>[T, d].
    expert_index: <int32>[T, K] chosen expert of each choice, in [0, E). A token may pick the
      same expert twice; each choice is computed. E (or more) means no expert: the choice is
      not computed and adds 0 (expert parallelism marks padding rows so).
    combine_weight: <float32>[T, K]; a zero weight still routes (the expert computes the row)
      but contributes 0.
    wi: [E, d, f]; wo: [E, f, d]; wg: [E, d, f] for the gated activations, else None. Cast to
      tokens.dtype, as `ffn_apply` does.
    activation: one of `moejax.layers.ffn.ACTIVATIONS`, computed by its `activate`: exactly
      `ffn_apply`.
    biases: (bi [E, f], bg [E, f] or None, bo [E, d]) of the experts (gpt-oss), or None.
    impl: 'blocks' (sorted B-row blocks, one expert per block: the CPU path), 'ragged_dot'
      (jax.lax.ragged_dot: the GPU/TPU path), 'gather' (each assignment's expert weights
      gathered: few assignments, e.g. decoding) or 'auto' (ragged_dot when
      jax.default_backend() is gpu or tpu and XLA compiles it as a grouped matmul; otherwise
      gather for N ≤ GATHER_ROWS_PER_EXPERT·E assignments, blocks above). A ragged_dot
      that XLA lowers to a dense dot over all E experts (always on CPU; possible on GPU) is
      never taken silently: 'auto' then takes 'blocks' and warns, and an explicit
      'ragged_dot' warns (`ragged_dot_flop_ratio` is the check).
    block_size: B, rows per block for 'blocks'. Larger blocks run faster matmuls but pad up to
      B−1 rows per expert: a B near N/E or below it suits.
    permute_backend: `moejax.kernels` backend of the token permutation into expert order and
      the weighted combine back ('auto', 'xla' or 'pallas').

  Returns:
    [T, d] in tokens.dtype. Differentiable (reverse mode) w.r.t. tokens, wi, wo, wg and
    combine_weight; expert_index is an integer input with no gradient.
  """
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
  if (activation in GATED) != (wg is not None):
    raise ValueError(f"wg must be given exactly when activation is one of {GATED}")
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  impl = _resolve_impl(impl, expert_index.size, wi, tokens.dtype)
  dtype = tokens.dtype
  wi, wo = wi.astype(dtype), wo.astype(dtype)
  wg = None if wg is None else wg.astype(dtype)
  bias = (None, None, None) if biases is None else tuple(None if v is None else v.astype(dtype) for v in biases)
  weights = (wi, wo, wg, *bias)
  if impl == "blocks":
    return _blocks(tokens, expert_index, combine_weight, weights, activation, block_size, permute_backend)
  if impl == "gather":
    return _gathered(tokens, expert_index, combine_weight, weights, activation)
  return _ragged(tokens, expert_index, combine_weight, weights, activation, permute_backend)


@functools.lru_cache(maxsize=None)
def ragged_dot_flop_ratio(num_rows: int, d: int, f: int, num_experts: int, dtype: str = "float32") -> float:
  """XLA's FLOP count for ragged_dot([N, d], [E, d, f]) on the default backend / 2·N·d·f.

  1 for a grouped matmul; about E when XLA lowers it to a dense dot over every expert,
  masked per group (XLA:CPU always does; GPU backends may). Compiles once per shape.
  """
  shapes = (
    jax.ShapeDtypeStruct((num_rows, d), dtype),
    jax.ShapeDtypeStruct((num_experts, d, f), dtype),
    jax.ShapeDtypeStruct((num_experts,), jnp.int32),
  )
  cost = jax.jit(jax.lax.ragged_dot).lower(*shapes).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) / (2.0 * num_rows * d * f)


def _resolve_impl(impl: str, num_rows: int, wi: jax.Array, dtype) -> str:
  """'blocks', 'gather' or 'ragged_dot' for `impl`, never a dense ragged_dot without a warning."""
  accelerator = jax.default_backend() in ("gpu", "tpu")
  if impl in ("blocks", "gather"):
    return impl
  if impl == "auto" and not accelerator:
    return "gather" if num_rows <= GATHER_ROWS_PER_EXPERT * wi.shape[0] else "blocks"
  e, d, f = wi.shape
  ratio = ragged_dot_flop_ratio(num_rows, d, f, e, jnp.dtype(dtype).name)
  if e < 2 or ratio < 1.5:
    return "ragged_dot"
  message = (
    f"jax.lax.ragged_dot on {jax.default_backend()} computes every expert densely here "
    f"({ratio:.1f}× the grouped FLOPs for E={e})"
  )
  if impl == "auto":
    warnings.warn(message + "; dropless uses impl='blocks' instead", stacklevel=3)
    return "blocks"
  warnings.warn(message + "; impl='blocks' avoids that", stacklevel=3)
  return "ragged_dot"


def _sort_by_expert(expert_index: jax.Array, num_experts: int):
  """(order, rank, group_sizes): stable expert order of the flat choices, its inverse, n_e."""
  flat_expert = expert_index.reshape(-1)  # [N], choice t·K + k
  n = flat_expert.shape[0]
  order = jnp.argsort(flat_expert, stable=True).astype(jnp.int32)  # sorted position -> choice
  rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))  # choice -> position
  group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)  # [E]
  return order, rank, group_sizes


def _block_layout(expert_index: jax.Array, num_experts: int, block_size: int):
  """Where each choice sits in the padded, expert-sorted rows of B-row blocks.

  Returns (with N = T·K choices, flat choice index t·K + k, R = NB·B rows):
    row_map: a `kernels.RowMap` of the T tokens' K choices and the R rows; padding rows are
      empty (their token reads as T, a zero row).
    block_expert: <int32>[NB] the expert of each block (E−1 for spare blocks).
    num_used: <int32>[] Σ_e ceil(n_e / B), the blocks before the spare ones.
  """
  t, k = expert_index.shape
  n = t * k
  nb = num_blocks(n, num_experts, block_size)
  flat_expert = expert_index.reshape(-1)
  _, rank, group_sizes = _sort_by_expert(expert_index, num_experts)
  # Expert e's run starts at row padded_start[e] and spans ceil(n_e / B) whole blocks.
  padded_sizes = (group_sizes + block_size - 1) // block_size * block_size
  padded_start = jnp.cumsum(padded_sizes) - padded_sizes
  sorted_start = jnp.cumsum(group_sizes) - group_sizes
  row = padded_start[flat_expert] + rank - sorted_start[flat_expert]
  row = jnp.where(flat_expert < num_experts, row, nb * block_size)  # No expert: no row.
  row_map = kernels.RowMap.from_rows(row.reshape(t, k), nb * block_size)
  block_end = jnp.cumsum(padded_sizes) // block_size  # [E] one past each expert's last block
  block_expert = jnp.searchsorted(block_end, jnp.arange(nb), side="right")
  block_expert = jnp.minimum(block_expert, num_experts - 1).astype(jnp.int32)
  return row_map, block_expert, block_end[-1].astype(jnp.int32)


def _blocks(tokens, expert_index, combine_weight, weights, activation, block_size, permute_backend):
  """<[T, d]> Σ_k weight · expert output, the experts computed in one-expert blocks of B rows.

  weights: (wi, wo, wg, bi, bg, bo), the gate and the biases None where absent.
  """
  d = tokens.shape[1]
  row_map, block_expert, num_used = _block_layout(expert_index, weights[0].shape[0], block_size)
  # Padding rows are zero; with biases their FFN output is not, but the unpermute never reads
  # them (nor sends them a gradient, so the bias gradients see real rows only).
  x = kernels.permute(tokens, row_map, backend=permute_backend).reshape(-1, block_size, d)  # [NB, B, d]
  y = checkpoint_name(_block_ffn(x, block_expert, num_used, weights, activation), EXPERT_OUTPUT)  # [NB, B, d]
  return kernels.unpermute(y.reshape(-1, d), row_map, combine_weight, backend=permute_backend)


# The block loop is a while loop, so that spare blocks cost nothing; JAX cannot reverse-
# differentiate a while loop, and autodiff of a scan over all NB blocks was much slower (it
# stacks or carries per-block weight gradients). Hence a hand-written VJP: a second loop in
# which each block adds x_bᵀ·δ_b into a float32 [E, d, f] accumulator, in place.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _block_ffn(x, block_expert, num_used, weights, activation):
  """<[NB, B, d]> block b of x through expert block_expert[b]'s FFN, for b < num_used; 0 after."""
  return _block_ffn_loop(x, block_expert, num_used, weights, activation, save=False)[0]


def _add(x, bias, e):
  """x + bias[e], or x without a bias."""
  return x if bias is None else x + bias[e]


def _block_ffn_loop(x, block_expert, num_used, weights, activation, *, save):
  """The forward loop; with save, also the pre-activations [NB, B, f] the backward pass needs."""
  wi, wo, wg, bi, bg, bo = weights
  nb, bs, _ = x.shape
  hidden = (nb, bs, wi.shape[-1]) if save else (0,)

  def body(b, carry):
    y, h_all, gate_all = carry
    e = block_expert[b]
    h = _add(x[b] @ wi[e], bi, e)  # [B, f]
    gate = None if wg is None else _add(x[b] @ wg[e], bg, e)
    y = y.at[b].set(_add(activate(h, gate, activation) @ wo[e], bo, e))
    if save:
      h_all = h_all.at[b].set(h)
      gate_all = None if wg is None else gate_all.at[b].set(gate)
    return y, h_all, gate_all

  operands = (x, block_expert, num_used, wi, wo, wg)
  init = (
    _zeros_varying_like(x.shape, x.dtype, *operands),
    _zeros_varying_like(hidden, x.dtype, *operands),
    None if wg is None else _zeros_varying_like(hidden, x.dtype, *operands),
  )
  return jax.lax.fori_loop(0, num_used, body, init)


def _block_ffn_fwd(x, block_expert, num_used, weights, activation):
  y, h_all, gate_all = _block_ffn_loop(x, block_expert, num_used, weights, activation, save=True)
  return y, (x, block_expert, num_used, weights, h_all, gate_all)


def _block_ffn_bwd(activation, residuals, dy):
  x, block_expert, num_used, weights, h_all, gate_all = residuals
  wi, wo, wg, bi, bg, bo = weights
  f32 = functools.partial(jnp.dot, preferred_element_type=jnp.float32)

  def body(b, carry):
    dx, (dwi, dwo, dwg, dbi, dbg, dbo) = carry
    e = block_expert[b]
    gate = None if wg is None else gate_all[b]
    a, act_vjp = jax.vjp(lambda h, g: activate(h, g, activation), h_all[b], gate)
    dwo = dwo.at[e].add(f32(a.T, dy[b]))
    dh, dgate = act_vjp(dy[b] @ wo[e].T)  # [B, f] each
    dwi = dwi.at[e].add(f32(x[b].T, dh))
    dxb = dh @ wi[e].T
    if wg is not None:
      dwg = dwg.at[e].add(f32(x[b].T, dgate))
      dxb = dxb + dgate @ wg[e].T
    # Bias gradients: the row sums (padding rows get no gradient from the unpermute, so add 0).
    dbi = None if bi is None else dbi.at[e].add(dh.astype(jnp.float32).sum(0))
    dbg = None if bg is None else dbg.at[e].add(dgate.astype(jnp.float32).sum(0))
    dbo = None if bo is None else dbo.at[e].add(dy[b].astype(jnp.float32).sum(0))
    return dx.at[b].set(dxb), (dwi, dwo, dwg, dbi, dbg, dbo)

  operands = (x, block_expert, num_used, wi, wo, wg, h_all, gate_all, dy)
  zeros32 = lambda w: None if w is None else _zeros_varying_like(w.shape, jnp.float32, *operands)
  init = (_zeros_varying_like(x.shape, x.dtype, *operands), tuple(zeros32(w) for w in weights))
  dx, grads = jax.lax.fori_loop(0, num_used, body, init)
  # Replicated weights (inside shard_map) get the sum of every device's contribution.
  cast = lambda grad, w: None if w is None else _sum_to_variance_of(grad.astype(w.dtype), w)
  # x is the same on every 'model' device while tensor parallelism splits f: its cotangent is the sum.
  return _sum_to_variance_of(dx, x), None, None, tuple(cast(g, w) for g, w in zip(grads, weights))


_block_ffn.defvjp(_block_ffn_fwd, _block_ffn_bwd)


def _gathered(tokens, expert_index, combine_weight, weights, activation):
  """<[T, d]> each of the N assignments through its expert's weights, gathered for it ([N, d, f] copies).

  No sort and no loop: for a few assignments (decoding) this beats the block loop on CPU; the
  copies make it N/E times the weight traffic of reading every expert once, so it is for N of
  the order of E. Plain autodiff (the weight gradients scatter-add into [E, d, f]).
  """
  t, k = expert_index.shape
  wi, wo, wg, bi, bg, bo = weights
  index = expert_index.reshape(-1)  # [N]
  valid = index < wi.shape[0]  # E or more: no expert (expert parallelism's padding rows).
  index = jnp.where(valid, index, 0)
  x = jnp.repeat(tokens, k, axis=0)  # [N, d], token t's K rows together.
  bias = lambda b: 0 if b is None else b[index]
  h = jnp.einsum("nd,ndf->nf", x, wi[index]) + bias(bi)
  gate = None if wg is None else jnp.einsum("nd,ndf->nf", x, wg[index]) + bias(bg)
  y = jnp.einsum("nf,nfd->nd", activate(h, gate, activation), wo[index]) + bias(bo)  # [N, d]
  y = checkpoint_name(y, EXPERT_OUTPUT)
  weight = jnp.where(valid, combine_weight.reshape(-1), 0).astype(jnp.float32)
  out = (y.astype(jnp.float32) * weight[:, None]).reshape(t, k, -1).sum(axis=1)
  return out.astype(tokens.dtype)


def _ragged(tokens, expert_index, combine_weight, weights, activation, permute_backend):
  """<[T, d]> Σ_k weight · expert output, via grouped matmuls over the expert-sorted rows."""
  t, k = expert_index.shape
  num_experts = weights[0].shape[0]
  _, rank, group_sizes = _sort_by_expert(expert_index, num_experts)
  rank = jnp.where(expert_index.reshape(-1) < num_experts, rank, t * k)  # No expert: no row.
  row_map = kernels.RowMap.from_rows(rank.reshape(t, k), t * k)
  x = kernels.permute(tokens, row_map, backend=permute_backend)  # [N, d] in expert order
  y = checkpoint_name(_ragged_ffn(x, group_sizes, weights, activation), EXPERT_OUTPUT)  # [N, d]
  return kernels.unpermute(y, row_map, combine_weight, backend=permute_backend)


def _ragged_ffn(x, group_sizes, weights, activation):
  """<[N, d]> the expert-sorted rows x through their experts' FFNs (group_sizes[e] rows of expert e)."""
  wi, wo, wg, bi, bg, bo = weights
  # Each row's expert, for the biases (rows past Σ group_sizes are never read).
  row_expert = jnp.repeat(jnp.arange(wi.shape[0]), group_sizes, total_repeat_length=x.shape[0])
  h = _add(jax.lax.ragged_dot(x, wi, group_sizes), bi, row_expert)  # [N, f]
  gate = None if wg is None else _add(jax.lax.ragged_dot(x, wg, group_sizes), bg, row_expert)
  return _add(jax.lax.ragged_dot(activate(h, gate, activation), wo, group_sizes), bo, row_expert)
