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


def is_expert(names: tuple[str, ...], ndim: int) -> bool:
  if "shared" in names and "ffn" in names:
    return True
  return (
    len(names) >= 2
    and names[-2] == "ffn"
    and names[-1] in _EXPERT_ARRAYS
    and ndim == (3 if names[-1].startswith("w") else 2)
  )


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


def labels(optim_cfg, params) -> object:
  """The params tree with 'frozen' or 'train' at each parameter; ConfigError if a freeze matches nothing."""
  patterns = [re.compile(p) for p in optim_cfg.freeze_patterns]
  used = {("group", g): False for g in optim_cfg.freeze} | {("pattern", p.pattern): False for p in patterns}

  def label(keypath, leaf):
    names = _names(keypath)
    dotted = ".".join(names)
    frozen = False
    for group in optim_cfg.freeze:
      if in_group(group, names, len(leaf.shape)):
        used[("group", group)] = frozen = True
    for pattern in patterns:
      if pattern.fullmatch(dotted):
        used[("pattern", pattern.pattern)] = frozen = True
    return "frozen" if frozen else "train"

  out = jax.tree_util.tree_map_with_path(label, params)
  for (kind, what), hit in used.items():
    if not hit:
      field = "optim.freeze" if kind == "group" else "optim.freeze_patterns"
      raise ConfigError(field, f"'{what}' matches no parameter of this model")
  return out


def with_frozen(tx: optax.GradientTransformation, optim_cfg, params) -> optax.GradientTransformation:
  """tx for the trained parameters, no update (and no state) for the frozen ones; tx itself if none are."""
  if not optim_cfg.freeze and not optim_cfg.freeze_patterns:
    return tx
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels(optim_cfg, params))
