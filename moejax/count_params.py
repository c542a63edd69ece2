"""Total and active parameters and training FLOPs per token of any config, without weights.

  python -m moejax.count_params --config configs/architectures.py:mixtral_8x7b [--config.x.y=v ...]

Counts come from `nnx.eval_shape` (abstract arrays), so a 141B-parameter model is counted on a
laptop. Active parameters count each MoE layer's experts (experts per token)/E times; FLOPs per
token are the active training FLOPs of `moejax.accounting`. For an LM whose model.vocab_size is
0 the dataset's vocabulary is used (Markov mixture: data.markov.vocab_size; bytes: 256); a ViT
on the digits has 8×8×1 images and 10 classes (other image datasets: run training, which prints
the same line).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)


def cost_of(cfg):
  """The ModelCost of the model `cfg` describes (LM, or ViT on the digits)."""
  from moejax import accounting, tasks
  from moejax import config as config_lib
  from moejax.models import build

  if cfg.task == "lm":
    return accounting.decoder_cost(build.decoder_config(cfg, tasks.vocab_size_without_data(cfg)))
  if cfg.data.source != "digits":
    raise config_lib.ConfigError(
      "data.source",
      "count_params knows the image shape of 'digits' only; training prints the counts for other image datasets",
    )
  return accounting.vit_cost(build.vit_config(cfg, (8, 8, 1), 10))


def main(argv) -> int:
  del argv
  from moejax import config as config_lib

  cfg = _CONFIG.value
  try:
    # As many devices as the mesh asks for: the mesh does not change the counts.
    config_lib.validate(cfg, num_devices=max(cfg.mesh.data, 1) * max(cfg.mesh.expert, 1) * max(cfg.mesh.model, 1))
    cost = cost_of(cfg)
  except config_lib.ConfigError as e:
    print(f"error: config {e}", file=sys.stderr)
    return 2
  print(f"total parameters:            {cost.total_params:>18,} ({cost.total_params / 1e9:.2f}B)")
  print(f"active parameters per token: {cost.active_params:>18,} ({cost.active_params / 1e9:.2f}B)")
  without = cost.active_params - cost.lookup_params
  print(f"  without the input embedding: {without:>16,} ({without / 1e9:.2f}B; how DeepSeek and gpt-oss count)")
  if cost.mtp_params:
    main_total, main_active = cost.total_params - cost.mtp_params, without - cost.mtp_active_params
    print(f"  of the total, multi-token prediction: {cost.mtp_params:>9,} ({cost.mtp_params / 1e9:.2f}B)")
    print(
      f"  main model without MTP: {main_total:,} total ({main_total / 1e9:.2f}B), {main_active:,} active "
      f"without the input embedding ({main_active / 1e9:.2f}B)"
    )
  print(f"training FLOPs per token:    {cost.train_flops_per_token:>18.4g} (active, forward + backward)")
  return 0


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
