"""Top-k token choice: softmax over E, each token takes its K best experts (Switch K=1, GShard K=2).

Options beyond the shared ones: router noise in training, Shazeer's noisy top-k (learned noise,
and its smooth load loss, with Shazeer's or vmoe's threshold) or multiplicative jitter (of the
router's input, Switch, or of the tokens both router and experts receive, transformers'
Mixtral); GShard's random 2nd expert.
Conventions (REFERENCES.md): combine weights raw or renormalized over the K chosen; slot
priority token-major (causal), choice-major (vmoe) or batch-prioritized (V-MoE).
"""

from __future__ import annotations

from moejax.errors import ConfigError
from moejax.lazy import jax, jnp
from moejax.routers import base
from moejax.routers.base import Option, RouterFamily, losses, routing
from moejax.routers.registry import register

ROUTER_NOISE = Option(
  "router_noise",
  "none",
  "Training only: 'none' | 'noisy_top_k' (Shazeer) | 'jitter' (Switch).",
  allowed=("none", "noisy_top_k", "jitter"),
)
ROUTER_BIAS = Option("router_bias", False, "A learned bias on the router logits, zero-initialised (gpt-oss).")
JITTER_EPS = Option("jitter_eps", 0.01, "Router input × Uniform(1 − ε, 1 + ε) with router_noise='jitter'.", minimum=0)
JITTER_SCOPE = Option(
  "jitter_scope",
  "router",
  "What the jitter multiplies: 'router' (Switch: the router's input only) | 'router_and_experts' "
  "(transformers' Mixtral router_jitter_noise: the hidden states both receive).",
  allowed=("router", "router_and_experts"),
)
SECOND_EXPERT_POLICY = Option(
  "second_expert_policy",
  "all",
  "'all' | 'random' (GShard: 2nd expert only if 2·g2 > u, u ~ U(0, 1), in training).",
  allowed=("all", "random"),
)
LOAD_LOSS_WEIGHT = Option(
  "load_loss_weight", 0.0, "Shazeer's CV²(smooth load); needs router_noise='noisy_top_k'.", minimum=0
)
LOAD_LOSS_THRESHOLD = Option(
  "load_loss_threshold",
  "others",
  "The smooth load's threshold for expert e: 'others' (Shazeer: the k-th largest noisy logit of the other "
  "experts) | 'overall' (vmoe: the k-th largest noisy logit of all experts, e included).",
  allowed=("others", "overall"),
)


def check_top_k(moe) -> None:
  """moe.top_k in [1, E]."""
  if not 1 <= moe.top_k <= moe.num_experts:
    raise ConfigError("moe.top_k", f"must be between 1 and moe.num_experts ({moe.num_experts}), got {moe.top_k}")


def check_balance_pooling(moe) -> None:
  """Pooling over all layers (transformers) pools over the whole batch too."""
  if moe.load_balance_pooling == "all_layers" and moe.load_balance_scope != "global_batch":
    raise ConfigError(
      "moe.load_balance_pooling",
      f"'all_layers' pools f and P over the whole batch: set moe.load_balance_scope='global_batch' "
      f"(it is {moe.load_balance_scope!r})",
    )


def token_choice_is_causal(cfg, k: int) -> bool:
  """Causal with token-major slots, or when nothing competes for a slot (K = 1 choice-major, dropless).

  Choice-major with K > 1 leaks through capacity (a token's 2nd choice queues behind later
  tokens' 1st choices); 'bpr' orders the whole group by score.
  """
  if cfg.dispatcher == "dropless":
    return True
  return cfg.priority == "token_major" or (cfg.priority == "choice_major" and k == 1)


@register
class TopK(RouterFamily):
  """Softmax over E, each token takes its K best; capacity ceil(S·K·cf / E)."""

  name = "top_k"
  options = (
    base.TOP_K,
    base.COMBINE_WEIGHTS,
    base.PRIORITY,
    *base.CAPACITY,
    *base.SWITCH_LOSSES,
    ROUTER_NOISE,
    JITTER_EPS,
    JITTER_SCOPE,
    SECOND_EXPERT_POLICY,
    LOAD_LOSS_WEIGHT,
    LOAD_LOSS_THRESHOLD,
    ROUTER_BIAS,
  )

  @classmethod
  def validate(cls, moe) -> None:
    check_top_k(moe)
    super().validate(moe)
    check_balance_pooling(moe)
    if moe.router_noise == "noisy_top_k" and moe.top_k >= moe.num_experts:
      raise ConfigError(
        "moe.router_noise",
        f"noisy top-k needs moe.top_k < moe.num_experts (an expert must be able "
        f"to miss); got top_k={moe.top_k}, num_experts={moe.num_experts}",
      )
    if moe.second_expert_policy == "random" and moe.top_k != 2:
      raise ConfigError("moe.second_expert_policy", "'random' is GShard's policy for router 'top_k' with top_k = 2")
    if moe.load_loss_weight and moe.router_noise != "noisy_top_k":
      raise ConfigError("moe.load_loss_weight", "Shazeer's load loss needs moe.router_noise='noisy_top_k'")

  @classmethod
  def unused_options(cls, cfg) -> dict[str, str]:
    unused = super().unused_options(cfg)
    if cfg.router_noise != "jitter":
      unused["jitter_eps"] = f"moe.router_noise is {cfg.router_noise!r}, not 'jitter'"
      unused["jitter_scope"] = f"moe.router_noise is {cfg.router_noise!r}, not 'jitter'"
    if cfg.router_noise != "noisy_top_k" or not cfg.load_loss_weight:
      unused["load_loss_threshold"] = "Shazeer's load loss is off (moe.load_loss_weight is 0)"
    own = {o.name for o in cls.options}  # A subclass (DeepSeek) need not have these options.
    return {name: why for name, why in unused.items() if name in own}

  @classmethod
  def choices_per_token(cls, cfg) -> int:
    return cfg.top_k

  @classmethod
  def is_causal(cls, cfg) -> bool:
    return token_choice_is_causal(cfg, cfg.top_k)

  @classmethod
  def needs_rng(cls, cfg) -> bool:
    return cfg.router_noise != "none" or cfg.second_expert_policy == "random"

  @classmethod
  def variables(cls, cfg, d_model, init, rngs):
    out = super().variables(cfg, d_model, init, rngs)
    if cfg.router_noise == "noisy_top_k":
      # Zero init, as Shazeer et al.: the noise std starts at softplus(0) = ln 2 for every expert.
      out["noise_kernel"] = ("param", jnp.zeros((d_model, cfg.num_experts)))
    if cfg.router_bias:
      out["kernel_bias"] = ("param", jnp.zeros((cfg.num_experts,), jnp.float32))
    return out

  @classmethod
  def layer_inputs(cls, cfg, tokens, *, train, rng):
    if not (train and cfg.router_noise == "jitter" and cfg.jitter_scope == "router_and_experts"):
      return tokens
    eps = cfg.jitter_eps
    return tokens * jax.random.uniform(rng, tokens.shape, minval=1 - eps, maxval=1 + eps).astype(tokens.dtype)

  @classmethod
  def logits(cls, router, x, *, train, rng):
    cfg = router.cfg
    noise_rng, jitter_rng = rng
    router_in = x.astype(jnp.float32)
    if train and cfg.router_noise == "jitter" and cfg.jitter_scope == "router":
      eps = cfg.jitter_eps
      router_in = router_in * jax.random.uniform(jitter_rng, router_in.shape, minval=1 - eps, maxval=1 + eps)
    logits = base.project(router_in, router.kernel[...].astype(jnp.float32))
    if cfg.router_bias:
      logits = logits + router.kernel_bias[...].astype(jnp.float32)
    stats = {}
    if train and cfg.router_noise == "noisy_top_k":
      noise_std = jax.nn.softplus(base.project(router_in, router.noise_kernel[...]))
      stats["noise_std"], stats["clean_logits"] = noise_std, logits
      logits = logits + noise_std * jax.random.normal(noise_rng, logits.shape)
    stats["logits"] = logits
    return logits, stats

  @classmethod
  def route(cls, router, x, *, capacity, train, rng, token_ids=None):
    cfg = router.cfg
    noise_rng, jitter_rng, second_rng = jax.random.split(rng, 3)
    logits, stats = cls.logits(router, x, train=train, rng=(noise_rng, jitter_rng))
    probs = jax.nn.softmax(logits, axis=-1)
    stats["probs"] = probs
    threshold = None
    if train and cfg.second_expert_policy == "random":
      threshold = jax.random.uniform(second_rng, probs.shape[:2])
    decision = routing.top_k_route(
      probs,
      top_k=cfg.top_k,
      capacity=capacity,
      combine_weights=cfg.combine_weights,
      priority=cfg.priority,
      second_expert_threshold=threshold,
    )
    stats["selection_counts"] = base.selection_counts(decision)
    return decision, stats

  @classmethod
  def aux(cls, cfg, decision, stats, batch):
    aux = super().aux(cfg, decision, stats, batch)
    aux["load_balance_loss"] = switch_load_balance(cfg, decision, stats["probs"], batch)
    if cfg.load_balance_pooling == "all_layers":  # The model pools these over its layers (moejax.tasks).
      fraction, mean_prob = losses.load_balance_terms(stats["probs"], decision.expert_index, cfg.load_balance_density)
      aux["balance_fraction"], aux["balance_prob"] = batch.mean(fraction.mean(0)), batch.mean(mean_prob.mean(0))
    aux["fraction_dropped"] = base.fraction_dropped(decision, batch)
    if cfg.second_expert_policy == "random":
      aux["second_expert_skipped"] = batch.mean(1.0 - decision.routed[..., 1].astype(jnp.float32).mean())
    if stats.get("noise_std") is not None:
      load = losses.smooth_load(
        stats["clean_logits"], stats["logits"], stats["noise_std"], cfg.top_k, cfg.load_loss_threshold
      )
      aux["load_loss"] = losses.cv_squared(batch.sum(load))
    return aux


def switch_load_balance(cfg, decision, probs, batch):
  """Switch E·Σ f·P (1.0 when balanced) at `moe.load_balance_scope`, over the whole batch."""
  if cfg.load_balance_scope == "group":
    return batch.mean(losses.load_balance_loss(probs, decision.expert_index, cfg.load_balance_density))
  fraction, mean_prob = losses.load_balance_terms(probs, decision.expert_index, cfg.load_balance_density)
  if cfg.load_balance_scope == "local_batch":
    return batch.mean(losses.switch_balance(fraction.mean(0), mean_prob.mean(0)))
  # 'global_batch': f and P over every device's tokens first (Qwen).
  return losses.switch_balance(batch.mean(fraction.mean(0)), batch.mean(mean_prob.mean(0)))
