"""Rotary position embeddings (RoPE, Su et al. 2021) and YaRN context extension (Peng et al. 2023).

Legend: B batch, L sequence length, N heads, H rotated dims per head.

Frequency i of H/2 turns position t by t·θ_i, θ_i = base^(-2i/H). Which dims form a pair:
  half-split   (i, i + H/2), transformers' `rotate_half` (Llama, Mixtral, Qwen, OLMoE, gpt-oss);
  interleaved  (2i, 2i + 1), the paper's and DeepSeek's (transformers' `rope_interleave`).
YaRN ('yarn') blends each frequency between extrapolation (θ_i, kept for the fast dims that turn
more than beta_fast times over the original context) and interpolation (θ_i / factor, for the
slow dims that turn fewer than beta_slow times), with a linear ramp between, and scales the
rotated queries and keys by an attention factor (0.1·ln(factor) + 1 by default). DeepSeek-V2/V3
also scale the softmax by mscale(factor, mscale_all_dim)² (`softmax_scale_factor`); the released
configs set mscale = mscale_all_dim, which makes the rotary attention factor 1. The formulas are
transformers' `_compute_yarn_parameters` (modeling_rope_utils.py), tested against a numpy
re-implementation of it in tests/test_rope.py.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SCALINGS = ("none", "yarn")


@dataclasses.dataclass(frozen=True)
class Rope:
  """Static RoPE settings: the config's model.rope_* and model.yarn_* fields (moejax/config/schema.py)."""

  rope_theta: float = 10000.0
  rope_interleaved: bool = False
  rope_scaling: str = "none"
  yarn_factor: float = 1.0
  yarn_original_max_len: int = 4096
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_truncate: bool = True
  yarn_mscale: float = 0.0  # 0: unset (transformers' None).
  yarn_mscale_all_dim: float = 0.0  # 0: unset.
  yarn_attention_factor: float = 0.0  # 0: derived from factor, mscale and mscale_all_dim.

  @classmethod
  def from_model(cls, model) -> Rope:
    """The Rope of a model config section or dataclass (its fields of the same names)."""
    return cls(**{f.name: getattr(model, f.name) for f in dataclasses.fields(cls)})

  def inv_frequencies(self, dim: int) -> np.ndarray:
    """<float32>[dim / 2]: θ_i of each rotated pair (float32 as transformers computes them)."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.float32(self.rope_theta) ** exponents
    extrapolation = np.float32(1.0) / pos_freqs
    if self.rope_scaling == "none":
      return extrapolation
    interpolation = np.float32(1.0) / (np.float32(self.yarn_factor) * pos_freqs)
    low, high = self._correction_range(dim)
    if low == high:
      high += 0.001  # transformers' guard against a zero-width ramp.
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    keep = np.float32(1.0) - ramp  # 1: extrapolate (fast dims), 0: interpolate (slow dims).
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)

  def _correction_range(self, dim: int) -> tuple[float, float]:
    """The dims between which YaRN's ramp runs: those turning beta_fast and beta_slow times over the context."""

    def dim_of(rotations):
      return dim * math.log(self.yarn_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(self.rope_theta))

    low, high = dim_of(self.yarn_beta_fast), dim_of(self.yarn_beta_slow)
    if self.yarn_truncate:
      low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)

  @property
  def attention_factor(self) -> float:
    """The factor on the rotated queries and keys (cos and sin): 1 without scaling."""
    if self.rope_scaling == "none":
      return 1.0
    if self.yarn_attention_factor:
      return self.yarn_attention_factor
    if self.yarn_mscale and self.yarn_mscale_all_dim:
      return _mscale(self.yarn_factor, self.yarn_mscale) / _mscale(self.yarn_factor, self.yarn_mscale_all_dim)
    return _mscale(self.yarn_factor)

  @property
  def softmax_scale_factor(self) -> float:
    """The factor on the attention logits (all dims): mscale(factor, mscale_all_dim)² under YaRN, else 1."""
    if self.rope_scaling == "none" or not self.yarn_mscale_all_dim:
      return 1.0
    return _mscale(self.yarn_factor, self.yarn_mscale_all_dim) ** 2


def _mscale(factor: float, mscale: float = 1.0) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def apply_rope(x: jax.Array, rope: Rope, positions: jax.Array | None = None) -> jax.Array:
  """x [B, L, N, H] (H even) rotated by position; the same dtype.

  positions: <int32>[L] (or [B, L]) of each token; None is 0..L-1 (a full sequence; decoding
  passes the cache offsets). Interleaved pairs come back in place ((2i, 2i+1) stay adjacent).
  """
  _, length, _, dim = x.shape
  if positions is None:
    positions = jnp.arange(length)
  inv_freq = jnp.asarray(rope.inv_frequencies(dim))
  angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [L, H/2] or [B, L, H/2]
  angle = angle[None, :, None, :] if angle.ndim == 2 else angle[:, :, None, :]
  factor = rope.attention_factor
  cos, sin = jnp.cos(angle) * factor, jnp.sin(angle) * factor
  x32 = x.astype(jnp.float32)
  if rope.rope_interleaved:
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
    rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
  else:
    half = dim // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
