"""Helpers for code that runs inside `jax.shard_map` with varying-manual-axis checks.

Shared by the Pallas kernels and `moejax.dropless` (kernels sit lowest in the layering).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _varying_axes(array: jax.Array | None) -> set:
  """The shard_map mesh axes over which `array` differs between devices (empty outside or None)."""
  if array is None:
    return set()
  aval = jax.typeof(array)
  manual = getattr(aval, "manual_axis_type", None)  # jax 0.10; other versions: aval.vma
  return set(manual.varying if manual is not None else getattr(aval, "vma", ()))


def _zeros_varying_like(shape, dtype, *like: jax.Array) -> jax.Array:
  """Zeros that vary over every shard_map mesh axis that any of `like` varies over."""
  axes = set().union(*(_varying_axes(a) for a in like))
  zeros = jnp.zeros(shape, dtype)
  return jax.lax.pcast(zeros, tuple(sorted(axes)), to="varying") if axes else zeros


def _sum_to_variance_of(grad: jax.Array, primal: jax.Array) -> jax.Array:
  """A cotangent for `primal`: summed over the devices of the axes `primal` is replicated on."""
  axes = _varying_axes(grad) - _varying_axes(primal)
  return jax.lax.psum(grad, tuple(sorted(axes))) if axes else grad
