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
import functools
import os
import re
import zlib

import jax

from moejax import finetune, weights
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
  upcycled: tuple = ()  # Model paths of expert arrays made from the checkpoint's dense FFN.
  segments: int = 1
  noise: float = 0.0
  seed: int = 0

  def summary(self) -> str:
    taken = sum(len(paths) for paths in self.take.values())
    parts = [f"init: {taken} arrays from {self.description}"]
    if self.upcycled:
      how = f"{self.segments} segments" if self.segments > 1 else "copies"
      parts.append(f"{len(self.upcycled)} expert arrays upcycled from its dense FFNs ({how}, noise {self.noise:g})")
    if self.fresh:
      parts.append(f"{len(self.fresh)} left at their initialisation ({_listing(self.fresh)})")
    if self.skipped:
      parts.append(f"{len(self.skipped)} of the checkpoint not taken ({_listing(self.skipped)})")
    return "; ".join(parts)

  def record(self) -> dict:
    """What a new run took, for its workdir's init.json: the exact checkpoint (its step included) and how."""
    parts = os.path.normpath(self.item_dir).split(os.sep)
    step = int(parts[-2]) if parts[-1] == "default" and parts[-2].isdigit() else None
    return {
      "source": self.description,
      "item_directory": os.path.abspath(self.item_dir),
      "step": step,
      "taken": {section: [weights.dotted(p) for p in paths] for section, paths in self.take.items()},
      "fresh": list(self.fresh),
      "skipped": list(self.skipped),
      "upcycled": [weights.dotted(p) for p in self.upcycled],
      "upcycle_segments": self.segments,
      "upcycle_noise": self.noise,
    }


def _listing(names, most: int = 3) -> str:
  names = list(names)
  return ", ".join(names[:most]) + (f", ... {len(names) - most} more" if len(names) > most else "")


# The axis of a dense FFN array that runs over its hidden units (None: bo has none).
_HIDDEN_AXIS = {"wi": 1, "wg": 1, "wo": 0, "bi": 0, "bg": 0, "bo": None}


def upcycled_shape(name: str, dense: tuple, num_experts: int, segments: int) -> tuple | None:
  """The [E, ...] shape the experts' `name` array takes from a dense FFN array of shape `dense`.

  wi, wg [d, f] -> [E, d, f/m]; wo [f, d] -> [E, f/m, d]; bi, bg [f] -> [E, f/m]; bo [d] -> [E, d];
  m = segments. None if the dense array does not split so.
  """
  hidden_axis = _HIDDEN_AXIS[name]
  shape = list(dense)
  if hidden_axis is not None:
    if shape[hidden_axis] % segments:
      return None
    shape[hidden_axis] //= segments
  return (num_experts, *shape)


def _upcycle(dense, key, *, name: str, num_experts: int, segments: int, noise: float):
  """The [E, ...] expert array made from a dense FFN array (run under jit, into the experts' sharding)."""
  import jax.numpy as jnp

  hidden_axis = _HIDDEN_AXIS[name]
  if hidden_axis is None or segments == 1:
    pieces = [dense] * num_experts
  else:
    split = jnp.split(dense, segments, axis=hidden_axis)
    pieces = [split[e % segments] for e in range(num_experts)]  # Expert e takes segment e mod m.
  experts = jnp.stack(pieces)
  if noise:
    scale = noise * jnp.std(dense.astype(jnp.float32))
    experts = experts + (scale * jax.random.normal(key, experts.shape, jnp.float32)).astype(experts.dtype)
  return experts


def plan(init_cfg, model_shapes: dict, seed: int = 0) -> Plan:
  """Which variables to take, checked against the checkpoint's shapes.

  init_cfg: the config's `init` section (checkpoint set). model_shapes: {'params' | 'model_state':
  {model path: shape}} of the run's model. seed: the run's (upcycling noise). Raises ConfigError
  for anything that does not line up.

  With init.upcycle, an MoE block's expert arrays ([E, ...]: wi, wg, wo and their biases) are
  made from the checkpoint's dense FFN array of the same name in that block, and the MoE block's
  other variables the checkpoint lacks (its router, Soft MoE's slot parameters) start fresh.
  """
  step = init_cfg.step or agreed_newest_step(init_cfg.checkpoint)
  item_dir, description = weights.item_directory(init_cfg.checkpoint, step, fields=("init.checkpoint", "init.step"))
  saved = weights.metadata(item_dir, field="init.checkpoint")
  include = [re.compile(p) for p in init_cfg.include]
  exclude = [re.compile(p) for p in init_cfg.exclude]
  matched = set()  # The patterns that matched a variable of the model or an array of the checkpoint.

  def hits(patterns, name):
    found = [p.pattern for p in patterns if p.fullmatch(name)]
    matched.update(found)
    return bool(found)

  excluded = lambda name: hits(exclude, name)
  included = lambda name: not include or hits(include, name)
  take, fresh, upcycled = {}, [], []
  moe_blocks = {path[:2] for path, shape in model_shapes.get("params", {}).items() if _is_expert(path, shape)}
  for section in SECTIONS:
    take[section] = []
    for path, shape in model_shapes.get(section, {}).items():
      name = weights.dotted(path)
      if excluded(name) or not included(name):
        fresh.append(name)
        continue
      got = saved[section].get(weights.key(path))
      if init_cfg.upcycle and _is_expert(path, shape) and got is not None and len(got[0]) == len(shape) - 1:
        want = upcycled_shape(path[-1], tuple(got[0]), shape[0], init_cfg.upcycle_segments)
        if want != tuple(shape):
          raise ConfigError(
            "init.upcycle",
            f"{name} is {tuple(shape)} in this model; {description}'s dense {tuple(got[0])} makes {want} with "
            f"init.upcycle_segments={init_cfg.upcycle_segments} (moe.d_expert must be its d_ff / segments)",
          )
        take[section].append(path)
        upcycled.append(path)
        continue
      if init_cfg.upcycle and got is None and path[:2] in moe_blocks and "ffn" in path and not _is_expert(path, shape):
        fresh.append(name)  # A new routing component of an upcycled MoE block (its router): from the seed.
        continue
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
  for field, patterns in (("init.include", init_cfg.include), ("init.exclude", init_cfg.exclude)):
    for pattern in patterns:
      if pattern not in matched:
        raise ConfigError(field, f"'{pattern}' matches no variable of this model or array of {description}")
  if not any(take.values()):
    raise ConfigError("init.include", f"takes nothing from {description}: every variable is left at its initialisation")
  if init_cfg.upcycle and not upcycled:
    raise ConfigError("init.upcycle", f"{description} holds no dense FFN for this model's MoE blocks to start from")
  experts = {shape[0] for path, shape in model_shapes.get("params", {}).items() if _is_expert(path, shape)}
  if init_cfg.upcycle and any(e < init_cfg.upcycle_segments for e in experts):
    raise ConfigError(
      "init.upcycle_segments",
      f"{init_cfg.upcycle_segments} segments need at least as many experts; the model has {min(experts)}",
    )
  return Plan(
    item_dir,
    description,
    take,
    tuple(fresh),
    tuple(sorted(skipped)),
    tuple(upcycled),
    init_cfg.upcycle_segments,
    float(init_cfg.upcycle_noise),
    seed,
  )


def agreed_newest_step(path: str, broadcast=None) -> int | None:
  """With several processes, the newest step of the run in `path` as process 0 sees it; else None (each its own).

  A source run still writing checkpoints could otherwise give processes different newest steps.
  None also where `path` is not a run's workdir (a converted model, one step of a run).
  broadcast: process 0's value to all (`multihost_utils.broadcast_one_to_all`; a test stands in for it).
  """
  if jax.process_count() == 1:
    return None
  import numpy as np
  from jax.experimental import multihost_utils

  try:
    item_dir, _ = weights.item_directory(path, None, fields=("init.checkpoint", "init.step"))
    parts = item_dir.split(os.sep)
    mine = int(parts[-2]) if parts[-1] == "default" and parts[-3] == "checkpoints" else -1
  except Exception:  # noqa: BLE001 - every process must reach the broadcast; plan() then names the problem.
    mine = -1
  newest = int((broadcast or multihost_utils.broadcast_one_to_all)(np.int32(mine)))
  return newest if newest >= 0 else None


def _is_expert(path, shape) -> bool:
  """A decoder or ViT block's stacked routed-expert array (blocks.{i}.ffn.wi, ...; not the MTP modules')."""
  return len(path) == 4 and path[0] == "blocks" and finetune.routed_expert(weights.key(path), len(shape))


def load(the_plan: Plan, abstract_state: dict) -> dict:
  """{'params' | 'model_state': {model path: jax.Array}} of the planned variables, in their shardings.

  abstract_state: the run's state as ShapeDtypeStructs with shardings ({'params': nnx.State, ...});
  each array is read straight into its variable's sharding and dtype.
  """
  from flax import nnx

  targets, upcycled = {}, {}
  saved = weights.metadata(the_plan.item_dir, field="init.checkpoint") if the_plan.upcycled else None
  for section in SECTIONS:
    flat = dict(nnx.to_flat_state(abstract_state[section])) if section in abstract_state else {}
    targets[section] = {}
    for path in the_plan.take.get(section, []):
      target = _abstract(flat[path])
      if path in the_plan.upcycled:  # The dense array, whole on every device (one FFN), then made into experts.
        dense_shape = saved[section][weights.key(path)][0]
        whole = jax.sharding.NamedSharding(target.sharding.mesh, jax.sharding.PartitionSpec())
        upcycled[path] = target
        target = jax.ShapeDtypeStruct(dense_shape, target.dtype, sharding=whole)
      targets[section][path] = target
  restored = weights.restore(the_plan.item_dir, targets, field="init.checkpoint")
  for path, target in upcycled.items():
    make = functools.partial(
      _upcycle, name=path[-1], num_experts=target.shape[0], segments=the_plan.segments, noise=the_plan.noise
    )
    key = jax.random.fold_in(jax.random.key(the_plan.seed), zlib.crc32(weights.dotted(path).encode()))
    restored["params"][path] = jax.jit(make, out_shardings=target.sharding)(restored["params"][path], key)
  return restored


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
