"""Settings the config files in configs/ share (as big_vision's configs/common.py). No JAX, no Flax.

small_lm()   the quickstart's model and schedule: 4 blocks at d = 96, MoE in blocks 2 and 4
             (8 experts, top-2), 600 steps of 32 × 64 tokens of the Markov mixture
             (configs/text_bytes.py widens it for real text)
small_vit()  the digits ViT: 4 blocks at d = 64, 16 patches of 2×2 pixels, 300 steps of 64 images
with_preset(config, PRESETS, name)   a named set of overrides, or one line listing the names
"""

from moejax.config import base_config, override


def small_lm():
  config = base_config("lm")
  # ~1.5M parameters, 0.6M active per token.
  config.model.d_model = 96
  config.model.d_ff = 384
  config.train.num_steps = 600
  config.train.batch_size = 32
  config.train.seq_len = 64
  config.train.log_every = 50
  config.train.eval_every = 200
  config.train.checkpoint_every = 200
  return config


def small_vit():
  config = base_config("vit")
  config.model.d_model = 64
  config.model.num_heads = 4
  config.model.d_ff = 128
  config.model.patch_size = 2
  config.train.batch_size = 64
  config.train.num_steps = 300
  config.train.log_every = 50
  config.train.eval_every = 100
  config.train.checkpoint_every = 100
  config.optim.warmup_steps = 30
  return config


def with_preset(config, presets: dict, name: str):
  """config with presets[name] applied; ValueError naming the presets if there is no such one."""
  if name not in presets:
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
  return override(config, presets[name])
