"""Feed-forward networks: the dense FFN and the stacked expert FFNs share one formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = ("gelu", "relu", "swiglu")


def fan_in_init(scale: float, batch_axis: tuple[int, ...] = ()):
  """Truncated-normal init with variance scale/fan_in (Switch uses scale 0.1 for stability)."""
  return nnx.initializers.variance_scaling(
    scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=batch_axis
  )


def ffn_apply(
  x: jax.Array, wi: jax.Array, wo: jax.Array, wg: jax.Array | None, activation: str, spec_in: str, spec_out: str
) -> jax.Array:
  """FFN(x) = act(x·wi [⊙ x·wg]) · wo with einsum specs, for dense ([d,f]) or stacked ([E,d,f]) weights.

  Specs that open with "..." ("...d,df->...f", "...f,fd->...d") run on x flattened to [N, d], N the
  product of the leading dims, and the result takes x's leading dims back; the output equals the
  einsum on the unflattened x up to float rounding.
  """
  if x.ndim > 2 and spec_in.startswith("...") and spec_out.startswith("..."):
    # XLA:CPU forms the weight-gradient matmuls of a [B, L, d] einsum with transposes and copies,
    # which made forward+backward about twice as slow as on [B·L, d] (issue #11, point 9).
    y = ffn_apply(x.reshape(-1, x.shape[-1]), wi, wo, wg, activation, spec_in, spec_out)  # [N, d]
    return y.reshape(*x.shape[:-1], y.shape[-1])
  h = jnp.einsum(spec_in, x, wi.astype(x.dtype))
  if activation == "swiglu":
    h = jax.nn.silu(h) * jnp.einsum(spec_in, x, wg.astype(x.dtype))
  elif activation == "gelu":
    h = jax.nn.gelu(h)
  elif activation == "relu":
    h = jax.nn.relu(h)
  else:
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
  return jnp.einsum(spec_out, h, wo.astype(x.dtype))


class FeedForward(nnx.Module):
  """Dense FFN, the baseline the MoE layer replaces: [..., d] -> [..., d]."""

  def __init__(self, d_model: int, d_ff: int, activation: str, init_scale: float, *, rngs: nnx.Rngs):
    init = fan_in_init(init_scale)
    self.activation = activation
    self.wi = nnx.Param(init(rngs.params(), (d_model, d_ff)))
    self.wg = nnx.Param(init(rngs.params(), (d_model, d_ff))) if activation == "swiglu" else None
    self.wo = nnx.Param(init(rngs.params(), (d_ff, d_model)))

  def __call__(self, x: jax.Array) -> jax.Array:
    wg = None if self.wg is None else self.wg[...]
    return ffn_apply(x, self.wi[...], self.wo[...], wg, self.activation, "...d,df->...f", "...f,fd->...d")
