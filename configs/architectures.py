"""Published MoE architectures at full size: the released models' function, their sizes, their recipes.

  python -m moejax.count_params --config configs/architectures.py:<preset>     # no weights allocated
  python -m moejax.main --config configs/architectures.py:<preset> --workdir ...  # needs accelerators

Each preset sets every architectural option of the released config.json (RoPE base, RMSNorm
eps, QK-norm and its scope, attention biases, which blocks are MoE, top-k renormalisation,
shared experts and their gate). tests/test_hf_parity.py checks that a small model with those
options, converted from transformers' own implementation (`moejax.convert.hf`), gives
transformers' logits (float32 max |Δ| < 1e-4, the same experts for every token) and that the
preset's options are the converted ones. Where each architecture is defined:
  mixtral_8x7b       Jiang et al. 2024, "Mixtral of Experts"; mistralai/Mixtral-8x7B-v0.1 config.json;
                     transformers' modeling_mixtral. 46.7B total, 12.9B active.
  mixtral_8x22b      Mistral AI model card 2024; mistralai/Mixtral-8x22B-v0.1; modeling_mixtral.
                     141B total, 39B active.
  olmoe_1b_7b        Muennighoff et al. 2024, "OLMoE"; allenai/OLMoE-1B-7B-0924; modeling_olmoe.
                     6.9B total, 1.3B active.
  qwen3_30b_a3b      Qwen3 technical report 2025; Qwen/Qwen3-30B-A3B; modeling_qwen3_moe.
                     30.5B total, 3.3B active (truncated: counted 3.35B).
  qwen3_235b_a22b    Qwen3 technical report 2025; Qwen/Qwen3-235B-A22B; modeling_qwen3_moe.
                     235B total, 22B active (counted 235.09B / 22.19B).
  qwen2_57b_a14b     Qwen2 technical report 2024; Qwen/Qwen2-57B-A14B; modeling_qwen2_moe.
                     57B total, 14B active.
  qwen1_5_moe_a2_7b  Qwen blog "Qwen1.5-MoE" 2024; Qwen/Qwen1.5-MoE-A2.7B; modeling_qwen2_moe.
                     14.3B total, 2.7B active.
Counted figures: tests/test_presets.py (`nnx.eval_shape`, nothing allocated). Active parameters
include the embedding and unembedding matrices, as the published figures do.

Training recipes (the balance loss as the release's reference code computes it, so that the
published coefficient means the same here): transformers' load_balancing_loss_func, one loss over
all layers' router logits pooled, any-of-top-K density, times router_aux_loss_coef from the
released config.json (Mixtral 8x7B 0.02, 8x22B 0.001, Qwen 0.001), no z-loss; OLMoE: the paper's
load-balancing 0.01 and router z-loss 0.001. Not modelled (no effect on these releases'
function at the context lengths their configs give): sliding windows (off in every release
here), YaRN / other RoPE scalings (refused by the converter).

The training fields are a starting point for an accelerator pod (bfloat16 activations, 4k
tokens per sequence, dropless routing, a TFDS text dataset you have prepared, byte-tokenized);
set mesh.expert, train.batch_size and the data for your machine.
"""

from moejax.config import base_config, common

# (published total, published active), in parameters, at the precision they were published.
PUBLISHED = {
  "mixtral_8x7b": (46.7e9, 12.9e9),
  "mixtral_8x22b": (141e9, 39e9),
  "olmoe_1b_7b": (6.9e9, 1.3e9),
  "qwen3_30b_a3b": (30.5e9, 3.3e9),
  "qwen3_235b_a22b": (235e9, 22e9),
  "qwen2_57b_a14b": (57e9, 14e9),
  "qwen1_5_moe_a2_7b": (14.3e9, 2.7e9),
}

# transformers' load_balancing_loss_func, which every release below trains with in its reference
# code: one loss for the whole model over all layers' router logits pooled (f and P over the
# whole batch), any-of-top-K density (shares sum to K), times router_aux_loss_coef; no z-loss.
_HF_BALANCE = {
  "moe.load_balance_density": "topk_sum",
  "moe.load_balance_pooling": "all_layers",
  "moe.load_balance_scope": "global_batch",
  "moe.z_loss_weight": 0.0,
}

_MIXTRAL = {
  "model.activation": "swiglu",
  "model.moe_every": 1,
  "model.head_dim": 128,
  "model.num_kv_heads": 8,
  "model.rope_theta": 1e6,
  "model.norm_eps": 1e-5,
  "moe.num_experts": 8,
  "moe.top_k": 2,
  "moe.combine_weights": "renormalized",  # softmax over all 8, top-2, renormalised
  "moe.dispatcher": "dropless",
  **_HF_BALANCE,
}

_QWEN_MOE = {
  "model.activation": "swiglu",
  "model.moe_every": 1,  # decoder_sparse_step 1, mlp_only_layers []: every block is MoE.
  "model.rope_theta": 1e6,
  "model.norm_eps": 1e-6,
  "model.head_dim": 128,
  "moe.dispatcher": "dropless",
  "moe.load_balance_loss_weight": 1e-3,  # router_aux_loss_coef
  **_HF_BALANCE,
}

# Qwen3-MoE's released options, the same in Qwen3-30B-A3B and Qwen3-235B-A22B.
_QWEN3_MOE = {
  **_QWEN_MOE,
  "model.vocab_size": 151936,
  "model.num_kv_heads": 4,
  "model.qk_norm": True,
  "model.qk_norm_scope": "per_head",
  "moe.num_experts": 128,
  "moe.top_k": 8,
  "moe.combine_weights": "renormalized",  # norm_topk_prob True
}

PRESETS = {
  "mixtral_8x7b": {
    **_MIXTRAL,
    "model.vocab_size": 32000,
    "model.num_layers": 32,
    "model.d_model": 4096,
    "model.num_heads": 32,
    "model.d_ff": 14336,
    "moe.load_balance_loss_weight": 0.02,  # router_aux_loss_coef of the released config.json
  },
  "mixtral_8x22b": {
    **_MIXTRAL,
    "model.vocab_size": 32768,
    "model.num_layers": 56,
    "model.d_model": 6144,
    "model.num_heads": 48,
    "model.d_ff": 16384,
    "moe.load_balance_loss_weight": 1e-3,  # router_aux_loss_coef of the released config.json
  },
  "olmoe_1b_7b": {
    "model.vocab_size": 50304,
    "model.num_layers": 16,
    "model.d_model": 2048,
    "model.num_heads": 16,
    "model.d_ff": 1024,
    "model.activation": "swiglu",
    "model.moe_every": 1,
    "model.qk_norm": True,
    "model.qk_norm_scope": "projection",  # one RMSNorm over all 16 heads of q (and of k)
    "model.rope_theta": 10000.0,
    "model.norm_eps": 1e-5,
    "moe.num_experts": 64,
    "moe.top_k": 8,
    "moe.combine_weights": "raw",  # norm_topk_prob False: no top-k renormalisation
    "moe.dispatcher": "dropless",
    **_HF_BALANCE,
    "moe.load_balance_loss_weight": 1e-2,  # OLMoE paper: load balancing 0.01 ...
    "moe.z_loss_weight": 1e-3,  # ... and router z-loss 0.001
  },
  "qwen3_30b_a3b": {
    **_QWEN3_MOE,
    "model.num_layers": 48,
    "model.d_model": 2048,
    "model.num_heads": 32,
    "model.d_ff": 6144,  # intermediate_size: no block is dense, so no parameter has it.
    "moe.d_expert": 768,
  },
  "qwen3_235b_a22b": {
    **_QWEN3_MOE,
    "model.num_layers": 94,
    "model.d_model": 4096,
    "model.num_heads": 64,
    "model.d_ff": 12288,  # intermediate_size: no block is dense, so no parameter has it.
    "moe.d_expert": 1536,
  },
  "qwen2_57b_a14b": {
    **_QWEN_MOE,
    "model.vocab_size": 151936,
    "model.num_layers": 28,
    "model.d_model": 3584,
    "model.num_heads": 28,
    "model.num_kv_heads": 4,
    "model.attention_bias": "qkv",
    "model.d_ff": 18944,  # intermediate_size: no block is dense, so no parameter has it.
    "moe.d_expert": 2560,
    "moe.num_experts": 64,
    "moe.top_k": 8,
    "moe.num_shared_experts": 8,  # shared_expert_intermediate_size 20480 = 8 × 2560
    "moe.shared_expert_gate": "sigmoid",
    "moe.combine_weights": "raw",  # norm_topk_prob False
  },
  "qwen1_5_moe_a2_7b": {
    **_QWEN_MOE,
    "model.vocab_size": 151936,
    "model.num_layers": 24,
    "model.d_model": 2048,
    "model.num_heads": 16,
    "model.num_kv_heads": 16,
    "model.attention_bias": "qkv",
    "model.d_ff": 5632,
    "moe.d_expert": 1408,
    "moe.num_experts": 60,
    "moe.top_k": 4,
    "moe.num_shared_experts": 4,  # shared_expert_intermediate_size 5632 = 4 × 1408
    "moe.shared_expert_gate": "sigmoid",
    "moe.combine_weights": "raw",  # norm_topk_prob False
  },
}


def get_config(preset="mixtral_8x7b"):
  config = base_config("lm")
  config.model.dtype = "bfloat16"
  config.train.seq_len = 4096
  config.train.batch_size = 256
  config.data.source = "tfds"
  config.data.tfds.name = "lm1b"
  return common.with_preset(config, PRESETS, preset)
