"""Model weights outside a run's own resume: checkpoints written part by part and read into shardings.

One layout for every weights checkpoint moejax writes: the layout of a training run's state, so
the same reader takes a run's checkpoint and a converted one. A tree of nested dicts with string
keys, a {'value': array} at each leaf, parameters under 'params' and other model variables
(DeepSeek-V3's routing bias) under 'model_state':
  {'params': {'blocks': {'0': {'ffn': {'wi': {'value': <[E, d, f]>}}}}, ...}, 'model_state': {...}}
A run keeps it in <workdir>/checkpoints/<step>/default (with the optimizer state beside it, and a
LoRA run's adapters under 'lora', which `restore` merges into the parameters); a converted model (`python -m moejax.convert from-hf`) in <dir>/checkpoint/state.

`PartWriter` saves such a checkpoint one part (a decoder layer) at a time with orbax's partial
saving, so the writer never holds more than a part. `restore` reads chosen arrays of a checkpoint
straight into the shardings of their abstract targets (`jax.ShapeDtypeStruct`s with a sharding),
never the whole checkpoint onto one device; `metadata` gives shapes and dtypes without reading.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

import jax
import numpy as np

from moejax import lora
from moejax.errors import ConfigError

Path = tuple  # A variable's path in the model, e.g. ('blocks', 0, 'ffn', 'wi').


def to_nested(flat: Mapping[Path, object]) -> dict:
  """{path: leaf} -> nested dicts with string keys and {'value': leaf} at each path."""
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    for key in path:
      node = node.setdefault(str(key), {})
    node["value"] = leaf
  return out


def from_nested(tree: Mapping) -> dict[tuple[str, ...], object]:
  """The inverse of `to_nested`, with string keys: {('blocks', '0', 'ffn', 'wi'): leaf}."""
  out = {}

  def walk(node, prefix):
    for key, child in node.items():
      if key == "value" and not isinstance(child, Mapping):
        out[prefix] = child
      elif isinstance(child, Mapping):
        walk(child, (*prefix, key))

  walk(tree, ())
  return out


def key(path: Path) -> tuple[str, ...]:
  """A model path as the checkpoint names it (every key a string)."""
  return tuple(str(k) for k in path)


def dotted(path: Path) -> str:
  return ".".join(str(k) for k in path)


class PartWriter:
  """Writes a weights checkpoint at <directory>/checkpoint, part by part, then `finalize()`s it.

  Each `add(params, model_state)` ({path: numpy array} each) is written before it returns, and
  nothing of it is kept. Until `finalize`, the checkpoint lives in orbax's temporary directory
  beside the target and is not readable as a checkpoint.
  """

  def __init__(self, directory: str):
    self.path = os.path.join(os.path.abspath(directory), "checkpoint")

  def add(self, params: Mapping[Path, np.ndarray], model_state: Mapping[Path, np.ndarray] | None = None) -> None:
    import orbax.checkpoint.experimental.v1 as ocp_v1

    tree = {}
    if params:
      tree["params"] = to_nested(params)
    if model_state:
      tree["model_state"] = to_nested(model_state)
    if tree:
      ocp_v1.partial.save(self.path, tree)

  def finalize(self) -> None:
    import orbax.checkpoint.experimental.v1 as ocp_v1

    ocp_v1.partial.finalize(self.path)


def item_directory(path: str, step: int | None = None, fields=("checkpoint", "step")) -> tuple[str, str]:
  """(the orbax item directory holding the weights, a description) of a weights source.

  path: a converted model's directory (<path>/checkpoint/state), a run's workdir (its newest
  checkpoint, or `step`), or one step's directory of a run (<workdir>/checkpoints/<step>).
  fields: the names the caller's errors give path and step (a flag, a config field).
  """
  checkpoint_field, step_field = fields
  if not os.path.isdir(path):
    raise ConfigError(checkpoint_field, f"{path!r} is not a directory")
  converted = os.path.join(path, "checkpoint", "state")
  if os.path.isdir(converted):
    if step is not None:
      raise ConfigError(step_field, f"{path!r} is a converted model, which has no steps; leave the step unset")
    return converted, f"the converted model in {path}"
  if os.path.isdir(os.path.join(path, "default")) and os.path.basename(os.path.normpath(path)).isdigit():
    if step is not None:
      raise ConfigError(step_field, f"{path!r} is already one step's checkpoint; leave the step unset")
    return os.path.join(path, "default"), f"the checkpoint {path}"
  root = os.path.join(path, "checkpoints")
  if os.path.isdir(root):
    steps = sorted(int(s) for s in os.listdir(root) if s.isdigit() and os.path.isdir(os.path.join(root, s, "default")))
    if not steps:
      raise ConfigError(checkpoint_field, f"the run in {path!r} has no complete checkpoint")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ConfigError(step_field, f"the run in {path!r} has no checkpoint at step {step} (it has {steps})")
    return os.path.join(root, str(step), "default"), f"step {step} of the run in {path}"
  raise ConfigError(
    checkpoint_field,
    f"{path!r} is neither a converted model (no checkpoint/state), a run's workdir (no checkpoints/) "
    "nor one step of a run (no default/)",
  )


def metadata(
  item_dir: str, field: str = "checkpoint"
) -> dict[str, dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]]:
  """{'params': {path: (shape, dtype)}, 'model_state': {...}, 'lora': {...}} of a weights checkpoint, reading no array.

  'lora': a LoRA run's adapters ({(*path, 'a' | 'b'): ...}; `moejax.lora`), empty for any other.

  field: the name errors give the checkpoint (a flag, a config field).
  """
  import orbax.checkpoint as ocp

  unreadable = f"{item_dir!r} is not a readable orbax checkpoint"
  silence_abandoned_reads()
  try:
    tree = ocp.PyTreeCheckpointer().metadata(item_dir)
  except Exception as e:  # noqa: BLE001 - orbax raises many types for an unreadable directory.
    raise ConfigError(field, f"{unreadable} ({why(e)})") from None
  tree = getattr(tree, "item_metadata", tree)
  tree = getattr(tree, "tree", tree)
  if not isinstance(tree, Mapping):  # orbax returns None (and logs) when the metadata file is garbled or gone.
    raise ConfigError(field, f"{unreadable} (its metadata does not read)")
  out = {}
  for section in ("params", "model_state", "lora"):
    leaves = from_nested(tree.get(section, {}) or {})
    out[section] = {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in leaves.items()}
  return out


def restore(
  item_dir: str, targets: Mapping[str, Mapping[Path, object]], field: str = "checkpoint", saved: dict | None = None
) -> dict[str, dict[Path, object]]:
  """The arrays `targets` names, read from a weights checkpoint into their shardings and dtypes.

  targets: {'params' | 'model_state': {path: jax.ShapeDtypeStruct}}; only these arrays are read
  (orbax's partial restore), each straight into its sharding as a jax Array, or, for a target
  without a sharding, into a host numpy array. Returns the same structure. Shapes must match (the
  caller checks them against `metadata`). An array that does not read (a truncated or garbled
  file) is a ConfigError naming `field` and the checkpoint.

  A LoRA run's parameters are read merged, W + s·A·B (`moejax.lora.merged`, s from the run's
  config.json): the function the run trained. saved: the checkpoint's `metadata`, if the caller
  has it (read here otherwise).
  """
  import orbax.checkpoint as ocp

  targets = dict(targets)
  adapted = _adapted(item_dir, targets.get("params", {}), field, saved)
  if adapted:
    targets["lora"] = {k: v for ab in adapted.values() for k, v in ab.items()}
  item, restore_args = {}, {}
  for section, flat in targets.items():
    if not flat:
      continue
    item[section] = to_nested({key(p): v for p, v in flat.items()})
    restore_args[section] = to_nested({key(p): _restore_args(v) for p, v in flat.items()})
  if not item:
    return {section: {} for section in targets}
  silence_abandoned_reads()
  try:
    restored = ocp.PyTreeCheckpointer().restore(
      item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    )
  except Exception as e:  # noqa: BLE001 - narrowed to unreadable files; the rest re-raised.
    cause = unreadable_file_error(e)
    if cause is None:
      raise
    raise ConfigError(field, f"{item_dir!r} does not restore ({why(cause)})") from None
  out = {}
  for section, flat in targets.items():
    got = from_nested(restored.get(section, {})) if flat else {}
    out[section] = {p: got[key(p)] for p in flat}
  if adapted:
    adapters, s = out.pop("lora"), _lora_scale(item_dir, field)
    for path in targets["params"]:
      if path in adapted:
        a, b = (adapters[k] for k in adapted[path])
        w = out["params"][path]
        out["params"][path] = lora.merged(w, a, b, s) if isinstance(w, np.ndarray) else _merge(w, a, b, s)
  return out


_merge = jax.jit(lora.merged, static_argnums=3)  # W + s·A·B on device, compiled once per shape.


def _adapted(item_dir: str, params: Mapping[Path, object], field: str, saved: dict | None) -> dict:
  """{param path: {adapter path: target}} of the wanted parameters a LoRA run adapted (read replicated, float32)."""
  if not params:
    return {}
  saved = (saved or metadata(item_dir, field))["lora"]
  out = {}
  for path, target in params.items():
    if (*key(path), "a") not in saved:
      continue
    sharding = getattr(target, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      # Per-expert adapters [E, ...] split over E as W is; others are small: whole on each device.
      lead = sharding.spec[0] if len(saved[(*key(path), "a")][0]) == 3 and len(sharding.spec) else None
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(lead))
    out[path] = {
      (*key(path), name): jax.ShapeDtypeStruct(saved[(*key(path), name)][0], np.float32, sharding=sharding)
      for name in ("a", "b")
    }
  return out


def _lora_scale(item_dir: str, field: str) -> float:
  """alpha / rank of the LoRA run whose checkpoint item is item_dir (<workdir>/checkpoints/<step>/default)."""
  from moejax.config import saved_config

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(item_dir)))), "config.json")
  if not os.path.isfile(path):
    raise ConfigError(field, f"{item_dir!r} holds LoRA adapters but its run's config.json ({path}) is missing")
  return lora.scale(saved_config(path).lora)


def _restore_args(target):
  """orbax's restore arguments: into a sharding (a ShapeDtypeStruct with one), or a host numpy array (without)."""
  import orbax.checkpoint as ocp

  if getattr(target, "sharding", None) is None:
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=target.dtype)
  return ocp.ArrayRestoreArgs(sharding=target.sharding, dtype=target.dtype, global_shape=target.shape)


# ----- Unreadable checkpoint files (shared with moejax.train's resume). -----


def unreadable_file_error(error: Exception) -> BaseException | None:
  """The root cause when `error` is how orbax reports an unreadable checkpoint file, else None.

  Measured with orbax 0.12 by garbling, truncating, emptying and deleting each file of a step:
  JSON/UTF-8 decoding errors (ValueError), tensorstore's DATA_LOSS/OUT_OF_RANGE/NOT_FOUND
  (ValueError), missing files (OSError), and a bare Exception raised `from` one of those for
  array data. Other types (TypeError, KeyError, ...) are bugs in this code, not in the files. A
  ValueError of a state that does not fit (a bug, or a config change the config check missed)
  fails every checkpoint alike, so nothing is moved aside and the run stops (exit 2) naming it.
  """
  root = error
  while root.__cause__ is not None:
    root = root.__cause__
  if isinstance(error, (ValueError, OSError)) or (type(error) is Exception and isinstance(root, (ValueError, OSError))):
    return root
  return None


def why(error: BaseException, limit: int = 300) -> str:
  """One line of an error: its type and first line, cut at `limit` characters."""
  text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
  return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def silence_abandoned_reads() -> None:
  """Installs, once per process, an unraisable-error hook (and an asyncio log filter) that drop the noise of
  orbax's abandoned reads.

  When one array read of a restore fails, orbax closes its event loop with the other reads in
  flight. Collected, each of those turns its GeneratorExit into a bare Exception; a read that
  completes later cannot post to the closed loop (RuntimeError "Event loop is closed"). Python
  prints each with a traceback, dozens per failure (seen with orbax 0.12 under load), at any
  time after the failure, so the hook stays. Neither is an error of its own (the restore reports
  the failure once); every other unraisable error is passed on to the previous hook.
  """
  previous_hook = sys.unraisablehook
  if getattr(previous_hook, "moejax_silences_abandoned_reads", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    abandoned = (type(error) is Exception and isinstance(error.__cause__, GeneratorExit)) or (
      type(error) is RuntimeError and str(error) == "Event loop is closed"
    )
    if not abandoned:
      previous_hook(unraisable)

  hook.moejax_silences_abandoned_reads = True
  sys.unraisablehook = hook
  # The reads still running when the restore gave up may also fail on the same corrupt file; asyncio
  # then logs "Task exception was never retrieved" with a traceback, through the logging module.
  logging.getLogger("asyncio").addFilter(_drop_abandoned_read_errors)


def _drop_abandoned_read_errors(record: logging.LogRecord) -> bool:
  """False (drop) for asyncio's report of an orbax array read abandoned on an unreadable file."""
  error = record.exc_info[1] if record.exc_info else None
  abandoned_read = type(error) is Exception and isinstance(error.__cause__, (ValueError, OSError, GeneratorExit))
  return not (abandoned_read and record.getMessage().startswith("Task exception was never retrieved"))
