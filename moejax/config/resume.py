"""Which config changes a resumed run may make, and the differences from a workdir's saved config."""

from __future__ import annotations

import json
import os

import ml_collections

from moejax.config.schema import base_config, flatten, inactive_fields

# Fields that may change when a run is resumed in the same workdir (they change neither what the
# checkpoint holds nor the training that follows it); any other difference from the workdir's
# config.json is refused. train.num_steps may change only under a constant learning rate: the
# cosine schedule decays over num_steps, so a new horizon would jump the learning rate.
RESUMABLE_CHANGES = (
  "train.log_every",
  "train.eval_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.profile_start",
  "train.profile_steps",
  "model.remat",  # What the backward pass keeps (the usual answer to running out of memory).
  "model.scan_layers",  # How the blocks are compiled; the parameters are stored per block either way.
  "data.data_dir",
  "mesh.data",
  "mesh.expert",
  "mesh.model",  # Layouts only: a checkpoint restores into any mesh.
  "mesh.fsdp",
  "mesh.rules.heads",
  "mesh.rules.kv_heads",
  "mesh.rules.mlp",
  "mesh.rules.expert_mlp",
  "mesh.rules.vocab",
  "distributed.initialize",
  "distributed.coordinator_address",
  "distributed.num_processes",
  "distributed.process_id",
)


def differences_from_saved(workdir: str, resolved: dict) -> tuple[list[str], tuple[str, ...]]:
  """(['field=saved->new', ...], the fields allowed to differ) against <workdir>/config.json.

  Empty when the workdir holds no config.json or one that only differs in fields a resumed run
  may change (RESUMABLE_CHANGES, and train.num_steps under a constant schedule); see `differences`.
  """
  saved_path = os.path.join(workdir, "config.json")
  resumable = RESUMABLE_CHANGES + (("train.num_steps",) if resolved["optim"]["schedule"] == "constant" else ())
  if not os.path.exists(saved_path):
    return [], resumable
  with open(saved_path) as f:
    saved = json.load(f)
  return differences(saved, resolved, ignore=resumable), resumable


def differences(saved: dict, resolved: dict, ignore: tuple[str, ...] = ()) -> list[str]:
  """['field=saved->new', ...]: the fields of `resolved` (a config's to_dict()) that `saved` differs in.

  Only fields the new run reads count (`schema.inactive_fields`: an option of another router
  family, another data source's settings, ... changes nothing). A field the saved config lacks
  (added to moejax after the run) counts only if it is set to other than its default.
  """
  new = flatten(json.loads(json.dumps(resolved)))
  old = flatten(saved)
  defaults = flatten(json.loads(json.dumps(base_config(new.get("task", "lm")).to_dict())))
  unread = set(inactive_fields(ml_collections.ConfigDict(resolved)))
  added_as_default = {k for k in set(new) - set(old) if k in defaults and new[k] == defaults[k]}
  differ = sorted(
    k
    for k in set(old) | set(new)
    if old.get(k) != new.get(k) and k not in ignore and k not in added_as_default and k not in unread
  )
  return [f"{k}={old.get(k)!r}->{new.get(k)!r}" for k in differ]


def saved_config(path: str) -> ml_collections.ConfigDict:
  """The config a config.json of a workdir (or converted model) holds, over base_config.

  Fields added to moejax since it was written keep their defaults; ConfigError names a field the
  schema does not know or a file that is not a config.
  """
  from moejax.errors import ConfigError

  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"file {path}", f"is not readable JSON ({type(e).__name__}: {e})") from None
  if not isinstance(saved, dict) or saved.get("task") not in ("lm", "vit"):
    raise ConfigError(f"file {path}", "is not a moejax config (no task 'lm' or 'vit')")
  cfg = base_config(saved["task"])
  for field, value in flatten(saved).items():
    *groups, name = field.split(".")
    node = cfg
    for group in groups:
      node = node[group] if group in node else None
      if node is None:
        break
    if node is None or name not in node:
      raise ConfigError(f"file {path}", f"field {field} is not one moejax knows")
    node[name] = tuple(value) if isinstance(value, list) else value
  return cfg
