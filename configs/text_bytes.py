"""Byte-level MoE decoder on real text: this machine's Python standard library sources.

The run records which files it trained on (relative path, size, sha256, and a corpus digest) in
<workdir>/data_manifest.json. Other local text: --config.data.text.paths=dir1,glob2,...
  python -m moejax.main --config configs/text_bytes.py --workdir workdirs/text_bytes
"""

from moejax.config import common


def get_config():
  config = common.small_lm()
  config.data.source = "text_bytes"
  config.model.d_model = 128
  config.model.d_ff = 512
  config.train.seq_len = 128
  config.train.num_steps = 2000
  config.train.log_every = 100
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  return config
