"""Dropless expert FFN against a per-token numpy loop, a dense JAX reference, and across impls.

Tolerances: float32 results against a float64 numpy loop with activations of order 1:
rtol = atol = 1e-5. Gradients against the dense float32 JAX reference: rtol = atol = 2e-5.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import dropless
from moejax.dropless import dropless_expert_ffn


def _np_activation(h, gate, activation):
  """The activations of ffn_apply in float64 numpy (gelu: tanh approximation)."""
  if activation == "swiglu":
    return h / (1 + np.exp(-h)) * gate
  if activation == "gelu":
    return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
  return np.maximum(h, 0.0)


def _reference(tokens, expert_index, combine_weight, wi, wo, wg, activation):
  """Per-token loop in float64: out[t] += weight · FFN_e(x_t) for each choice (t, k)."""
  tokens, combine_weight, wi, wo = (np.asarray(a, np.float64) for a in (tokens, combine_weight, wi, wo))
  wg = None if wg is None else np.asarray(wg, np.float64)
  out = np.zeros_like(tokens)
  for t, x in enumerate(tokens):
    for k, e in enumerate(np.asarray(expert_index)[t]):
      gate = None if wg is None else x @ wg[e]
      out[t] += combine_weight[t, k] * (_np_activation(x @ wi[e], gate, activation) @ wo[e])
  return out


def _dense_jax(tokens, expert_index, combine_weight, wi, wo, wg, activation):
  """Every expert on every token, masked by the combine weights: E× the FLOPs, easy to trust."""
  h = jnp.einsum("td,edf->tef", tokens, wi)
  if activation == "swiglu":
    h = jax.nn.silu(h) * jnp.einsum("td,edf->tef", tokens, wg)
  else:
    h = jax.nn.gelu(h) if activation == "gelu" else jax.nn.relu(h)
  expert_out = jnp.einsum("tef,efd->ted", h, wo)
  weight = jnp.einsum("tk,tke->te", combine_weight, jax.nn.one_hot(expert_index, wi.shape[0]))
  return jnp.einsum("te,ted->td", weight, expert_out)


def _params(seed, t, k, e, d, f, activation):
  """Random tokens, combine weights and fan-in scaled expert weights."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[-2]), jnp.float32)
  tokens = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  combine_weight = jnp.asarray(rng.random((t, k)), jnp.float32)
  wg = normal(e, d, f) if activation == "swiglu" else None
  return tokens, combine_weight, normal(e, d, f), normal(e, f, d), wg


def _routing(seed, scenario, t, k, e):
  """<int32>[T, K] distinct choices per token, following `scenario`."""
  rng = np.random.default_rng(seed)
  scores = rng.random((t, e))
  if scenario == "uneven":  # Expert 0 is almost every token's first choice.
    scores[: t * 9 // 10, 0] = 2.0
  elif scenario == "empty_experts":  # Only experts 1, 4 and 5 are ever chosen.
    scores[:, [0, 2, 3, 6, 7]] = -1.0
  return jnp.asarray(np.argsort(-scores, axis=1)[:, :k], jnp.int32)


def test_hand_checkable_case():
  # d = f = 1, relu, wi = 1 and wo[e] = e + 1: expert e maps x to (e + 1)·relu(x).
  tokens = jnp.array([[1.0], [2.0], [-1.0], [3.0]])
  expert_index = jnp.array([[0, 2], [2, 1], [0, 1], [2, 0]], jnp.int32)
  combine_weight = jnp.array([[0.5, 0.5], [1.0, 0.0], [1.0, 1.0], [0.25, 0.75]])
  wi = jnp.ones((3, 1, 1))
  wo = jnp.array([1.0, 2.0, 3.0]).reshape(3, 1, 1)
  # t0: .5·1 + .5·3 = 2; t1: 1·(3·2) + 0·(2·2) = 6; t2: relu(−1) = 0; t3: .25·(3·3) + .75·(1·3) = 4.5.
  expected = [[2.0], [6.0], [0.0], [4.5]]
  for impl in ("blocks", "ragged_dot", "gather"):
    fn = jax.jit(lambda *a, impl=impl: dropless_expert_ffn(*a, None, "relu", impl=impl, block_size=2))
    np.testing.assert_allclose(fn(tokens, expert_index, combine_weight, wi, wo), expected, rtol=1e-6, err_msg=impl)


def test_block_layout_hand_checkable():
  # 3 tokens, K = 2, E = 4, B = 2. Choices in order: (t0,e2) (t0,e0) (t1,e1) (t1,e0) (t2,e2) (t2,e1).
  row_map, block_expert, num_used = dropless._block_layout(
    jnp.array([[2, 0], [1, 0], [2, 1]], jnp.int32), num_experts=4, block_size=2
  )
  # e0's run is block 0 (t0, t1), e1's block 1 (t1, t2), e2's block 2 (t0, t2); e3 is empty.
  # NB = (6 + 4·1) // 2 = 5 blocks, so blocks 3 and 4 are spare and read the zero row (token 3).
  np.testing.assert_array_equal(row_map.row_of_choice, [[4, 0], [2, 1], [5, 3]])
  np.testing.assert_array_equal(row_map.token_of_row, [0, 1, 1, 2, 0, 2, 3, 3, 3, 3])
  # The choice (t·K + k) in each row; empty rows hold N = 6.
  np.testing.assert_array_equal(row_map.choice_of_row, [1, 3, 2, 5, 0, 4, 6, 6, 6, 6])
  np.testing.assert_array_equal(block_expert[:3], [0, 1, 2])
  assert int(num_used) == 3


def test_block_layout_pads_each_expert_to_whole_blocks():
  # T = 5, K = 1, B = 2: e0 takes t1, t4 (one full block), e1 none, e2 takes t0, t2, t3
  # (a full block, then t3 and a padding row).
  row_map, block_expert, num_used = dropless._block_layout(
    jnp.array([[2], [0], [2], [2], [0]], jnp.int32), num_experts=3, block_size=2
  )
  np.testing.assert_array_equal(row_map.token_of_row, [1, 4, 0, 2, 3, 5, 5, 5])
  np.testing.assert_array_equal(block_expert[:3], [0, 2, 2])
  assert int(num_used) == 3


# Each case compiles twice (XLA:CPU compiles take ~1 s), so scenarios and activations are
# paired rather than crossed; every activation and every scenario appears.
@pytest.mark.parametrize(
  "scenario,activation,t,k,e,block_size",
  [
    ("uneven", "gelu", 45, 2, 6, 8),
    ("empty_experts", "swiglu", 30, 2, 8, 4),
    ("uniform", "relu", 37, 1, 5, 8),  # K = 1, T not a multiple of B.
    ("uniform", "swiglu", 29, 3, 7, 64),  # K = 3, one block per expert holds all its tokens.
    ("uneven", "relu", 50, 3, 6, 4),
  ],
)
def test_matches_per_token_loop(scenario, activation, t, k, e, block_size):
  expert_index = _routing(t + e, scenario, t, k, e)
  tokens, combine_weight, wi, wo, wg = _params(t, t, k, e, d=8, f=16, activation=activation)
  expected = _reference(tokens, expert_index, combine_weight, wi, wo, wg, activation)
  for impl in ("blocks", "ragged_dot", "gather"):
    fn = jax.jit(
      lambda *args, impl=impl: dropless_expert_ffn(*args, activation=activation, impl=impl, block_size=block_size)
    )
    out = fn(tokens, expert_index, combine_weight, wi, wo, wg)
    assert out.shape == tokens.shape and out.dtype == tokens.dtype
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=impl)


@pytest.mark.parametrize("block_size", [1, 5])
def test_blocks_equals_ragged_dot(block_size):
  # Random routing that may repeat an expert within a token: each choice is still computed.
  t, k, e = 50, 2, 6
  expert_index = jnp.asarray(np.random.default_rng(block_size).integers(0, e, (t, k)), jnp.int32)
  tokens, combine_weight, wi, wo, wg = _params(block_size, t, k, e, d=8, f=16, activation="gelu")
  outs = [
    jax.jit(lambda *a, impl=impl: dropless_expert_ffn(*a, "gelu", impl=impl, block_size=block_size))(
      tokens, expert_index, combine_weight, wi, wo, wg
    )
    for impl in ("blocks", "ragged_dot", "gather")
  ]
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "activation,impl", [("gelu", "blocks"), ("swiglu", "blocks"), ("relu", "ragged_dot"), ("swiglu", "gather")]
)
def test_gradients_match_dense_reference(activation, impl):
  t, k, e = 40, 2, 8
  expert_index = _routing(3, "empty_experts", t, k, e)  # Experts 0, 2, 3, 6 and 7 are empty.
  tokens, combine_weight, wi, wo, wg = _params(4, t, k, e, d=8, f=16, activation=activation)
  combine_weight = combine_weight.at[5, 1].set(0.0)  # Routed, but contributes nothing.
  cotangent = jnp.asarray(np.random.default_rng(5).normal(size=tokens.shape), jnp.float32)

  def loss(fn, tokens, combine_weight, wi, wo, wg):
    return jnp.sum(cotangent * jnp.sin(fn(tokens, expert_index, combine_weight, wi, wo, wg, activation)))

  argnums = (0, 1, 2, 3, 4) if activation == "swiglu" else (0, 1, 2, 3)
  dropless_fn = lambda *args: dropless_expert_ffn(*args, impl=impl, block_size=4)
  got = jax.jit(jax.grad(lambda *a: loss(dropless_fn, *a), argnums=argnums))(tokens, combine_weight, wi, wo, wg)
  want = jax.jit(jax.grad(lambda *a: loss(_dense_jax, *a), argnums=argnums))(tokens, combine_weight, wi, wo, wg)
  for name, g, w in zip(["tokens", "combine_weight", "wi", "wo", "wg"], got, want):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=name)
    assert np.abs(np.asarray(w)).max() > 1e-3, name  # The reference gradient is not trivially 0.
  # The combine-weight gradient of the zero-weight choice is still that expert's output.
  assert abs(float(got[1][5, 1])) > 1e-4
  # Empty experts get exactly zero weight gradients.
  for g in got[2:]:
    np.testing.assert_array_equal(g[np.array([0, 2, 3, 6, 7])], 0.0)


def test_jit_compiles_once_for_any_routing():
  t, k, e = 33, 2, 5
  tokens, combine_weight, wi, wo, wg = _params(0, t, k, e, d=8, f=16, activation="relu")
  fn = jax.jit(
    lambda ei: dropless_expert_ffn(tokens, ei, combine_weight, wi, wo, wg, "relu", impl="blocks", block_size=4)
  )
  for scenario in ("uniform", "uneven"):  # Block counts per expert differ, shapes do not.
    expert_index = _routing(1, scenario, t, k, e)
    expected = _reference(tokens, expert_index, combine_weight, wi, wo, wg, "relu")
    np.testing.assert_allclose(fn(expert_index), expected, rtol=1e-5, atol=1e-5, err_msg=scenario)
  assert fn._cache_size() == 1


def test_vmap_over_groups():
  # Two groups with different loads: the block loop's trip count differs per group.
  t, k, e = 24, 2, 4
  tokens, combine_weight, wi, wo, _ = _params(2, 2 * t, k, e, d=8, f=16, activation="gelu")
  tokens, combine_weight = tokens.reshape(2, t, 8), combine_weight.reshape(2, t, k)
  expert_index = jnp.stack([_routing(0, "uneven", t, k, e), _routing(1, "uniform", t, k, e)])
  per_group = lambda fn: jax.vmap(lambda x, ei, cw, wi: fn(x, ei, cw, wi, wo, None, "gelu"), in_axes=(0, 0, 0, None))
  blocks = per_group(lambda *a: dropless_expert_ffn(*a, impl="blocks", block_size=4))
  out = jax.jit(blocks)(tokens, expert_index, combine_weight, wi)
  grad = jax.jit(jax.grad(lambda wi: jnp.sum(jnp.sin(blocks(tokens, expert_index, combine_weight, wi)))))(wi)
  for g in range(2):
    expected = _reference(tokens[g], expert_index[g], combine_weight[g], wi, wo, None, "gelu")
    np.testing.assert_allclose(out[g], expected, rtol=1e-5, atol=1e-5)
  dense = per_group(_dense_jax)
  want = jax.jit(jax.grad(lambda wi: jnp.sum(jnp.sin(dense(tokens, expert_index, combine_weight, wi)))))(wi)
  np.testing.assert_allclose(grad, want, rtol=2e-5, atol=2e-5)


def _dot_flops(stablehlo: str) -> list[int]:
  """FLOPs of every dot_general in StableHLO text: 2 · |output| · |contracted dims|."""
  flops = []
  pattern = (
    r"stablehlo\.dot_general .*contracting_dims = \[([\d, ]*)\] x .*"
    r": \(tensor<([\dx]+)x\w+>, tensor<[\dx]+x\w+>\) -> tensor<([\dx]+)x\w+>"
  )
  for contracting, lhs, out in re.findall(pattern, stablehlo):
    lhs_shape = [int(n) for n in lhs.split("x")]
    contracted = np.prod([lhs_shape[int(i)] for i in contracting.split(",") if i.strip()], dtype=np.int64)
    flops.append(int(2 * np.prod([int(n) for n in out.split("x")], dtype=np.int64) * contracted))
  return flops


def test_blocks_do_not_compute_every_expert():
  # XLA's cost_analysis counts a while-loop body once, whatever its trip count, so the bound is
  # taken from the program instead: no loop runs more than NB times, hence the matmul FLOPs are
  # at most NB · Σ (FLOPs of every dot in the program), whatever the routing.
  t, k, e, d, f, block_size = 256, 2, 16, 32, 64, 16
  tokens, combine_weight, wi, wo, wg = _params(0, t, k, e, d, f, activation="swiglu")
  expert_index = _routing(0, "uniform", t, k, e)
  nb = dropless.num_blocks(t * k, e, block_size)
  dense_forward = 2 * 3 * t * e * d * f  # three [d, f] matrices of each expert on every token

  def lowered(fn, grad):
    traced = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 2, 3, 4, 5)) if grad else fn
    return jax.jit(traced).lower(tokens, expert_index, combine_weight, wi, wo, wg).as_text()

  blocks = lambda *a: dropless_expert_ffn(*a, "swiglu", impl="blocks", block_size=block_size)
  dense = lambda *a: _dense_jax(*a, "swiglu")
  for grad, passes in [(False, 1), (True, 3)]:  # The backward pass costs twice the forward.
    block_dots = _dot_flops(lowered(blocks, grad))
    assert max(block_dots) <= 2 * block_size * max(d, f) * max(d, f)  # one block at a time
    assert nb * sum(block_dots) < 0.25 * passes * dense_forward
    # The same measure sees the E× work of the dense reference: the check can fail.
    assert sum(_dot_flops(lowered(dense, grad))) >= passes * dense_forward
  # dropless_flops agrees: the worst case pays N + E·(B−1) rows, not E·T.
  ideal, worst = dropless.dropless_flops(t * k, d, f, e, block_size, "swiglu")
  assert ideal == dense_forward * k // e and worst < 0.25 * dense_forward


@pytest.mark.parametrize("tokens_count, expected", [(8, "gather"), (9, "blocks")])
def test_auto_on_cpu_gathers_a_few_rows_and_uses_blocks_above(tokens_count, expected):
  """E = 4, K = 2: N = 16 = GATHER_ROWS_PER_EXPERT·E assignments gather, 18 go through the block loop."""
  tokens, combine_weight, wi, wo, wg = _params(0, tokens_count, 2, 4, d=4, f=8, activation="relu")
  expert_index = _routing(0, "uniform", tokens_count, 2, 4)
  text = lambda impl: (
    jax.jit(lambda *a: dropless_expert_ffn(*a, "relu", impl=impl))
    .lower(tokens, expert_index, combine_weight, wi, wo, wg)
    .as_text()
  )
  assert jax.default_backend() == "cpu" and dropless.GATHER_ROWS_PER_EXPERT == 4
  assert text("auto") == text(expected) != text("ragged_dot")
  assert text("blocks") != text("gather")


def test_rejects_bad_options():
  tokens, combine_weight, wi, wo, wg = _params(0, 4, 1, 2, d=4, f=8, activation="swiglu")
  expert_index = jnp.zeros((4, 1), jnp.int32)
  with pytest.raises(ValueError, match="activation"):
    dropless_expert_ffn(tokens, expert_index, combine_weight, wi, wo, None, "tanh")
  with pytest.raises(ValueError, match="wg"):
    dropless_expert_ffn(tokens, expert_index, combine_weight, wi, wo, None, "swiglu")
  with pytest.raises(ValueError, match="wg"):
    dropless_expert_ffn(tokens, expert_index, combine_weight, wi, wo, wg, "gelu")
  with pytest.raises(ValueError, match="impl"):
    dropless_expert_ffn(tokens, expert_index, combine_weight, wi, wo, wg, "swiglu", impl="dense")


def test_dense_ragged_dot_is_detected_and_never_taken_silently(monkeypatch):
  # XLA:CPU lowers ragged_dot to a dense dot over every expert: the FLOP check sees ~E×.
  assert dropless.ragged_dot_flop_ratio(64, 8, 16, 4) >= 3.5
  tokens, combine_weight, wi, wo, wg = _params(0, 8, 2, 4, d=4, f=8, activation="relu")
  expert_index = _routing(0, "uniform", 8, 2, 4)
  with pytest.warns(UserWarning, match="computes every expert densely"):
    dropless_expert_ffn(tokens, expert_index, combine_weight, wi, wo, wg, "relu", impl="ragged_dot")
  # On an accelerator whose XLA also lowers it densely, 'auto' falls back to blocks, loudly.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.warns(UserWarning, match="uses impl='blocks' instead"):
    assert dropless._resolve_impl("auto", 16, wi, jnp.float32) == "blocks"
