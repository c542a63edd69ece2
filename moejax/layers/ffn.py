"""Feed-forward networks: the dense FFN and the stacked expert FFNs share one formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import parallel

ACTIVATIONS = ("gelu", "relu", "swiglu", "clamped_swiglu", "geglu")
GATED = ("swiglu", "clamped_swiglu", "geglu")  # Activations with a second input matrix wg (the "up" projection).
# gpt-oss's SwiGLU (its released swiglu_alpha and swiglu_limit).
CLAMPED_SWIGLU_ALPHA, CLAMPED_SWIGLU_LIMIT = 1.702, 7.0


def activate(h: jax.Array, gate: jax.Array | None, activation: str) -> jax.Array:
  """The hidden nonlinearity of every FFN and expert: h = x·wi, gate = x·wg (gated activations only).

  'gelu' (tanh approximation) and 'relu' of h; 'swiglu' silu(h) ⊙ gate; 'clamped_swiglu'
  gpt-oss's (clamp(gate, ±7) + 1) ⊙ h'·σ(1.702·h') with h' = min(h, 7); 'geglu' gelu(h) ⊙ gate
  (Grok-1's experts, tanh-approximated gelu as its JAX code's jax.nn.gelu).
  """
  if activation == "swiglu":
    return jax.nn.silu(h) * gate
  if activation == "geglu":
    return jax.nn.gelu(h) * gate
  if activation == "clamped_swiglu":
    h = jnp.minimum(h, CLAMPED_SWIGLU_LIMIT)
    up = jnp.clip(gate, -CLAMPED_SWIGLU_LIMIT, CLAMPED_SWIGLU_LIMIT)
    return (up + 1) * (h * jax.nn.sigmoid(CLAMPED_SWIGLU_ALPHA * h))
  if activation == "gelu":
    return jax.nn.gelu(h)
  if activation == "relu":
    return jax.nn.relu(h)
  raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def fan_in_init(scale: float, batch_axis: tuple[int, ...] = ()):
  """Truncated-normal init with variance scale/fan_in (Switch uses scale 0.1 for stability)."""
  return nnx.initializers.variance_scaling(
    scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=batch_axis
  )


def ffn_apply(
  x: jax.Array,
  wi: jax.Array,
  wo: jax.Array,
  wg: jax.Array | None,
  activation: str,
  spec_in: str,
  spec_out: str,
  biases: tuple | None = None,
) -> jax.Array:
  """FFN(x) = act(x·wi (+ bi) [, x·wg (+ bg)]) · wo (+ bo) with einsum specs, dense ([d,f]) or stacked ([E,d,f]).

  biases: (bi, bg, bo) shaped to broadcast against the hidden and output arrays (bg None without
  a gate), or None. Specs that open with "..." ("...d,df->...f", "...f,fd->...d") run on x
  flattened to [N, d], N the product of the leading dims, and the result takes x's leading dims
  back; the output equals the einsum on the unflattened x up to float rounding.
  """
  if x.ndim > 2 and spec_in.startswith("...") and spec_out.startswith("..."):
    # XLA:CPU forms the weight-gradient matmuls of a [B, L, d] einsum with transposes and copies,
    # which made forward+backward about twice as slow as on [B·L, d] (issue #11, point 9).
    y = ffn_apply(x.reshape(-1, x.shape[-1]), wi, wo, wg, activation, spec_in, spec_out, biases)  # [N, d]
    return y.reshape(*x.shape[:-1], y.shape[-1])
  bi, bg, bo = biases if biases is not None else (None, None, None)
  h = _plus(jnp.einsum(spec_in, x, wi.astype(x.dtype)), bi)
  gate = None if activation not in GATED else _plus(jnp.einsum(spec_in, x, wg.astype(x.dtype)), bg)
  return _plus(jnp.einsum(spec_out, activate(h, gate, activation), wo.astype(x.dtype)), bo)


def _plus(x: jax.Array, bias: jax.Array | None) -> jax.Array:
  return x if bias is None else x + bias.astype(x.dtype)


class FeedForward(nnx.Module):
  """Dense FFN, the baseline the MoE layer replaces: [..., d] -> [..., d]."""

  def __init__(self, d_model: int, d_ff: int, activation: str, init_scale: float, *, rngs: nnx.Rngs):
    init = fan_in_init(init_scale)
    self.activation = activation
    # [d, f] and [f, d], f named 'mlp': split over 'model' with tensor parallelism (moejax.parallel).
    self.wi = parallel.param(init(rngs.params(), (d_model, d_ff)), None, "mlp")
    self.wg = parallel.param(init(rngs.params(), (d_model, d_ff)), None, "mlp") if activation in GATED else None
    self.wo = parallel.param(init(rngs.params(), (d_ff, d_model)), "mlp", None)

  def __call__(self, x: jax.Array) -> jax.Array:
    wg = None if self.wg is None else self.wg[...]
    return ffn_apply(x, self.wi[...], self.wo[...], wg, self.activation, "...d,df->...f", "...f,fd->...d")
