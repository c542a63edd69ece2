"""Fine-tuning dense and MoE models on a small set of another distribution (ST-MoE §4-5).

  python -m experiments.finetune [--scale quick|paper|smoke] [--seeds 0,1,2]

Each seed pretrains two models on the embedded Markov mixture (`configs/lm_routers.py`: dense, and
the top-2 MoE with E = 8 in blocks 2 and 4), then fine-tunes each on a small training set drawn
from *other* Markov sources (data.markov.seed 1: new transition tables, same vocabulary), evaluating
on that distribution's validation split every few steps:
  dense_full          every parameter of the dense model
  dense_lora          LoRA rank 8 (alpha 16) on the dense model's attention and FFN matrices
  moe_full            every parameter of the MoE
  moe_frozen_experts  the MoE with its experts frozen (optim.freeze experts; ST-MoE's recommendation)
  moe_experts_only    the MoE with everything but its experts frozen
  moe_lora            LoRA rank 8 on the MoE's attention, dense FFN and every expert (per expert)
All fine-tunes: constant learning rate 1e-3 after 10 warm-up steps, fresh AdamW, the same steps.
The table leads with the final eval loss; "best eval" is the lowest eval of the run and
"final vs best" how far over-fitting has taken it from that; eval_vs_step.png draws the eval
curves (solid) over the train curves (dotted). The two pretraining rows are evaluated on their own
(pretraining) data.

Quick scale: pretraining 250 steps of 16 × 64 tokens on 20k sequences; fine-tuning 150 steps on 64
sequences (about 37 passes), eval every 10 steps on 256. Paper scale: the 12-block d = 768 decoder
pretrained on C4 (100k steps), fine-tuned 20k steps on 8 MiB of lm1b.

Result at the quick scale (2026-12-04, the 2-core CPU dev VM, jax 0.10.2; 8 min for the 18
fine-tunes, other jobs running beside them; eval cross-entropy on the new sources, mean ± std over
seeds 0-2; best: the run's lowest eval, at step):
  dense_full 4.311 ± 0.063 (best 3.172 at step 50-60); dense_lora 3.435 ± 0.010 (still falling at
  150); moe_full 4.149 ± 0.062 (best 3.085 at 50-60); moe_frozen_experts 4.019 ± 0.023 (best 3.266
  at 70); moe_experts_only 3.502 ± 0.043 (best 3.144 at 90); moe_lora 3.240 ± 0.020 (best 3.239,
  140-150). Trained parameters: 0.456M, 0.049M, 1.489M, 0.310M, 1.180M, 0.157M.
Table, CSV, LaTeX and plots (eval_vs_step.png: the over-fitting curves): experiments/results/finetune/quick/.
"""

import sys

from experiments.framework import PAPER_LM, QUICK_LM, Experiment, Variant, main

ROUTERS = "configs/lm_routers.py"
DENSE, MOE = f"{ROUTERS}:dense", f"{ROUTERS}:top2"
QUICK_FINETUNE = {
  "train.num_steps": 150,
  "train.eval_every": 10,
  "train.checkpoint_every": 150,
  "data.markov.seed": 1,
  "data.markov.num_train": 64,
  "data.markov.num_validation": 256,
  "data.num_eval_batches": 8,
  "optim.learning_rate": 1e-3,
  "optim.schedule": "constant",
  "optim.warmup_steps": 10,
}
PAPER_FINETUNE = {
  "train.num_steps": 20_000,
  "train.eval_every": 500,
  "train.checkpoint_every": 5000,
  "data.tfds.name": "lm1b",
  "data.tfds.max_bytes": 8 * 2**20,
  "optim.learning_rate": 1e-4,
  "optim.schedule": "constant",
  "optim.warmup_steps": 500,
}
FINETUNE = {"quick": QUICK_FINETUNE, "paper": PAPER_FINETUNE}
LORA = {"lora.rank": 8, "lora.alpha": 16.0}


def _tune(label, source, config, overrides=None, note=""):
  return Variant(label, config, overrides or {}, init_from=source, per_scale=FINETUNE, note=note)


EXPERIMENT = Experiment(
  name="finetune",
  title="Fine-tuning on a small set of another distribution: dense vs MoE, full vs frozen vs LoRA",
  variants=(
    Variant("dense_pretrain", DENSE, note="pretraining (own data)"),
    Variant("moe_pretrain", MOE, note="pretraining (own data)"),
    _tune("dense_full", "dense_pretrain", DENSE),
    _tune("dense_lora", "dense_pretrain", DENSE, {**LORA, "lora.targets": ("attention", "dense_ffn")}),
    _tune("moe_full", "moe_pretrain", MOE),
    _tune("moe_frozen_experts", "moe_pretrain", MOE, {"optim.freeze": ("experts",)}),
    _tune("moe_experts_only", "moe_pretrain", MOE, {"optim.freeze": ("non_experts",)}),
    _tune("moe_lora", "moe_pretrain", MOE, {**LORA, "lora.targets": ("attention", "experts", "dense_ffn")}),
  ),
  scales={"quick": QUICK_LM, "paper": PAPER_LM},
  eval_curves=True,
  found=(
    "Every full fine-tune over-fits the 64 sequences: train loss falls to 0.05 while the eval loss, "
    "best at step 50-60, ends 1.1 nats above its best. Disagrees with ST-MoE §4 at this scale: the MoE "
    "over-fits no more than the dense model (final vs best 1.06 ± 0.06 vs 1.14 ± 0.04) and its best "
    "eval is lower (3.085 vs 3.172). Disagrees with ST-MoE §5: freezing the experts (training 21% of "
    "the parameters) over-fits less but reaches a worse best (3.266) than full fine-tuning, and "
    "training only the experts does better than that (3.144). The likely reason: here the new "
    "distribution differs in its transition tables, token-level knowledge that the FFNs hold (the "
    "experts route by the current token, notebooks/results_explorer.ipynb), whereas SuperGLUE's tasks "
    "differ from pretraining in format more than in knowledge. LoRA (rank 8; 11% of the dense "
    "model's parameters, 11% of the MoE's) does not over-fit in 150 steps and ends best of all "
    "(MoE 3.240, dense 3.435), but above early-stopped full fine-tuning; the MoE is ahead of the "
    "dense model in every arm."
  ),
  paper=(
    "ST-MoE (Zoph et al. 2022) §4: sparse models over-fit small fine-tuning sets more than dense "
    "ones (they do worse on SuperGLUE's small tasks, better on the large ones); §5: fine-tuning only "
    "the non-expert parameters does about as well as fine-tuning all, fine-tuning only the experts "
    "does worse. LoRA (Hu et al. 2021) matches full fine-tuning with far fewer trained parameters."
  ),
)

if __name__ == "__main__":
  sys.exit(main(EXPERIMENT))
