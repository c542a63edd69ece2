"""What a router family is: its options and rules (pure Python) and its decision (JAX).

Legend: G groups, S tokens per group, E experts, C capacity, K choices per token, d model dim.

A family is a subclass of `RouterFamily` in one module of `moejax/routers/`, registered with
`@register` (moejax/routers/registry.py); `moe.router` names it. The family holds
  options           the `moe.*` fields it reads besides the ones every family reads (`Option`s;
                    shared ones, e.g. TOP_K, are declared once below). Set away from its default
                    while another family is selected, an option is refused (moejax.config).
  validate          checks of those options, raising ConfigError naming the field.
  capacity          C for a group of S tokens, in training and in eval.
  is_causal         whether a decoder token's output depends only on earlier tokens.
  experts_per_token how many experts process one token on average (accounting's "active").
  variables         its parameters ([d, E] kernel, ...) and non-trained state.
  route             tokens [G, S, d] -> (decision, stats), per device.
  aux               its losses and metrics, over the whole batch.
  update_state      after a training step: rule-based state (DeepSeek's bias).
Config-time methods are pure Python; the model-time ones reach JAX through `moejax.lazy`, so
that the config schema can collect every family's options without starting JAX.

stats (float32, per device, from `route`): 'logits' [G, S, E] or None (the z-loss reads them;
with noisy top-k the noisy logits), 'probs' [G, S, E] or None (load balance, importance,
entropy), 'selection_counts' [E] (choices per expert before capacity), and for noisy top-k
'noise_std' and 'clean_logits' [G, S, E] (Shazeer's smooth load); Soft MoE adds 'slot_params'
[d, E·p] (its similarity metrics).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from moejax.errors import ConfigError
from moejax.lazy import LazyModule, jax, jnp

losses = LazyModule("moejax.losses")
routing = LazyModule("moejax.routing")


@dataclasses.dataclass(frozen=True)
class Option:
  """A `moe.<name>` field: its default and meaning (the schema's one statement of both).

  allowed: for a string option, its values (checked for the family that reads it).
  minimum: for a number, the smallest allowed value (checked likewise); None for no bound.
  """

  name: str
  default: Any
  doc: str
  allowed: tuple = ()
  minimum: float | None = None
  exclusive: bool = False  # True: must be > minimum rather than >= minimum.


# Options several families read, declared once.
TOP_K = Option("top_k", 2, "Choices per token K: 1 = Switch, 2 = GShard; also DeepSeek's K.")  # Range: by family.
COMBINE_WEIGHTS = Option(
  "combine_weights",
  "raw",
  "'raw' (Switch/vmoe) | 'renormalized' over the K chosen (GShard/Mixtral/DeepSeek-V3).",
  allowed=("raw", "renormalized"),
)
PRIORITY = Option(
  "priority",
  "token_major",
  "Slot order: 'token_major' (causal) | 'choice_major' (vmoe) | 'bpr' (V-MoE, by top-1 probability).",
  allowed=("choice_major", "token_major", "bpr"),
)
CAPACITY_FACTOR = Option(
  "capacity_factor",
  1.25,
  "Training capacity factor cf; top-k C = ceil(S·K·cf / E), expert choice C = ceil(S·cf / E).",
  minimum=0,
  exclusive=True,
)
EVAL_CAPACITY_FACTOR = Option("eval_capacity_factor", 2.0, "cf in eval (ST-MoE).", minimum=0, exclusive=True)
DISPATCHER = Option(
  "dispatcher",
  "sort",
  "'sort' (row gathers) | 'einsum' (GShard one-hot) | 'dropless' (no capacity).",
  allowed=("einsum", "sort", "dropless"),
)
LOAD_BALANCE_LOSS_WEIGHT = Option("load_balance_loss_weight", 1e-2, "Switch α, summed over MoE layers.", minimum=0)
LOAD_BALANCE_DENSITY = Option(
  "load_balance_density",
  "top1",
  "'top1' (Switch) | 'topk' (any of the K choices, shares sum to 1) | 'topk_sum' (shares sum to K: "
  "flaxformer, MaxText, transformers).",
  allowed=("top1", "topk", "topk_sum"),
)
LOAD_BALANCE_POOLING = Option(
  "load_balance_pooling",
  "per_layer",
  "'per_layer' (each MoE layer's loss, summed) | 'all_layers' (transformers: one E·Σ f·P over every "
  "layer's router outputs pooled; needs load_balance_scope='global_batch').",
  allowed=("per_layer", "all_layers"),
)
LOAD_BALANCE_SCOPE = Option(
  "load_balance_scope",
  "group",
  "'group' | 'local_batch' (per device) | 'global_batch' (f and P over the whole batch first, Qwen).",
  allowed=("group", "local_batch", "global_batch"),
)
Z_LOSS_WEIGHT = Option("z_loss_weight", 1e-3, "ST-MoE router z-loss coefficient, summed over MoE layers.", minimum=0)
IMPORTANCE_LOSS_WEIGHT = Option("importance_loss_weight", 0.0, "Shazeer's CV²(importance).", minimum=0)

CAPACITY = (CAPACITY_FACTOR, EVAL_CAPACITY_FACTOR, DISPATCHER)
SWITCH_LOSSES = (
  LOAD_BALANCE_LOSS_WEIGHT,
  LOAD_BALANCE_DENSITY,
  LOAD_BALANCE_SCOPE,
  LOAD_BALANCE_POOLING,
  Z_LOSS_WEIGHT,
  IMPORTANCE_LOSS_WEIGHT,
)


class BatchReduce:
  """Means, sums, minima and maxima over the given mesh axes (the batch's), for code that runs per device in shard_map."""

  def __init__(self, axes: tuple[str, ...]):
    self.axes = axes

  def mean(self, tree):
    return jax.lax.pmean(tree, self.axes)

  def sum(self, tree):
    return jax.lax.psum(tree, self.axes)

  def min(self, tree):
    return jax.lax.pmin(tree, self.axes)

  def max(self, tree):
    return jax.lax.pmax(tree, self.axes)


class RouterFamily:
  """The base: a learned [d, E] router kernel, token-choice capacity, the common metrics.

  Subclasses set `name` and `options` and override what differs; every method receives the
  layer's `MoEConfig` (`cfg`), which holds every `moe.*` field.
  """

  name: ClassVar[str] = ""
  options: ClassVar[tuple[Option, ...]] = ()

  # ----- Config time: pure Python. -----

  @classmethod
  def validate(cls, moe) -> None:
    """Raises ConfigError for a bad value of one of this family's options (`moe`: the config section)."""
    check_options(cls.options, moe)

  @classmethod
  def unused_options(cls, cfg) -> dict[str, str]:
    """{option: why} of this family's options that the current settings do not read.

    Dropless gives every choice a place: the capacity factors do not apply. (The slot priority
    is still computed, though no choice is dropped whatever the order.)
    """
    if cls.dispatcher(cfg) != "dropless":
      return {}
    own = {o.name for o in cls.options}
    return {
      name: "moe.dispatcher is 'dropless': no capacity, every choice is kept"
      for name in ("capacity_factor", "eval_capacity_factor")
      if name in own
    }

  @classmethod
  def choices_per_token(cls, cfg) -> int:
    """K for the capacity formula."""
    return 1

  @classmethod
  def capacity(cls, cfg, group_size: int, train: bool) -> int:
    """C for a group of S = group_size tokens: ceil(S·K·cf / E) in [1, S]; S when nothing may drop."""
    if cfg.dispatcher == "dropless":
      return group_size  # Nobody is ever dropped: a token picks an expert at most once.
    cf = cfg.capacity_factor if train else cfg.eval_capacity_factor
    return routing.compute_capacity(group_size, cfg.num_experts, cls.choices_per_token(cfg), cf)

  @classmethod
  def is_causal(cls, cfg) -> bool:
    """Whether, with one sequence per group, a decoder token's output depends only on earlier tokens."""
    return True

  @classmethod
  def experts_per_token(cls, cfg, group_size: int) -> float:
    """How many experts process one token on average (what makes expert parameters active)."""
    return cls.choices_per_token(cfg)

  @classmethod
  def dispatcher(cls, cfg) -> str:
    """The dispatcher that moves this family's decision ('einsum', 'sort' or 'dropless')."""
    return cfg.dispatcher

  @classmethod
  def needs_rng(cls, cfg) -> bool:
    """Whether training draws random numbers (noise, random 2nd experts)."""
    return False

  # ----- Model time: JAX. -----

  @classmethod
  def variables(cls, cfg, d_model: int, init, rngs) -> dict[str, tuple[str, Any]]:
    """{attribute: ('param' | 'state', initial array)}; `init(key, shape)` is the fan-in init."""
    return {"kernel": ("param", init(rngs.params(), (d_model, cfg.num_experts)))}

  @classmethod
  def layer_inputs(cls, cfg, tokens, *, train: bool, rng):
    """The [G, S, d] tokens that the router and the experts both receive; `tokens` for most families."""
    return tokens

  @classmethod
  def logits(cls, router, x, *, train: bool, rng):
    """<float32>[G, S, E] router logits of tokens x [G, S, d], and the stats they leave.

    rng: the (noise, jitter) keys of families that perturb their logits in training.
    """
    logits = project(x.astype(jnp.float32), router.kernel[...].astype(jnp.float32))
    return logits, {"logits": logits}

  @classmethod
  def route(cls, router, x, *, capacity: int, train: bool, rng, token_ids=None):
    """(decision, stats) for a device's tokens x [G, S, d]; `router` holds the variables."""
    raise NotImplementedError(f"router family {cls.name!r} does not define route()")

  @classmethod
  def aux(cls, cfg, decision, stats, batch: BatchReduce) -> dict:
    """Losses and metrics over the whole batch (see `moejax.layers.moe.MoELayer` for the keys).

    The base gives what every family reports: the z-loss (when there are logits), Shazeer's
    importance loss, router entropy and top-1 confidence (when there are probabilities), the
    experts per token and each expert's share of the kept assignments. Subclasses add theirs.
    """
    e = cfg.num_experts
    zero = jnp.zeros((), jnp.float32)
    logits, probs = stats.get("logits"), stats.get("probs")
    aux = {"load_balance_loss": zero, "load_loss": zero}
    aux["z_loss"] = zero if logits is None else batch.mean(losses.router_z_loss(logits))
    # Shazeer's losses are CV² over the whole batch: sum the per-expert totals across devices first.
    aux["importance_loss"] = zero if probs is None else losses.cv_squared(batch.sum(probs.reshape(-1, e).sum(axis=0)))
    if probs is not None:
      p = probs.astype(jnp.float32)
      aux["router_entropy"] = batch.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-12)), axis=-1).mean())
      aux["top1_confidence"] = batch.mean(p.max(axis=-1).mean())
    kept_per_expert = batch.sum(cls.kept_per_expert(cfg, decision, aux, batch))
    aux["expert_load"] = kept_per_expert / jnp.maximum(kept_per_expert.sum(), 1e-9)
    aux["selection_counts"] = batch.sum(stats["selection_counts"])
    return aux

  @classmethod
  def kept_per_expert(cls, cfg, decision, aux: dict, batch: BatchReduce):
    """<float32>[E] this device's kept assignments per expert; adds the experts-per-token metrics.

    Metrics (after capacity, over the whole batch): 'tokens_with_ge{1,2,3}_experts' shares of
    tokens; vmoe's 'num_experts_per_token_min' / '_max' (its num_experts_per_item_min / _max) and
    'min_selected_gate' / 'max_selected_gate', the extreme combine weights of the kept choices
    (0 when nothing is kept).
    """
    kept = decision.kept.astype(jnp.float32)
    experts_per_token = kept.sum(axis=-1)
    for n in (1, 2, 3):
      aux[f"tokens_with_ge{n}_experts"] = batch.mean((experts_per_token >= n).mean())
    aux["num_experts_per_token_min"] = batch.min(experts_per_token.min())
    aux["num_experts_per_token_max"] = batch.max(experts_per_token.max())
    gate = jax.lax.stop_gradient(decision.combine_weight.astype(jnp.float32))
    min_gate = batch.min(jnp.where(decision.kept, gate, jnp.inf).min())
    aux["min_selected_gate"] = jnp.where(jnp.isfinite(min_gate), min_gate, 0.0)
    aux["max_selected_gate"] = batch.max(jnp.where(decision.kept, gate, 0.0).max())
    return jnp.einsum("gsk,gske->e", kept, jax.nn.one_hot(decision.expert_index, cfg.num_experts))

  @classmethod
  def update_state(cls, cfg, router, aux: dict) -> None:
    """After a training step, from its `aux`: rule-based state. None for most families."""


def project(x, kernel):
  """[G, S, d] @ [d, E] -> [G, S, E], as one 2-D matmul: XLA:CPU runs the weight gradient of the
  3-D form with extra transposes and copies (issue #11)."""
  g, s, d = x.shape
  return (x.reshape(g * s, d) @ kernel).reshape(g, s, kernel.shape[-1])


def check_options(options, moe) -> None:
  """The `allowed` and `minimum` of each option, on the config section `moe`."""
  for option in options:
    value, field = moe[option.name], f"moe.{option.name}"
    if option.allowed and value not in option.allowed:
      raise ConfigError(field, f"{value!r} is not allowed; choose one of {', '.join(map(repr, option.allowed))}")
    if option.minimum is not None:
      ok = value > option.minimum if option.exclusive else value >= option.minimum
      if not ok:
        raise ConfigError(field, f"must be {'>' if option.exclusive else '>='} {option.minimum:g}, got {value}")


def fraction_dropped(decision, batch: BatchReduce):
  """<float32>[K] share of the choices of each rank that asked for a slot and found it full."""
  kept, routed = decision.kept.astype(jnp.float32), decision.routed.astype(jnp.float32)
  return batch.mean(1.0 - kept.sum(axis=(0, 1)) / jnp.maximum(routed.sum(axis=(0, 1)), 1.0))


def selection_counts(decision):
  """<float32>[E] how many routed choices picked each expert (before capacity)."""
  selected = jax.nn.one_hot(decision.expert_index, decision.num_experts) * decision.routed[..., None]
  return selected.sum(axis=(0, 1, 2))
