"""Which parameters train: frozen groups and patterns (optim.freeze, optim.freeze_patterns).

Groups, by a parameter's dotted path and shape (MoE blocks of the decoder, the ViT and the
multi-token-prediction modules alike):
  experts      the MoE layers' expert arrays: routed experts [E, ...] (wi, wg, wo and their
               biases) and shared experts (ffn.shared.*)
  router       the MoE layers' routing parameters (ffn.router.*, Qwen2-MoE's ffn.shared_gate), and
               DeepSeek-V3's balancing bias, a model variable moved by a rule, not by gradients
               (`moejax.train` skips `update_balance`)
  non_experts  every parameter but the experts (ST-MoE §5: fine-tuning only these holds up)
  attention    the attention blocks (*.attention.*)
  embeddings   the token and position embeddings and the output head
`optim.freeze_patterns` adds regular expressions over dotted paths (re.fullmatch).

A frozen parameter gets no update at all (optax.set_to_zero in place of the optimizer: no
weight decay, no optimizer state), so it is bit for bit what the run started from
(tests/test_finetune.py). A group or pattern that matches no parameter of the model is refused
(ConfigError): a freeze that freezes nothing is a mistake, not a choice.
"""

from __future__ import annotations

import re

import jax
import optax

from moejax.config.schema import FREEZE_GROUPS as GROUPS  # noqa: F401 - re-exported
from moejax.errors import ConfigError

_EXPERT_ARRAYS = ("wi", "wg", "wo", "bi", "bg", "bo")


def _names(keypath) -> tuple[str, ...]:
  """A jax key path as names, without NNX's trailing 'value'."""
  out = []
  for key in keypath:
    name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
    out.append(str(name))
  return tuple(out[:-1] if out and out[-1] in ("value", ".value") else out)


def routed_expert(names: tuple[str, ...], ndim: int) -> bool:
  """An MoE layer's stacked routed-expert array: …ffn.{wi, wg, wo} [E, in, out] or …ffn.{bi, bg, bo} [E, out]."""
  return (
    len(names) >= 2
    and names[-2] == "ffn"
    and names[-1] in _EXPERT_ARRAYS
    and ndim == (3 if names[-1].startswith("w") else 2)
  )


def is_expert(names: tuple[str, ...], ndim: int) -> bool:
  """A routed expert's array or a shared expert's."""
  return ("shared" in names and "ffn" in names) or routed_expert(names, ndim)


def in_group(group: str, names: tuple[str, ...], ndim: int) -> bool:
  """Whether the parameter at `names` (its path) of `ndim` dimensions belongs to `group`."""
  if group == "experts":
    return is_expert(names, ndim)
  if group == "non_experts":
    return not is_expert(names, ndim)
  if group == "router":
    return "ffn" in names and ("router" in names or names[-1] == "shared_gate")
  if group == "attention":
    return "attention" in names
  if group == "embeddings":
    return names[0] in ("embed", "unembed", "position_embed", "cls_token")
  raise ValueError(group)


def _matching(params, groups, patterns, fields) -> object:
  """The params tree with True where a parameter is in one of `groups` or fully matches one of `patterns`.

  fields: the config fields (groups, patterns) an error names; a group or pattern that matches
  nothing is a ConfigError.
  """
  patterns = [re.compile(p) for p in patterns]
  used = {(fields[0], g): False for g in groups} | {(fields[1], p.pattern): False for p in patterns}

  def hit(keypath, leaf):
    names = _names(keypath)
    dotted = ".".join(names)
    out = False
    for group in groups:
      if in_group(group, names, len(leaf.shape)):
        used[(fields[0], group)] = out = True
    for pattern in patterns:
      if pattern.fullmatch(dotted):
        used[(fields[1], pattern.pattern)] = out = True
    return out

  out = jax.tree_util.tree_map_with_path(hit, params)
  for (field, what), found in used.items():
    if not found:
      raise ConfigError(field, f"'{what}' matches no parameter of this model")
  return out


def labels(cfg, params) -> object | None:
  """The params tree with 'frozen' or 'train' at each parameter; None when every parameter trains.

  Frozen: the parameters of optim.freeze / optim.freeze_patterns; with LoRA (lora.rank > 0),
  every base parameter but those of lora.train and lora.train_patterns (`moejax.lora`). ConfigError if a group or
  pattern matches nothing.
  """
  if cfg.lora.rank > 0:
    trained = _matching(params, cfg.lora.train, cfg.lora.train_patterns, ("lora.train", "lora.train_patterns"))
    return jax.tree.map(lambda t: "train" if t else "frozen", trained)
  if not cfg.optim.freeze and not cfg.optim.freeze_patterns:
    return None
  frozen = _matching(params, cfg.optim.freeze, cfg.optim.freeze_patterns, ("optim.freeze", "optim.freeze_patterns"))
  return jax.tree.map(lambda f: "frozen" if f else "train", frozen)


def frozen_names(param_labels) -> set[str]:
  """The dotted paths `labels` marks frozen."""
  if param_labels is None:
    return set()
  flat = jax.tree_util.tree_flatten_with_path(param_labels)[0]
  return {".".join(_names(path)) for path, label in flat if label == "frozen"}


def router_frozen(param_labels) -> bool:
  """Whether the routers are frozen (every router parameter the model has): then DeepSeek's balancing bias stays put too."""
  if param_labels is None:
    return False
  flat = jax.tree_util.tree_flatten_with_path(param_labels)[0]
  routers = [label for path, label in flat if in_group("router", _names(path), 2)]
  return bool(routers) and all(label == "frozen" for label in routers)


def with_frozen(tx: optax.GradientTransformation, param_labels, adapters=None) -> optax.GradientTransformation:
  """tx for the trained parameters, no update (and no state) for the frozen ones; tx itself if none are.

  param_labels: `labels`' tree (None: nothing frozen); adapters: LoRA's tree, trained in full,
  beside the parameters: the optimizer's tree is then {'params', 'lora'}.
  """
  if param_labels is None:
    return tx
  if adapters is not None:
    param_labels = {"params": param_labels, "lora": jax.tree.map(lambda _: "train", adapters)}
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, param_labels)
