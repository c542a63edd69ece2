"""Every routing family on the decoder LM (synthetic Markov mixture), one preset per router.

  python -m moejax.main --config configs/lm_routers.py:<preset> --workdir workdirs/lm_<preset>

Presets (the quickstart model, 4 blocks with MoE in blocks 2 and 4, unless said otherwise):
  dense           dense baseline (no MoE)
  switch          top-1 (Switch), raw weights, capacity factor 1.25
  gshard          top-2, renormalized weights, GShard's random 2nd expert
  top2            top-2, raw weights (vmoe), token-major priority
  jitter          Switch with multiplicative router jitter (ε = 0.01)
  noisy_top_k     top-2 with learned noise; Shazeer's importance and load losses instead of Switch's
  dropless        top-2 without capacity (MegaBlocks-style block loop on CPU)
  hash            hash routing of token ids (no learned router)
  dense_gated     every expert for every token, softmax weights
  deepseek        DeepSeek-V3: sigmoid scores, aux-loss-free bias, 4 groups keep 2, 1 shared expert,
                  16 fine-grained experts of a quarter size, top-4
  deepseek_v2     DeepSeekMoE/V2-style: softmax scores, no bias, 2 shared + 16 fine-grained experts,
                  top-4, any-of-top-K balance loss over the global batch
  expert_choice   expert choice, capacity factor 2 (not causal: allowed explicitly)
  soft_moe        soft MoE, 1 slot per expert (not causal: allowed explicitly)
  bpr             top-2 with batch-prioritized routing (not causal: allowed explicitly)
"""

from moejax.config import common

PRESETS = {
  "dense": {"model.moe_every": 0},
  "switch": {"moe.top_k": 1},
  "gshard": {"moe.combine_weights": "renormalized", "moe.second_expert_policy": "random"},
  "top2": {},
  "jitter": {"moe.top_k": 1, "moe.router_noise": "jitter"},
  "noisy_top_k": {
    "moe.router_noise": "noisy_top_k",
    "moe.load_balance_loss_weight": 0.0,
    "moe.importance_loss_weight": 1e-2,
    "moe.load_loss_weight": 1e-2,
  },
  "dropless": {"moe.dispatcher": "dropless"},
  "hash": {"moe.router": "hash", "moe.top_k": 1},  # Nothing is learned: no balance loss.
  "dense_gated": {"moe.router": "dense"},
  "deepseek": {
    "moe.router": "deepseek",
    "moe.score_function": "sigmoid",
    "moe.combine_weights": "renormalized",
    "moe.num_experts": 16,
    "moe.top_k": 4,
    "moe.d_expert": 96,
    "moe.num_expert_groups": 4,
    "moe.top_expert_groups": 2,
    "moe.num_shared_experts": 1,
    "moe.load_balance_loss_weight": 1e-4,
    "moe.load_balance_density": "topk",
  },  # V3's sequence-wise loss counts all K.
  "deepseek_v2": {
    "moe.router": "deepseek",
    "moe.score_function": "softmax",
    "moe.bias_update_rate": 0.0,
    "moe.num_experts": 16,
    "moe.top_k": 4,
    "moe.d_expert": 96,
    "moe.num_shared_experts": 2,
    "moe.load_balance_density": "topk",
    "moe.load_balance_scope": "global_batch",
  },
  "expert_choice": {"moe.router": "expert_choice", "moe.capacity_factor": 2.0, "moe.allow_noncausal": True},
  "soft_moe": {"moe.router": "soft_moe", "moe.allow_noncausal": True},
  "bpr": {"moe.priority": "bpr", "moe.allow_noncausal": True},
}


def get_config(preset="top2"):
  return common.with_preset(common.small_lm(), PRESETS, preset)
