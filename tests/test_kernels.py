"""Token permutation kernels: Pallas (interpret mode, both variants) == XLA == a numpy loop.

The Pallas variants run here in interpret mode only (CPU). `test_lowers_for_gpu_and_tpu` also
lowers them for 'cuda' (Triton IR) and 'tpu' (Mosaic IR) without the hardware; compiling that
IR (Triton -> PTX, Mosaic's layout passes in libtpu) has not been tried.

Tolerances: float32 sums of at most a dozen terms of order 1: 1e-6.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from by_token import inverse_map, permute_by_token, unpermute_by_token
from moejax.kernels import RowMap, permute, unpermute
from moejax.parallel import make_mesh

TOL = dict(rtol=1e-6, atol=1e-6)
# (backend, platform): the XLA path and the two Pallas kernel variants, with small blocks so
# that the grids have several steps and the sizes below are ragged against them.
IMPLS = [("xla", None), ("pallas", "gpu"), ("pallas", "tpu")]
BLOCKS = dict(block_rows=8, block_d=8)


def _kwargs(backend, platform, **extra):
  blocks = {} if backend == "xla" else dict(BLOCKS, block_d=None if platform == "tpu" else 8)
  return dict(backend=backend, platform=platform, **blocks, **extra)


def _np_permute(x, token_of_row):
  out = np.zeros((len(token_of_row), x.shape[1]))
  for r, t in enumerate(token_of_row):
    if 0 <= t < len(x):
      out[r] = x[t]
  return out


def _np_unpermute(y, token_of_row, weight_of_row, num_tokens):
  out = np.zeros((num_tokens, y.shape[1]))
  for r, t in enumerate(token_of_row):
    if 0 <= t < num_tokens:
      out[t] += weight_of_row[r] * y[r]
  return out


def _random_case(seed, t=16, d=12, r=20):
  """Rows with empty entries (T, −1, past T), dropped tokens, and token 5 in 5 rows."""
  rng = np.random.default_rng(seed)
  token_of_row = rng.integers(0, t // 2, r)  # tokens t//2.. have no row: dropped
  token_of_row[token_of_row == 5] = 6
  token_of_row[[0, 7, 13]] = [t, -1, t + 3]  # empty rows
  token_of_row[rng.choice(np.setdiff1d(np.arange(r), [0, 7, 13]), 5, replace=False)] = 5  # uneven
  x = rng.normal(size=(t, d)).astype(np.float32)
  y = rng.normal(size=(r, d)).astype(np.float32)
  weight = rng.random(r).astype(np.float32)
  return x, y, token_of_row.astype(np.int32), weight


def test_hand_checked_case():
  # 4 tokens, 6 rows. Token 2 fills rows 0 and 3, token 0 row 1, token 1 row 5; rows 2 and 4
  # are empty (token 4 = T, and −1); token 3 has no row (dropped), so it unpermutes to 0.
  x = jnp.asarray([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
  token_of_row = jnp.asarray([2, 0, 4, 2, -1, 1])
  weight = jnp.asarray([0.5, 1.0, 9.0, 0.25, 9.0, 2.0])
  rows = [[3, 30], [1, 10], [0, 0], [3, 30], [0, 0], [2, 20]]
  tokens = [[1, 10], [4, 40], [(0.5 + 0.25) * 3, (0.5 + 0.25) * 30], [0, 0]]
  for backend, platform in IMPLS:
    y = permute_by_token(x, token_of_row, **_kwargs(backend, platform))
    np.testing.assert_allclose(y, rows, err_msg=f"{backend} {platform}")
    out = unpermute_by_token(y, token_of_row, weight, 4, **_kwargs(backend, platform))  # K = R = 6
    np.testing.assert_allclose(out, tokens, err_msg=f"{backend} {platform}")
  np.testing.assert_array_equal(inverse_map(token_of_row, 4, 2), [[1, -1], [5, -1], [0, 3], [-1, -1]])


@pytest.mark.parametrize(
  "backend,platform,max_rows_per_token",
  [("xla", None, None), ("pallas", "gpu", 5), ("pallas", "gpu", 2), ("pallas", "tpu", 5)],
)
def test_matches_numpy_loop(backend, platform, max_rows_per_token):
  # K = 5 is token 5's load, the exact bound; K = 2 is too small and takes the XLA fallback
  # (a cond around either variant: tried with one). The hand-checked case covers None.
  x, y, token_of_row, weight = _random_case(0)
  kw = _kwargs(backend, platform, max_rows_per_token=max_rows_per_token)
  np.testing.assert_allclose(permute_by_token(x, token_of_row, **kw), _np_permute(x, token_of_row), **TOL)
  np.testing.assert_allclose(
    unpermute_by_token(y, token_of_row, weight, len(x), **kw), _np_unpermute(y, token_of_row, weight, len(x)), **TOL
  )


def test_inverse_map_lists_rows_in_order():
  _, _, token_of_row, _ = _random_case(1)
  rows_of_token = np.asarray(inverse_map(token_of_row, 16, 5))
  for t in range(16):
    expected = np.flatnonzero(token_of_row == t)
    np.testing.assert_array_equal(rows_of_token[t], np.pad(expected, (0, 5 - len(expected)), constant_values=-1))


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_gradients_match_xla(platform):
  x, y, token_of_row, weight = _random_case(2)
  cot_rows, cot_tokens = (jnp.asarray(np.random.default_rng(3).normal(size=s), jnp.float32) for s in (y.shape, x.shape))

  def loss(x, y, weight, backend, platform):
    kw = _kwargs(backend, platform, max_rows_per_token=5)
    rows = permute_by_token(x, token_of_row, **kw)
    tokens = unpermute_by_token(y * rows, token_of_row, weight, len(x), **kw)
    return jnp.sum(cot_rows * rows) + jnp.sum(cot_tokens * tokens)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=(3, 4))
  for got, want in zip(grads(x, y, weight, "pallas", platform), grads(x, y, weight, "xla", None)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  # And the XLA path's custom VJP against plain autodiff of the numpy-like definition.
  def plain(x, y, weight):
    rows = (
      jnp.where((token_of_row >= 0) & (token_of_row < len(x)), 1.0, 0.0)[:, None]
      * x[jnp.clip(token_of_row, 0, len(x) - 1)]
    )
    tokens = jax.ops.segment_sum(weight[:, None] * y * rows, token_of_row, len(x))
    return jnp.sum(cot_rows * rows) + jnp.sum(cot_tokens * tokens)

  for got, want in zip(grads(x, y, weight, "xla", None), jax.grad(plain, argnums=(0, 1, 2))(x, y, weight)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("platform,check_vma", [("tpu", True), ("gpu", False)])
def test_inside_shard_map_equals_one_device(platform, check_vma):
  # Each of 2 devices permutes its own 8 tokens into its own 12 rows; the row weights are
  # replicated, so their gradient is the sum of both devices' gradients. The 'gpu' variant
  # runs under jax's generic interpreter, which on jax 0.10 is not varying-axis aware
  # (its grid loop fails the check), hence check_vma=False for it; compiled kernels and the
  # TPU interpreter need no such thing.
  rng = np.random.default_rng(4)
  t, r, d = 8, 12, 8
  x = jnp.asarray(rng.normal(size=(2 * t, d)), jnp.float32)
  token_of_row = jnp.asarray(rng.integers(0, t + 2, 2 * r), jnp.int32)  # t, t+1: empty rows
  weight = jnp.asarray(rng.random(r), jnp.float32)  # replicated

  def per_device(x, token_of_row, weight, backend="pallas"):
    kw = _kwargs(backend, platform if backend == "pallas" else None, max_rows_per_token=3)
    rows = permute_by_token(x, token_of_row, **kw)
    return unpermute_by_token(jnp.sin(rows), token_of_row, weight, x.shape[0], **kw)

  sharded = jax.shard_map(
    per_device, mesh=make_mesh(2), in_specs=(P("data"), P("data"), P()), out_specs=P("data"), check_vma=check_vma
  )
  loss = lambda f: lambda *args: jnp.sum(f(*args) ** 2)
  out, grads = jax.jit(jax.value_and_grad(loss(sharded), argnums=(0, 2)))(x, token_of_row, weight)
  singles = [
    jax.value_and_grad(loss(functools.partial(per_device, backend="xla")), argnums=(0, 2))(
      x[i * t : (i + 1) * t], token_of_row[i * r : (i + 1) * r], weight
    )
    for i in range(2)
  ]
  np.testing.assert_allclose(out, singles[0][0] + singles[1][0], rtol=1e-5)
  np.testing.assert_allclose(grads[0], jnp.concatenate([s[1][0] for s in singles]), **TOL)
  np.testing.assert_allclose(grads[1], singles[0][1][1] + singles[1][1][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "platform,target,marker", [("gpu", "cuda", "xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")]
)
def test_lowers_for_gpu_and_tpu(platform, target, marker):
  # Forward and backward, non-interpret, lowered for the accelerator: 4 kernels (permute,
  # unpermute and their gradients), with power-of-2 (Triton) and (8, 128)-tiled (TPU) blocks.
  t, r, d = 64, 128, 256

  def loss(x, token_of_row, weight):
    kw = dict(backend="pallas", platform=platform, interpret=False, max_rows_per_token=2)
    return jnp.sum(unpermute_by_token(permute_by_token(x, token_of_row, **kw), token_of_row, weight, t, **kw) ** 2)

  args = (
    jax.ShapeDtypeStruct((t, d), jnp.float32),
    jax.ShapeDtypeStruct((r,), jnp.int32),
    jax.ShapeDtypeStruct((r,), jnp.float32),
  )
  hlo = jax.jit(jax.grad(loss, argnums=(0, 2))).trace(*args).lower(lowering_platforms=(target,)).as_text()
  assert hlo.count(marker) == 4


def test_auto_is_xla_on_cpu_and_options_are_checked():
  x, y, token_of_row, weight = _random_case(6)
  np.testing.assert_array_equal(permute_by_token(x, token_of_row), permute_by_token(x, token_of_row, backend="xla"))
  with pytest.raises(ValueError, match="backend must be one of"):
    permute_by_token(x, token_of_row, backend="triton")
  with pytest.raises(ValueError, match="platform must be one of"):
    unpermute_by_token(y, token_of_row, weight, 16, backend="pallas", platform="cpu")


# --- The two-sided RowMap ops (what the dispatchers call) -------------------------------------


def _random_row_map(seed, t=13, k=3, r=40, drop=0.25):
  """A RowMap of T tokens' K choices onto distinct rows out of R, with dropped choices."""
  rng = np.random.default_rng(seed)
  rows = rng.permutation(r)[: t * k].reshape(t, k)
  rows[rng.random((t, k)) < drop] = r  # dropped: no row
  return RowMap.from_rows(jnp.asarray(rows, jnp.int32), r), rows


def test_row_map_hand_checked_case():
  # 3 tokens, K = 2, 5 rows. t0 -> rows 3, 0; t1 -> row 4 and a dropped choice; t2 -> row 1.
  # Row 2 is empty. Choices t·K + k: row 0 holds choice 1, row 1 choice 4, row 3 choice 0, row 4 choice 2.
  row_map = RowMap.from_rows(jnp.asarray([[3, 0], [4, 5], [1, -1]]), 5)
  np.testing.assert_array_equal(row_map.row_of_choice, [[3, 0], [4, 5], [1, 5]])
  np.testing.assert_array_equal(row_map.choice_of_row, [1, 4, 6, 0, 2])
  np.testing.assert_array_equal(row_map.token_of_row, [0, 2, 3, 0, 1])  # token 3 = T: empty
  x = jnp.asarray([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
  weight = jnp.asarray([[0.5, 0.25], [2.0, 9.0], [1.0, 9.0]])
  for backend, platform in IMPLS:
    kw = _kwargs(backend, platform)
    rows = permute(x, row_map, **kw)
    np.testing.assert_allclose(rows, [[1, 10], [3, 30], [0, 0], [1, 10], [2, 20]], err_msg=f"{backend} {platform}")
    # t0: .5·row3 + .25·row0 = .75·x0; t1: 2·row4 (its dropped choice adds 0); t2: 1·row1.
    out = unpermute(rows, row_map, weight, **kw)
    np.testing.assert_allclose(out, [[0.75, 7.5], [4, 40], [3, 30]], err_msg=f"{backend} {platform}")


@pytest.mark.parametrize("k", [3, 12])  # 12 > MAX_GATHER_K: rows are scatter-added into tokens
def test_row_map_ops_and_gradients_match_numpy_and_autodiff(k):
  row_map, rows = _random_row_map(k, t=7, k=k, r=100)
  rng = np.random.default_rng(10 + k)
  t, r, d = rows.shape[0], 100, 12
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(r, d)), jnp.float32)
  weight = jnp.asarray(rng.random((t, k)), jnp.float32)
  # numpy: a loop over choices.
  want_rows, want_tokens = np.zeros((r, d)), np.zeros((t, d))
  for i in range(t):
    for j in range(k):
      if rows[i, j] < r:
        want_rows[rows[i, j]] = x[i]
        want_tokens[i] += weight[i, j] * y[rows[i, j]]
  cot_rows, cot_tokens = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((r, d), (t, d)))

  def loss(x, y, weight, backend, platform):
    kw = _kwargs(backend, platform)
    moved = permute(x, row_map, **kw)
    return jnp.sum(cot_rows * moved) + jnp.sum(cot_tokens * unpermute(y * moved, row_map, weight, **kw))

  def plain(x, y, weight):  # autodiff of jnp gathers and a segment sum: the reference
    padded = jnp.concatenate([x, jnp.zeros((1, d))])
    moved = padded[row_map.token_of_row]
    summed = jax.ops.segment_sum(
      (weight.reshape(-1, 1) * jnp.concatenate([y * moved, jnp.zeros((1, d))])[row_map.row_of_choice.reshape(-1)]),
      jnp.repeat(jnp.arange(t), k),
      t,
    )
    return jnp.sum(cot_rows * moved) + jnp.sum(cot_tokens * summed)

  for backend, platform in IMPLS:
    kw = _kwargs(backend, platform)
    np.testing.assert_allclose(permute(x, row_map, **kw), want_rows, **TOL)
    np.testing.assert_allclose(unpermute(y, row_map, weight, **kw), want_tokens, rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=(3, 4))(x, y, weight, backend, platform)
    for got, want in zip(grads, jax.grad(plain, argnums=(0, 1, 2))(x, y, weight)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{backend} {platform}")
