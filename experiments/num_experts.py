"""Number of experts at fixed active FLOPs, Switch top-1 (Switch Fig. 4).

  python -m experiments.num_experts [--scale quick|paper|smoke] [--seeds 0,1,2]

Switch top-1 on `configs/lm_routers.py` (Markov mixture, MoE every other block, experts of the
dense hidden size f, so active FLOPs do not change with E) with E = 1, 2, 8, 32 and 64 experts,
against the dense model. E = 1 is the dense model with a router gate in the MoE blocks.
"""

import sys

from experiments.framework import PAPER_LM, QUICK_LM, Experiment, Variant, main

ROUTERS = "configs/lm_routers.py"
QUICK_EXPERTS = (1, 2, 8, 32, 64)

EXPERIMENT = Experiment(
    name="num_experts",
    title="Number of experts at fixed active FLOPs (Switch top-1)",
    variants=(Variant("dense", f"{ROUTERS}:dense"),) + tuple(
        Variant(f"E{e}", f"{ROUTERS}:switch", {"moe.num_experts": e}) for e in QUICK_EXPERTS),
    scales={"quick": QUICK_LM, "paper": PAPER_LM},
    baseline="dense",
    paper=("Switch Fig. 4: at equal FLOPs per token, loss falls monotonically with the number of experts "
           "(2 to 256); with little data the gains of few experts can vanish."),
)

if __name__ == "__main__":
  sys.exit(main(EXPERIMENT))
