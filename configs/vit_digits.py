"""ViT image classifier with MoE layers on scikit-learn's embedded 8×8 digits (no download).

  python -m moejax.main --config configs/vit_digits.py --workdir workdirs/vit_digits
Routers: --config.moe.router=expert_choice | soft_moe | top_k | hash | dense | deepseek.
Soft MoE paper placement: --config.model.moe_every=0 --config.model.moe_last=2.
TFDS images you have prepared: --config.data.source=tfds --config.data.tfds.name=mnist.
"""

from moejax.config import base_config


def get_config():
  config = base_config("vit")
  config.model.d_model = 64
  config.model.num_heads = 4
  config.model.d_ff = 128
  config.model.patch_size = 2
  config.moe.router = "expert_choice"
  config.moe.capacity_factor = 2.0
  config.train.batch_size = 64
  config.train.num_steps = 300
  config.train.log_every = 50
  config.train.eval_every = 100
  config.train.checkpoint_every = 100
  config.optim.warmup_steps = 30
  return config
