"""Command line: `python -m moejax.main --config configs/<x>.py[:arg] --workdir <dir>`.

Overrides: `--config.moe.top_k=1 --config.train.num_steps=500`. Re-running the same command
resumes from the newest checkpoint in the workdir. Bad input (config, overrides, workdir) is
refused before anything is written: one line on stderr naming the field, exit code 2.
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

EXIT_BAD_INPUT = 2
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (configs/*.py[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")


def _fail(message: str) -> None:
  from moejax.errors import silence_stderr

  print(f"error: {message}", file=sys.stderr, flush=True)
  silence_stderr()  # The one line stays the only one.
  sys.exit(EXIT_BAD_INPUT)


def _parse_flags(argv: list[str]) -> list[str]:
  """Parses flags; any problem (missing file, unknown field, bad value) is one line, exit 2."""
  config_path = _config_path(argv)
  if config_path is not None and not os.path.isfile(config_path):
    _fail(f"--config: no such config file {config_path!r}")
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # config_flags surfaces errors of the config file itself here too.
    _fail(_one_line(e))
  if len(rest) > 1:
    _fail(f"unexpected arguments {rest[1:]}; use --config and --workdir")
  if _CONFIG.value is None:
    _fail("--config is required (e.g. --config configs/quickstart.py)")
  if not _WORKDIR.value:
    _fail("--workdir is required (e.g. --workdir workdirs/quickstart)")
  return rest


def _config_path(argv: list[str]) -> str | None:
  """The file part of --config FILE[:arg], if given."""
  for i, arg in enumerate(argv):
    if arg in ("--config", "-config") and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith(("--config=", "-config=")):
      value = arg.split("=", 1)[1]
    else:
      continue
    return value.split(":", 1)[0]
  return None


def _first_line(error: BaseException) -> str:
  if isinstance(error, KeyError) and error.args:
    text = str(error.args[0])
  else:
    text = str(error)
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def _one_line(error: BaseException) -> str:
  """One line from a flag-parsing error: the flag (when named) and the root cause."""
  chain = [error]
  while chain[-1].__cause__ or chain[-1].__context__:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  root, outer = chain[-1], _first_line(chain[0])
  text = _first_line(root)
  full = str(root.args[0]) if isinstance(root, KeyError) and root.args else str(root)
  locked = re.search(r'Key "(\w+)" does not exist', full)
  if locked:
    hint = re.search(r'Did you mean "(\w+)"', full)
    text = f"unknown config field {locked.group(1)!r}" + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
  elif isinstance(root, KeyError):
    text = f"unknown config field {text.strip(chr(39))!r}"
  if outer.startswith("flag --"):
    return f"{outer.split(': ')[0]}: {text}"
  if isinstance(root, SyntaxError) or root is not error:
    return f"--config: {text}"
  return text


def _check_workdir(workdir: str, resolved: dict) -> None:
  """Refuses a workdir that is a file, or that holds a run of a different config."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    _fail(f"--workdir {workdir!r} exists and is not a directory")
  from moejax import config as config_lib

  differ, resumable = config_lib.differences_from_saved(workdir, resolved)
  if differ:
    _fail(
      f"--workdir {workdir!r} holds a run with a different config ({', '.join(differ[:4])}); "
      f"use a new workdir, or change only {', '.join(resumable)}"
    )


def _make_data_once(cfg):
  """This process's data; with several processes, process 0 prepares the dataset files first.

  If process 0 fails, it raises its error and the others stop with one line (never a hang).
  """
  import jax

  from moejax import tasks

  make = lambda: tasks.make_data(cfg, jax.process_index(), jax.process_count())
  if jax.process_count() == 1:
    return make()
  import numpy as np
  from jax.experimental import multihost_utils

  data, error = None, None
  if jax.process_index() == 0:
    try:
      data = make()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the others have heard of it.
      error = e
  # The others then only read the prepared files.
  failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
  if error is not None:
    raise error
  if failed:
    _fail("process 0 could not prepare the dataset (its output says why)")
  return make() if data is None else data


def _remove_new_run(workdir: str, remove_dir: bool) -> None:
  """Removes what a new run wrote before it failed to start: its config, manifest and empty checkpoint directory."""
  import shutil

  for name in ("config.json", "data_manifest.json", "init.json"):
    path = os.path.join(workdir, name)
    if os.path.isfile(path):
      os.remove(path)
  checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.isdir(checkpoints) and not any(name.isdigit() for name in os.listdir(checkpoints)):
    shutil.rmtree(checkpoints, ignore_errors=True)
  if remove_dir and os.path.isdir(workdir) and not os.listdir(workdir):
    os.rmdir(workdir)


def _has_checkpoint(workdir: str) -> bool:
  root = os.path.join(workdir, "checkpoints")
  return os.path.isdir(root) and any(name.isdigit() for name in os.listdir(root))


def _abstract_model(cfg, task):
  """(params, other model variables) of the run's model, abstract (shapes only)."""
  from flax import nnx

  model = nnx.eval_shape(lambda: task.make_model(None, nnx.Rngs(params=cfg.seed)))
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  return params, model_state


def _frozen_from_weights(cfg, param_labels, init_plan) -> None:
  """ConfigError if a new run would freeze parameters that no checkpoint gives: they would stay random.

  LoRA freezes the base model, so it needs init.checkpoint; with either LoRA or optim.freeze, a
  frozen parameter the init leaves fresh (init.exclude, an upcycled MoE's new router) is refused.
  A freeze without init.checkpoint is allowed (a frozen random router is an experiment of its own).
  """
  from moejax import finetune
  from moejax.errors import ConfigError

  field = "lora.train" if cfg.lora.rank > 0 else "optim.freeze"
  if cfg.lora.rank > 0 and init_plan is None:
    raise ConfigError(
      "lora.rank", "LoRA freezes the base model, but init.checkpoint is '': it would stay at its random initialisation"
    )
  if init_plan is None:
    return
  stuck = sorted(finetune.frozen_names(param_labels) & set(init_plan.fresh))
  if stuck:
    raise ConfigError(
      field,
      f"{len(stuck)} frozen parameters get no weights from init.checkpoint and would stay at their random "
      f"initialisation ({', '.join(stuck[:3])}{', ...' if len(stuck) > 3 else ''}); train them "
      f"({'lora.train or lora.train_patterns' if field == 'lora.train' else 'leave them out of the freeze'}) "
      "or take them from the checkpoint",
    )


def main(argv: list[str]) -> int:
  del argv
  if not flags.FLAGS["verbosity"].present:
    # Library INFO/WARNING lines (orbax, TFDS) drown the progress lines; --verbosity=0 shows them.
    logging.set_verbosity(logging.ERROR)
  import jax  # Local: flags are parsed (and refused) before JAX starts.

  from moejax import config as config_lib
  from moejax import distributed

  cfg, workdir = _CONFIG.value, _WORKDIR.value
  try:
    distributed.initialize(cfg)
    config_lib.validate(cfg, jax.device_count(), jax.process_count())
  except config_lib.ConfigError as e:
    _fail(f"config {e}")
  resolved = cfg.to_dict()
  _check_workdir(workdir, resolved)
  try:
    data = _make_data_once(cfg)
    from moejax import tasks

    data_devices, expert_devices, _ = config_lib.mesh_shape(cfg, jax.device_count())
    # Built once, here, so that a model that does not fit the data or the mesh is refused before
    # anything is written (the ViT's patches and routing groups depend on the images).
    task = tasks.make_task(cfg, data, data_devices * expert_devices)
  except config_lib.ConfigError as e:
    _fail(f"config {e}")
  except (ValueError, OSError) as e:
    _fail(_one_line(e))
  if cfg.task == "lm" and cfg.model.vocab_size and cfg.model.vocab_size < data.vocab_size:
    _fail(
      f"config model.vocab_size: {cfg.model.vocab_size} is smaller than the dataset's "
      f"vocabulary ({data.vocab_size}); use 0 to take the dataset's"
    )

  init_plan = None
  try:
    tuning = cfg.optim.freeze or cfg.optim.freeze_patterns or cfg.lora.rank > 0
    if tuning or cfg.init.checkpoint:
      params, model_state = _abstract_model(cfg, task)
    if tuning:
      from flax import nnx

      from moejax import finetune, lora

      param_labels = finetune.labels(cfg, params)  # A freeze or lora.train that matches nothing is refused here,
      if cfg.lora.rank > 0:  # as are LoRA targets that match nothing.
        lora.shapes(cfg.lora, {path: tuple(v.get_value().shape) for path, v in nnx.to_flat_state(params)})
    if cfg.init.checkpoint and not _has_checkpoint(workdir):  # A new run: its parameters come from there.
      from moejax import init

      init_plan = init.plan(cfg.init, init.shapes({"params": params, "model_state": model_state}), seed=cfg.seed)
    if tuning and not _has_checkpoint(workdir):
      _frozen_from_weights(cfg, param_labels, init_plan)
  except config_lib.ConfigError as e:
    _fail(f"config {e}" if e.field.startswith(("optim.", "lora.")) else str(e))
  from moejax import train

  new_run = not os.path.exists(os.path.join(workdir, "config.json"))
  workdir_existed = os.path.isdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(resolved, f, indent=2, sort_keys=True)
    if data.info.get("manifest"):
      with open(os.path.join(workdir, "data_manifest.json"), "w") as f:
        json.dump(data.info["manifest"], f, indent=1)
  try:
    return train.train_and_evaluate(cfg, workdir, data, task=task, init_plan=init_plan)
  except config_lib.ConfigError as e:  # init.checkpoint's arrays did not read (a corrupt file).
    if new_run and jax.process_index() == 0:  # Leave the workdir as it was: take back what this run wrote.
      _remove_new_run(workdir, remove_dir=not workdir_existed)
    _fail(str(e))


def run() -> None:
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
