"""Router modules: parameters, training noise and balancing state around `moejax.routing`.

A router maps a device's tokens `[G, S, d]` to a routing decision plus the statistics that the
auxiliary losses and metrics need. It runs inside `jax.shard_map` (see `moejax.layers.moe`),
so everything here is per device; cross-device reductions happen in the layer.

Legend: G groups, S tokens per group, E experts, C capacity, K choices per token, d model dim.

Routers (`moe.router`):
  'top_k'          softmax over E, each token takes its K best (Switch K=1, GShard K=2), with
                   optional noisy top-k (learned noise, Shazeer 2017) or multiplicative jitter
                   (Switch) during training, and GShard's random 2nd expert.
  'expert_choice'  each expert takes its C best tokens (Zhou et al. 2022). Not causal.
  'soft_moe'       every slot is a softmax mix of the group's tokens (Puigcerver et al.). Not causal.
  'hash'           expert = fixed hash of the token id (Roller et al. 2021); no learned router.
  'dense'          every token uses all experts, weighted by the softmax (no sparsity).
  'deepseek'       sigmoid or softmax affinities, a non-trained per-expert bias that only chooses
                   (aux-loss-free balancing, DeepSeek-V3), optional group-limited routing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import routing
from moejax.layers.ffn import fan_in_init

ROUTERS = ("top_k", "expert_choice", "soft_moe", "hash", "dense", "deepseek")
ROUTER_NOISE = ("none", "noisy_top_k", "jitter")
SCORE_FUNCTIONS = ("softmax", "sigmoid")


class RouterBias(nnx.Variable):
  """Non-trained routing state (DeepSeek's balancing bias): updated by a rule, not by gradients."""


def is_causal(router: str, top_k: int, priority: str, dispatcher: str) -> bool:
  """Whether a decoder token's output can depend only on earlier tokens of its sequence.

  With one sequence per group: top-k/hash/deepseek with 'token_major' priority, or with any
  priority when nothing competes for slots (K = 1 under 'choice_major', or the dropless
  dispatcher), are causal. 'choice_major' with K > 1 leaks through capacity (a token's 2nd
  choice queues behind later tokens' 1st choices); 'bpr' orders by score across the group;
  expert choice and soft MoE mix the whole group by construction. 'dense' never drops.
  """
  if router in ("expert_choice", "soft_moe"):
    return False
  if router == "dense" or dispatcher == "dropless":
    return True
  k = 1 if router == "hash" else top_k
  return priority == "token_major" or (priority == "choice_major" and k == 1)


class Router(nnx.Module):
  """Per-device router: [G, S, d] tokens -> (decision, stats).

  stats (float32, per device): 'logits' [G, S, E] or None (with noisy top-k the noisy logits,
  which the z-loss then reads), 'probs' [G, S, E] (what the
  load-balance loss and entropy metrics read; None for soft MoE), 'selection_counts' [E]
  (how many choices picked each expert before capacity, for DeepSeek's bias update), and
  'noise_std' [G, S, E] for noisy top-k (for Shazeer's smooth load estimate).
  """

  def __init__(self, d_model: int, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    e = cfg.num_experts
    init = fan_in_init(cfg.init_scale)
    learned = cfg.router in ("top_k", "expert_choice", "dense", "deepseek")
    self.kernel = nnx.Param(init(rngs.params(), (d_model, e))) if learned else None
    # Zero init, as Shazeer et al.: the noise std starts at softplus(0) = ln 2 for every expert.
    noisy = cfg.router == "top_k" and cfg.router_noise == "noisy_top_k"
    self.noise_kernel = nnx.Param(jnp.zeros((d_model, e))) if noisy else None
    self.bias = RouterBias(jnp.zeros((e,), jnp.float32)) if cfg.router == "deepseek" else None
    soft = cfg.router == "soft_moe"
    self.slot_params = nnx.Param(init(rngs.params(), (d_model, e * cfg.slots_per_expert))) if soft else None
    self.scale = nnx.Param(jnp.ones((), jnp.float32)) if soft and cfg.soft_normalize else None

  def capacity(self, group_size: int, train: bool) -> int:
    """C for a group of S = group_size tokens."""
    cfg = self.cfg
    # Expert choice's capacity decides how many experts each token gets: a different eval
    # capacity would evaluate a different function, so it always uses the training one.
    cf = cfg.capacity_factor if train or cfg.router == "expert_choice" else cfg.eval_capacity_factor
    if cfg.router == "soft_moe":
      return cfg.slots_per_expert
    if cfg.router == "dense" or cfg.dispatcher == "dropless":
      return group_size  # Nobody is ever dropped: a token picks an expert at most once.
    k = cfg.top_k if cfg.router in ("top_k", "deepseek") else 1
    return routing.compute_capacity(group_size, cfg.num_experts, k, cf)

  def __call__(self, x: jax.Array, *, capacity: int, train: bool, rng: jax.Array,
               token_ids: jax.Array | None = None):
    cfg = self.cfg
    stats = {"logits": None, "probs": None, "noise_std": None}
    if cfg.router == "soft_moe":
      decision = routing.soft_moe_route(x, self.slot_params[...], num_experts=cfg.num_experts,
                                        scale=1.0 if self.scale is None else self.scale[...],
                                        normalize=cfg.soft_normalize)
      stats["selection_counts"] = jnp.zeros((cfg.num_experts,), jnp.float32)
      return decision, stats
    if cfg.router == "hash":
      ids = token_ids if token_ids is not None else jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
      experts = routing.hash_experts(ids, cfg.num_experts, cfg.hash_seed)[..., None]  # [G, S, 1]
      decision = routing.route_choices(experts, jnp.ones(experts.shape, jnp.float32),
                                       num_experts=cfg.num_experts, capacity=capacity, priority=cfg.priority)
      stats["probs"] = jax.nn.one_hot(experts[..., 0], cfg.num_experts)
      stats["selection_counts"] = stats["probs"].sum(axis=(0, 1))
      return decision, stats

    noise_rng, jitter_rng, second_rng = jax.random.split(rng, 3)
    router_in = x.astype(jnp.float32)
    if train and cfg.router_noise == "jitter":
      eps = cfg.jitter_eps
      router_in = router_in * jax.random.uniform(jitter_rng, router_in.shape, minval=1 - eps, maxval=1 + eps)
    logits = jnp.einsum("gsd,de->gse", router_in, self.kernel[...].astype(jnp.float32))
    if train and self.noise_kernel is not None:
      noise_std = jax.nn.softplus(jnp.einsum("gsd,de->gse", router_in, self.noise_kernel[...]))
      stats["noise_std"], stats["clean_logits"] = noise_std, logits
      logits = logits + noise_std * jax.random.normal(noise_rng, logits.shape)
    stats["logits"] = logits

    if cfg.router == "deepseek" and cfg.score_function == "sigmoid":
      scores = jax.nn.sigmoid(logits)
      stats["probs"] = scores / jnp.sum(scores, axis=-1, keepdims=True)
    else:
      scores = jax.nn.softmax(logits, axis=-1)
      stats["probs"] = scores

    if cfg.router == "expert_choice":
      decision = routing.expert_choice_route(scores, capacity=capacity,
                                             max_experts_per_token=cfg.max_experts_per_token)
    elif cfg.router == "dense":
      decision = routing.top_k_route(scores, top_k=cfg.num_experts, capacity=capacity)
    else:
      selection = None
      if cfg.router == "deepseek":
        selection = scores + self.bias[...]
        if cfg.num_expert_groups > 1:
          selection = routing.group_limited_scores(selection, num_groups=cfg.num_expert_groups,
                                                   top_groups=cfg.top_expert_groups)
      threshold = None
      if train and cfg.second_expert_policy == "random":
        threshold = jax.random.uniform(second_rng, scores.shape[:2])
      decision = routing.top_k_route(scores, top_k=cfg.top_k, capacity=capacity,
                                     combine_weights=cfg.combine_weights, priority=cfg.priority,
                                     second_expert_threshold=threshold, selection_scores=selection)
    selected = jax.nn.one_hot(decision.expert_index, cfg.num_experts) * decision.routed[..., None]
    stats["selection_counts"] = selected.sum(axis=(0, 1, 2))
    return decision, stats
