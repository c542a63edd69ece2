"""ViT image classifier with MoE layers on scikit-learn's embedded 8×8 digits (no download).

  python -m moejax.main --config configs/vit_digits.py:<preset> --workdir workdirs/vit_<preset>
TFDS images you have prepared: --config.data.source=tfds --config.data.tfds.name=mnist.

Presets (4 blocks, d = 64, 16 patches of 2×2 pixels; MoE in blocks 2 and 4 unless said otherwise):
  dense                  dense ViT
  top_k                  top-2 token choice, choice-major priority
  bpr                    top-2 with batch-prioritized routing (V-MoE)
  expert_choice          expert choice, capacity factor 2
  expert_choice_capped   the same, each token kept by at most 1 expert
  soft_moe               soft MoE, 1 slot per expert, normalized, in the last 2 blocks (paper placement)
  soft_moe_unnormalized  the same without L2 normalization (the paper's ablation)
"""

from moejax.config import common

PRESETS = {
  "dense": {"model.moe_every": 0},
  "top_k": {"moe.router": "top_k", "moe.priority": "choice_major"},
  "bpr": {"moe.router": "top_k", "moe.priority": "bpr"},
  "expert_choice": {"moe.router": "expert_choice", "moe.capacity_factor": 2.0},
  "expert_choice_capped": {"moe.router": "expert_choice", "moe.capacity_factor": 2.0, "moe.max_experts_per_token": 1},
  "soft_moe": {"moe.router": "soft_moe", "model.moe_every": 0, "model.moe_last": 2},
  "soft_moe_unnormalized": {
    "moe.router": "soft_moe",
    "moe.soft_normalize": False,
    "model.moe_every": 0,
    "model.moe_last": 2,
  },
}


def get_config(preset="expert_choice"):
  return common.with_preset(common.small_vit(), PRESETS, preset)
