"""Auxiliary router losses (REFERENCES.md, "Losses").

Legend: G groups, S tokens per group, E experts, K choices per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOAD_BALANCE_DENSITIES = ("top1", "topk")


def load_balance_loss(probs: jax.Array, expert_index: jax.Array, density: str = "top1") -> jax.Array:
  """Switch load-balance loss E·Σ_e f_e·P_e, computed per group then averaged over groups.

  Args:
    probs: <float32>[G, S, E] router probabilities.
    expert_index: <int32>[G, S, K] chosen experts, best first (before any dropping).
    density: 'top1': f_e = share of tokens whose first choice is e (Switch);
      'topk': f_e = share of the S·K choices that picked e (any-of-top-K, normalized so that
      Σ_e f_e = 1 and a perfectly balanced router scores 1 for every K).

  Returns:
    <float32>[] the loss, 1.0 for a perfectly balanced router. Multiply by the coefficient α.
  """
  num_experts = probs.shape[-1]
  if density == "top1":
    chosen = expert_index[..., :1]
  elif density == "topk":
    chosen = expert_index
  else:
    raise ValueError(f"density must be one of {LOAD_BALANCE_DENSITIES}, got {density!r}")
  counts = jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32).sum(axis=2)  # [G, S, E]
  fraction = counts.mean(axis=1) / chosen.shape[-1]  # [G, E]
  mean_prob = probs.astype(jnp.float32).mean(axis=1)  # [G, E]
  return (num_experts * jnp.sum(fraction * mean_prob, axis=-1)).mean()


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)².

  Args:
    logits: <float32>[..., E] router logits.
  """
  log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(log_z))


def importance_cv_squared(probs: jax.Array) -> jax.Array:
  """Shazeer's importance loss CV²(Σ_tokens probs) (population variance), for monitoring.

  Args:
    probs: <float32>[T, E] router probabilities of T tokens.
  """
  importance = probs.astype(jnp.float32).sum(axis=0)
  return jnp.var(importance) / jnp.square(jnp.mean(importance))
