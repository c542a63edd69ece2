"""A new run's parameters from elsewhere (config section `init`): a converted model, another run, one step.

`init.checkpoint` names the source (`moejax.weights.item_directory`: a directory written by
`python -m moejax.convert from-hf`, a run's workdir with its newest checkpoint or `init.step`,
or one step's directory of a run). Only model variables are taken (parameters, and other model
variables such as DeepSeek-V3's routing bias): the optimizer starts afresh and the step at 0.

Which variables: every one of the model (`init.include` empty), or those whose dotted path
(blocks.3.ffn.wi, embed.embedding, ...) fully matches a pattern of `init.include`; minus those
matching `init.exclude`, which keep their fresh initialisation from the seed. Each variable taken
must be in the checkpoint with the model's shape, and, when everything is taken, each array of
the checkpoint must have a place in the model (unless excluded): anything that does not line up
is a ConfigError naming the variable, both shapes and the pattern to use. Nothing is dropped or
reshaped silently.

`plan` decides from shapes alone (orbax metadata: no array is read); `load` reads the chosen
arrays straight into the shardings the run gives them, in the model's dtypes, so no host or
device ever holds the whole model (`moejax.train.Trainer.initialize` then fills in the rest
under jit).
"""

from __future__ import annotations

import dataclasses
import re

import jax

from moejax import weights
from moejax.errors import ConfigError

SECTIONS = ("params", "model_state")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which model variables come from the checkpoint.

  item_dir: the orbax item holding the arrays; description: the source in words;
  take: {'params' | 'model_state': [model path, ...]}; fresh: dotted paths left at their
  initialisation; skipped: dotted paths of the checkpoint not taken.
  """

  item_dir: str
  description: str
  take: dict
  fresh: tuple[str, ...]
  skipped: tuple[str, ...]

  def summary(self) -> str:
    taken = sum(len(paths) for paths in self.take.values())
    parts = [f"init: {taken} arrays from {self.description}"]
    if self.fresh:
      parts.append(f"{len(self.fresh)} left at their initialisation ({_listing(self.fresh)})")
    if self.skipped:
      parts.append(f"{len(self.skipped)} of the checkpoint not taken ({_listing(self.skipped)})")
    return "; ".join(parts)


def _listing(names, most: int = 3) -> str:
  names = list(names)
  return ", ".join(names[:most]) + (f", ... {len(names) - most} more" if len(names) > most else "")


def plan(init_cfg, model_shapes: dict) -> Plan:
  """Which variables to take, checked against the checkpoint's shapes.

  init_cfg: the config's `init` section (checkpoint set). model_shapes: {'params' | 'model_state':
  {model path: shape}} of the run's model. Raises ConfigError for anything that does not line up.
  """
  item_dir, description = weights.item_directory(
    init_cfg.checkpoint, init_cfg.step or None, fields=("init.checkpoint", "init.step")
  )
  saved = weights.metadata(item_dir)
  include = [re.compile(p) for p in init_cfg.include]
  exclude = [re.compile(p) for p in init_cfg.exclude]
  excluded = lambda name: any(p.fullmatch(name) for p in exclude)
  included = lambda name: not include or any(p.fullmatch(name) for p in include)
  take, fresh = {}, []
  for section in SECTIONS:
    take[section] = []
    for path, shape in model_shapes.get(section, {}).items():
      name = weights.dotted(path)
      if excluded(name) or not included(name):
        fresh.append(name)
        continue
      got = saved[section].get(weights.key(path))
      if got is None:
        raise ConfigError(
          "init.checkpoint",
          f"{description} holds no {name}; leave it at its initialisation with init.exclude, or choose "
          "what to take with init.include",
        )
      if tuple(got[0]) != tuple(shape):
        raise ConfigError(
          "init.checkpoint", f"{name} is {tuple(got[0])} in {description} but {tuple(shape)} in this model"
        )
      take[section].append(path)
  taken = {weights.key(p) for paths in take.values() for p in paths}
  skipped = []
  for section in SECTIONS:
    model_keys = {weights.key(p) for p in model_shapes.get(section, {})}
    for key in saved[section]:
      name = ".".join(key)
      if key in taken:
        continue
      if key not in model_keys and not excluded(name) and included(name) and not include:
        raise ConfigError(
          "init.checkpoint",
          f"{name} of {description} has no place in this model; skip it with init.exclude, or choose what "
          "to take with init.include",
        )
      skipped.append(name)
  return Plan(item_dir, description, take, tuple(fresh), tuple(sorted(skipped)))


def load(the_plan: Plan, abstract_state: dict) -> dict:
  """{'params' | 'model_state': {model path: jax.Array}} of the planned variables, in their shardings.

  abstract_state: the run's state as ShapeDtypeStructs with shardings ({'params': nnx.State, ...});
  each array is read straight into its variable's sharding and dtype.
  """
  from flax import nnx

  targets = {}
  for section in SECTIONS:
    flat = dict(nnx.to_flat_state(abstract_state[section])) if section in abstract_state else {}
    targets[section] = {path: _abstract(flat[path]) for path in the_plan.take.get(section, [])}
  return weights.restore(the_plan.item_dir, targets)


def _abstract(leaf) -> jax.ShapeDtypeStruct:
  value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
  return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=getattr(value, "sharding", None))


def shapes(abstract_state: dict) -> dict:
  """{'params' | 'model_state': {model path: shape}} of a run's (abstract) state."""
  from flax import nnx

  out = {}
  for section in SECTIONS:
    flat = dict(nnx.to_flat_state(abstract_state[section])) if section in abstract_state else {}
    out[section] = {path: tuple(_abstract(v).shape) for path, v in flat.items()}
  return out
