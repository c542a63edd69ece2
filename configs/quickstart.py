"""Quickstart: a small top-2 MoE decoder on the synthetic mixture of Markov sources.

Trains in about 2 minutes on 2 CPU cores (measured figures in README.md):
  python -m moejax.main --config configs/quickstart.py --workdir workdirs/quickstart
"""

from moejax.config import base_config


def get_config():
  config = base_config()
  # 4 blocks (2 MoE, 8 experts, top-2) at d=96: ~1.5M parameters, 0.6M active per token.
  config.model.d_model = 96
  config.model.d_ff = 384
  config.train.num_steps = 600
  config.train.batch_size = 32
  config.train.seq_len = 64
  config.train.log_every = 50
  config.train.eval_every = 200
  config.train.checkpoint_every = 200
  return config
