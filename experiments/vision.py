"""Vision: ViT dense vs top-k vs expert choice vs soft MoE, with and without normalization.

  python -m experiments.vision [--scale quick|paper|smoke] [--seeds 0,1,2]

The paper scale trains on TFDS 'mnist' (prepare it first; moejax never downloads); for CIFAR-10,
  python -m experiments.vision --scale paper --set data.tfds.name=cifar10 --out experiments/results/vision/cifar10

Presets of `configs/vit_digits.py` on scikit-learn's embedded 8×8 digits (no download): dense,
top-2 token choice, expert choice (cf 2), soft MoE (1 slot per expert, last 2 blocks) and the
same without L2 normalization (Soft MoE Table 2 / Fig. 3 at toy scale). The table leads with eval
accuracy (chance 0.10).

Result at the quick scale (2026-11-29, the 2-core CPU dev VM, jax 0.10.2, 2 min 40 s for 15
runs of 300 steps; eval accuracy on the held-out 20% of the 1797 digits, mean ± std over seeds
0-2):
  dense 0.970 ± 0.005; top2 0.965 ± 0.013; expert_choice 0.967 ± 0.009; soft_moe 0.966 ± 0.006;
  soft_moe_unnormalized 0.960 ± 0.009.
Wall-clock columns were measured before the dense-FFN layout fix of 2026-12-02 (commit 0d5595d),
which made dense FFN blocks faster on CPU (timings in that commit); they overstate every model's time, the dense
models' most.
Table, CSV, LaTeX and plots: experiments/results/vision/quick/.
"""

import sys

from experiments.framework import Experiment, Variant, main

VIT = "configs/vit_digits.py"

EXPERIMENT = Experiment(
  name="vision",
  title="ViT on digits: dense vs top-k vs expert choice vs soft MoE",
  variants=(
    Variant("dense", f"{VIT}:dense"),
    Variant("top2", f"{VIT}:top_k"),
    Variant("expert_choice", f"{VIT}:expert_choice"),
    Variant("soft_moe", f"{VIT}:soft_moe"),
    Variant("soft_moe_unnormalized", f"{VIT}:soft_moe_unnormalized"),
  ),
  scales={
    "quick": {"train.num_steps": 300, "train.log_every": 5, "train.eval_every": 0, "train.checkpoint_every": 300},
    "paper": {
      "data.source": "tfds",
      "data.tfds.name": "mnist",
      "model.num_layers": 8,
      "model.d_model": 256,
      "model.d_ff": 1024,
      "model.patch_size": 4,
      "train.batch_size": 256,
      "train.num_steps": 20_000,
      "train.log_every": 100,
      "train.eval_every": 2000,
      "train.checkpoint_every": 2000,
    },
  },
  baseline="dense",
  metric="eval_accuracy",
  found=(
    "Does not reproduce the ordering: on 8×8 digits every model reaches 96-97% and the differences "
    "are within one seed standard deviation. The MoE models fit the ~1,440 training images more "
    "closely (final train loss 0.005-0.009 vs dense 0.010) without generalizing better: the task is "
    "too small and too easy to separate Soft MoE, expert choice, token choice and dense. Soft MoE "
    "without normalization is the lowest (0.960), as in the paper's ablation, but within the noise. "
    "Wall-clock columns were measured before the dense-FFN layout fix of 2026-12-02 (commit 0d5595d), "
    "which made dense FFN blocks faster on CPU (timings in that commit); they overstate every model's time, the dense "
    "models' most."
  ),
  paper=(
    "Soft MoE (S/14, JFT / ImageNet 10-shot): Soft MoE 54.3/74.8 > uniform mixing 51.8/70.0 > identity "
    "routing 51.5/69.1 > dense ViT 48.3/62.3; Soft > EC > token choice > dense at matched cost."
  ),
)

if __name__ == "__main__":
  sys.exit(main(EXPERIMENT))
