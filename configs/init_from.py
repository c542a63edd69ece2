"""Start a new run from weights: a converted model or another run gives the model and its parameters.

  python -m moejax.main --config configs/init_from.py:<dir> --workdir <new workdir> [--config.x=y ...]

<dir> is a directory written by `python -m moejax.convert from-hf` or a run's workdir. Its
config.json gives the model (sections model and moe, as saved), this file the training (the
quickstart's schedule on the embedded Markov data; override anything), and init.checkpoint = <dir>:
the run starts from its parameters (the newest checkpoint of a run; --config.init.step=N for
another), with a fresh optimizer at step 0. Partial loading: --config.init.include / exclude
(README "Starting a run from weights").
"""

import os

from moejax.config import common, saved_config


def get_config(source):
  config = common.small_lm()
  saved = saved_config(os.path.join(source, "config.json"))
  if saved.task != "lm":
    raise ValueError(f"{source} holds a {saved.task} model; configs/init_from.py starts language models")
  for section in ("model", "moe"):
    for name, value in saved[section].items():
      config[section][name] = value
  config.init.checkpoint = source
  return config
