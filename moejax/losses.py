"""Auxiliary router losses (REFERENCES.md, "Losses").

Legend: G groups, S tokens per group, E experts, K choices per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LOAD_BALANCE_DENSITIES = ("top1", "topk", "topk_sum")
LOAD_BALANCE_SCOPES = ("group", "local_batch", "global_batch")


def load_balance_terms(probs: jax.Array, expert_index: jax.Array, density: str = "top1"):
  """Per-group (f, P) of the Switch loss: <float32>[G, E] each.

  Args:
    probs: <float32>[G, S, E] router probabilities.
    expert_index: <int32>[G, S, K] chosen experts, best first (before any dropping).
    density: 'top1': f_e = share of tokens whose first choice is e (Switch);
      'topk': f_e = share of the S·K choices that picked e (any-of-top-K, normalized so that
      Σ_e f_e = 1 and a perfectly balanced router scores 1 for every K);
      'topk_sum': f_e = share of the S tokens that have e among their K choices (Σ_e f_e = K, a
      balanced router scores K), as flaxformer, MaxText and transformers compute it.
  """
  num_experts = probs.shape[-1]
  if density == "top1":
    chosen = expert_index[..., :1]
  elif density in ("topk", "topk_sum"):
    chosen = expert_index
  else:
    raise ValueError(f"density must be one of {LOAD_BALANCE_DENSITIES}, got {density!r}")
  counts = jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32).sum(axis=2)  # [G, S, E]
  per_choice = chosen.shape[-1] if density == "topk" else 1
  return counts.mean(axis=1) / per_choice, probs.astype(jnp.float32).mean(axis=1)


def switch_balance(fraction: jax.Array, mean_prob: jax.Array) -> jax.Array:
  """E·Σ_e f_e·P_e over the last axis, averaged over any leading (group) axes."""
  return (fraction.shape[-1] * jnp.sum(fraction * mean_prob, axis=-1)).mean()


def pooled_load_balance(fractions: jax.Array, mean_probs: jax.Array) -> jax.Array:
  """transformers' one loss for the whole model: E·Σ_e f_e·P_e with f and P over all layers' tokens.

  Args:
    fractions, mean_probs: <float32>[L, E] each MoE layer's f and P over the whole batch (every
      layer sees the same number of tokens, so the pooled f and P are their means over layers).
  """
  return switch_balance(fractions.mean(axis=0), mean_probs.mean(axis=0))


def load_balance_loss(probs: jax.Array, expert_index: jax.Array, density: str = "top1") -> jax.Array:
  """Switch load-balance loss E·Σ_e f_e·P_e, computed per group then averaged over groups.

  Args: as `load_balance_terms`.

  Returns:
    <float32>[] the loss, 1.0 for a perfectly balanced router. Multiply by the coefficient α.
  """
  return switch_balance(*load_balance_terms(probs, expert_index, density))


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)².

  Args:
    logits: <float32>[..., E] router logits.
  """
  log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(log_z))


def cv_squared(values: jax.Array) -> jax.Array:
  """Squared coefficient of variation (population variance) of a vector."""
  values = values.astype(jnp.float32)
  return jnp.var(values) / jnp.maximum(jnp.square(jnp.mean(values)), 1e-12)


LOAD_LOSS_THRESHOLDS = ("others", "overall")


def smooth_load(
  clean_logits: jax.Array, noisy_logits: jax.Array, noise_std: jax.Array, top_k: int, threshold: str = "others"
) -> jax.Array:
  """Shazeer's differentiable load estimate of noisy top-k gating: <float32>[E].

  load_e = Σ_tokens P(e stays in the top-k when its own noise is re-drawn)
         = Σ_tokens Φ((clean_e − threshold_e) / std_e).

  Args:
    clean_logits, noisy_logits, noise_std: <float32>[..., E].
    top_k: K.
    threshold: 'others': threshold_e is the k-th largest noisy logit among the *other* experts
      (Shazeer et al. 2017: the value e must beat to be in the top k); 'overall': the k-th largest
      noisy logit of all E, e included, the same for every expert (vmoe's load loss,
      vmoe/nn/routing.py): an expert inside the top k is measured against the k-th, maybe itself.
  """
  top = jax.lax.top_k(noisy_logits, top_k + 1)[0]  # [..., K+1]
  kth = top[..., top_k - 1 : top_k]
  if threshold == "overall":
    threshold = kth
  elif threshold == "others":
    in_top = noisy_logits >= kth
    # For an expert inside the top k, the others' k-th largest is the (k+1)-th overall.
    threshold = jnp.where(in_top, top[..., top_k : top_k + 1], kth)
  else:
    raise ValueError(f"threshold must be one of {LOAD_LOSS_THRESHOLDS}, got {threshold!r}")
  prob = jax.scipy.stats.norm.cdf((clean_logits - threshold) / jnp.maximum(noise_std, 1e-9))
  return prob.reshape(-1, prob.shape[-1]).sum(axis=0)


def multi_token_prediction_loss(mtp_logits: list[jax.Array], targets: jax.Array) -> jax.Array:
  """DeepSeek-V3's L_MTP / λ (§2.2): the mean over depths k = 1..D of each depth's cross-entropy.

  Args:
    mtp_logits: D arrays <float32>[B, L, V]; the k-th predicts token i + 1 + k at position i.
    targets: <int32>[B, L], targets[:, i] = token i + 1 (the main model's labels).

  Depth k is scored at positions i < L - k (their target targets[:, i + k] is in the sequence),
  averaged over those B·(L - k) predictions.
  """
  length = targets.shape[1]
  per_depth = []
  for k, logits in enumerate(mtp_logits, start=1):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, : length - k], targets[:, k:])
    per_depth.append(ce.mean())
  return sum(per_depth) / len(per_depth)


def device_balance_terms(probs: jax.Array, expert_index: jax.Array, num_devices: int, max_devices: int):
  """DeepSeek-V2's device- and communication-level balance terms (§2.2.3), per group.

  The E experts sit on D = num_devices devices, E/D each, in order (expert j on device j·D // E);
  a token's experts span at most M = max_devices of them (device-limited routing).

  Args:
    probs: <float32>[G, S, E] affinities s; expert_index: <int32>[G, S, K] chosen experts.

  Returns:
    (f_device, f_comm, p_device), <float32>[G, D] each: f'_i = the mean over device i's experts
    of f_j = E/(K·S)·(choices of expert j); f''_i = D/(M·S)·(tokens sending to device i);
    P'_i = Σ_{j on i} of the mean affinity. Σ_i f'_i·P'_i and Σ_i f''_i·P''_i (P'' = P') are 1
    for a perfectly balanced router, like E·Σ f·P.
  """
  g, s, e = probs.shape
  k = expert_index.shape[-1]
  counts = jax.nn.one_hot(expert_index, e, dtype=jnp.float32).sum(axis=2)  # [G, S, E] choices per expert
  f_expert = counts.sum(axis=1) * e / (k * s)  # [G, E]
  f_device = f_expert.reshape(g, num_devices, e // num_devices).mean(axis=-1)  # [G, D]
  p_device = probs.astype(jnp.float32).mean(axis=1).reshape(g, num_devices, e // num_devices).sum(axis=-1)
  reached = counts.reshape(g, s, num_devices, e // num_devices).sum(axis=-1) > 0  # [G, S, D]
  f_comm = reached.astype(jnp.float32).sum(axis=1) * num_devices / (max_devices * s)
  return f_device, f_comm, p_device
