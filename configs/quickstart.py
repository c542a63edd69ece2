"""Quickstart: a small top-2 MoE decoder on the synthetic mixture of Markov sources.

Trains in about 2 minutes on 2 CPU cores (measured figures in README.md):
  python -m moejax.main --config configs/quickstart.py --workdir workdirs/quickstart
"""

from moejax.config import common


def get_config():
  return common.small_lm()  # 4 blocks (2 MoE, 8 experts, top-2) at d=96: ~1.5M parameters, 0.6M active.
