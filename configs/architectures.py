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
  dbrx               Databricks blog "Introducing DBRX" 2024; databricks/dbrx-base config.json;
                     modeling_dbrx. 132B total, 36B active (counted 131.60B / 36.47B).
  arctic             Snowflake blog "Snowflake Arctic" 2024; Snowflake/snowflake-arctic-base config.json
                     and modeling_arctic.py (not in transformers: its pieces are tested by hand,
                     tests/test_grok_arctic.py). 480B total, 17B active (counted 478.58B / 17.32B).
  grok_1             xAI 2024, "Open Release of Grok-1"; xai-org/grok-1 run.py and model.py (JAX; not
                     in transformers: pieces tested by hand). 314B total (counted 315.68B, see
                     PUBLISHED_TOLERANCE); active not published beyond "25% of the weights"
                     (counted 83.76B, 26.5%).
  gpt_oss_120b       OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card"; openai/gpt-oss-120b;
                     modeling_gpt_oss. 116.83B total, 5.13B active (counted 116.83B / 5.13B
                     without the input embedding, as the card counts).
  gpt_oss_20b        The same card; openai/gpt-oss-20b. 20.91B total, 3.61B active (counted
                     20.91B / 3.61B without the input embedding).
  deepseek_v2        DeepSeek-AI 2024, "DeepSeek-V2" (MLA §2.1, device-limited routing and its
                     balance losses §2.2); deepseek-ai/DeepSeek-V2; modeling_deepseek_v2.
                     236B total, 21B active (counted 235.74B / 20.85B without the input embedding).
  deepseek_v2_lite   The DeepSeek-V2 paper, Appendix B; deepseek-ai/DeepSeek-V2-Lite. 15.7B total,
                     2.4B active (counted 15.71B / 2.45B without the input embedding).
  deepseek_v3        DeepSeek-AI 2024, "DeepSeek-V3" (node-limited routing, auxiliary-loss-free
                     balancing, MTP §2.2); deepseek-ai/DeepSeek-V3 config.json and README_WEIGHTS.md;
                     modeling_deepseek_v3. 671B total, 36.7B active, both without the MTP module
                     (the checkpoint: 685B); counted 671.03B / 36.63B without the input embedding
                     (37.55B with it, although README_WEIGHTS.md says its 36.7B includes it), MTP
                     11.61B apart (published 11.5B; 11.51B without its eh_proj).
Counted figures: tests/test_presets.py (`nnx.eval_shape`, nothing allocated). Active parameters
include the embedding and unembedding matrices, as the published figures do, but DeepSeek's and
gpt-oss's, which leave out the input embedding (ACTIVE_WITHOUT_EMBEDDING).

Training recipes (the balance loss as the release's reference code computes it, so that the
published coefficient means the same here): transformers' load_balancing_loss_func, one loss over
all layers' router logits pooled, any-of-top-K density, times router_aux_loss_coef from the
released config.json (Mixtral 8x7B 0.02, 8x22B 0.001, Qwen 0.001), no z-loss; OLMoE: the paper's
load-balancing 0.01 and router z-loss 0.001; DeepSeek: its own per-sequence loss, α = the
released aux_loss_alpha (V2 0.003, V2-Lite 0.001), V3 the paper's 1e-4 beside the bias (γ 1e-3);
V2 also its device- and communication-level losses (α2 0.05, α3 0.02), over its 8 device groups.
Not modelled: Qwen's sliding windows (off in every release here).

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
  "deepseek_v2": (236e9, 21e9),
  "deepseek_v2_lite": (15.7e9, 2.4e9),
  "deepseek_v3": (671e9, 36.7e9),
  "dbrx": (132e9, 36e9),
  "arctic": (480e9, 17e9),
  "grok_1": (314e9, None),  # xAI gives no active count: "25% of the weights active on a given token".
  "gpt_oss_120b": (116.83e9, 5.13e9),
  "gpt_oss_20b": (20.91e9, 3.61e9),
  "qwen1_5_moe_a2_7b": (14.3e9, 2.7e9),
}

# Where the released code's shapes give more than the published figure allows, and why: Grok-1's
# 314B (xAI's announcement) is 0.54% below the 315.68B that xai-org/grok-1's run.py and model.py
# build (its 318 GB checkpoint of 8-bit weights agrees with the larger figure).
PUBLISHED_TOLERANCE = {"grok_1": 0.006}

# Presets whose published active count leaves out the input embedding (a lookup, no matmul):
# DeepSeek's and gpt-oss's. gpt-oss's model card gives 5.13B and 3.61B active, what moejax counts
# without it (5.71B and 4.19B with it); DeepSeek-V3's 36.7B (README_WEIGHTS.md) is matched by
# 36.63B without it, not by 37.55B with it, although that file says the 36.7B includes the
# embedding; V2-Lite's 2.4B by 2.45B (2.66B with it).
ACTIVE_WITHOUT_EMBEDDING = {"deepseek_v2", "deepseek_v2_lite", "deepseek_v3", "gpt_oss_120b", "gpt_oss_20b"}

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

# DeepSeek-V2's and V3's released options (config.json; DeepSeek's modeling code): multi-head
# latent attention with interleaved RoPE and YaRN (factor 40 over a 4k pre-training context),
# DeepSeekMoE (fine-grained routed experts, shared experts, the first blocks dense), no z-loss.
_DEEPSEEK = {
  "model.attention": "mla",
  "model.kv_lora_rank": 512,
  "model.qk_nope_head_dim": 128,
  "model.qk_rope_head_dim": 64,
  "model.v_head_dim": 128,
  "model.activation": "swiglu",
  "model.moe_every": 1,
  "model.norm_eps": 1e-6,
  "model.rope_theta": 10000.0,
  "model.rope_interleaved": True,
  "model.rope_scaling": "yarn",
  "model.yarn_factor": 40.0,
  "model.yarn_original_max_len": 4096,
  "model.yarn_beta_fast": 32.0,
  "model.yarn_beta_slow": 1.0,
  "moe.router": "deepseek",
  "moe.dispatcher": "dropless",
  # DeepSeek's balance loss: α·Σ f_i·P_i per MoE layer over each sequence (seq_aux), f_i =
  # E/(K·T)·count_i — moejax's 'topk' density (shares sum to 1) times E.
  "moe.load_balance_density": "topk",
  "moe.load_balance_pooling": "per_layer",
  "moe.load_balance_scope": "group",
  "moe.z_loss_weight": 0.0,
}

# DeepSeek-V2 and V2-Lite: softmax affinities, raw top-k weights, no balancing bias, YaRN mscale 0.707.
_DEEPSEEK_V2 = {
  **_DEEPSEEK,
  "model.vocab_size": 102400,
  "model.dense_layers": (0,),  # first_k_dense_replace 1
  "model.yarn_mscale": 0.707,
  "model.yarn_mscale_all_dim": 0.707,
  "moe.score_function": "softmax",
  "moe.combine_weights": "raw",  # norm_topk_prob False
  "moe.bias_update_rate": 0.0,
  "moe.num_shared_experts": 2,
}

# gpt-oss's released options (openai/gpt-oss-20b and -120b config.json; transformers'
# modeling_gpt_oss): 64 query heads of 64 dims on 8 key/value heads with q/k/v/o biases and a
# learned sink per head, a 128-token window in every other block (the even ones), YaRN (factor
# 32 over 4k, the ramp not truncated), top-4 with a router bias and softmax over the chosen,
# clamped SwiGLU experts (α 1.702, limit 7) with biases; no dense block, no shared expert.
_GPT_OSS = {
  "model.vocab_size": 201088,
  "model.d_model": 2880,
  "model.num_heads": 64,
  "model.num_kv_heads": 8,
  "model.head_dim": 64,
  "model.attention_bias": "qkvo",
  "model.attention_sinks": True,
  "model.sliding_window": 128,
  "model.full_attention_every": 2,
  "model.rope_theta": 150000.0,
  "model.rope_scaling": "yarn",
  "model.yarn_factor": 32.0,
  "model.yarn_original_max_len": 4096,
  "model.yarn_beta_fast": 32.0,
  "model.yarn_beta_slow": 1.0,
  "model.yarn_truncate": False,
  "model.norm_eps": 1e-5,
  "model.activation": "clamped_swiglu",
  "model.d_ff": 2880,
  "model.moe_every": 1,
  "moe.top_k": 4,
  "moe.router_bias": True,
  "moe.expert_bias": True,
  "moe.combine_weights": "renormalized",
  "moe.dispatcher": "dropless",
  **_HF_BALANCE,
  "moe.load_balance_loss_weight": 0.9,  # router_aux_loss_coef of the released config.json
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
  "deepseek_v2": {
    **_DEEPSEEK_V2,
    "model.num_layers": 60,
    "model.d_model": 5120,
    "model.num_heads": 128,
    "model.q_lora_rank": 1536,
    "model.d_ff": 12288,
    "moe.num_experts": 160,
    "moe.top_k": 6,
    "moe.d_expert": 1536,
    "moe.routed_scaling_factor": 16.0,
    # Device-limited routing: 8 groups (devices), a token's experts on its best 3 by their best expert.
    "moe.num_expert_groups": 8,
    "moe.top_expert_groups": 3,
    "moe.group_score": "max",
    "moe.load_balance_loss_weight": 3e-3,  # α1 (expert level), aux_loss_alpha of config.json
    "moe.device_balance_loss_weight": 0.05,  # α2 (device level), the paper's §3.1.2 ...
    "moe.comm_balance_loss_weight": 0.02,  # ... and α3 (communication)
  },
  "deepseek_v2_lite": {
    **_DEEPSEEK_V2,
    "model.num_layers": 27,
    "model.d_model": 2048,
    "model.num_heads": 16,
    "model.q_lora_rank": 0,  # Queries straight from x.
    "model.d_ff": 10944,
    "moe.num_experts": 64,
    "moe.top_k": 6,
    "moe.d_expert": 1408,
    "moe.routed_scaling_factor": 1.0,
    "moe.load_balance_loss_weight": 1e-3,  # aux_loss_alpha of config.json
  },
  "deepseek_v3": {
    **_DEEPSEEK,
    "model.vocab_size": 129280,
    "model.num_layers": 61,
    "model.d_model": 7168,
    "model.num_heads": 128,
    "model.q_lora_rank": 1536,
    "model.d_ff": 18432,
    "model.dense_layers": (0, 1, 2),  # first_k_dense_replace 3
    "model.yarn_mscale": 1.0,
    "model.yarn_mscale_all_dim": 1.0,
    "moe.num_experts": 256,
    "moe.top_k": 8,
    "moe.d_expert": 2048,
    "moe.num_shared_experts": 1,
    "moe.score_function": "sigmoid",
    "moe.combine_weights": "renormalized",  # norm_topk_prob True
    "moe.routed_scaling_factor": 2.5,
    # Node-limited routing: 8 groups (nodes), a token's experts on its best 4 by their top-2 sum.
    "moe.num_expert_groups": 8,
    "moe.top_expert_groups": 4,
    "moe.group_score": "top2_sum",
    "moe.bias_update_rate": 1e-3,  # γ of the auxiliary-loss-free balancing (V3 paper §4.2)
    # The sequence-wise balance loss's α: the V3 paper's 1e-4 (§4.2), "to avoid extreme imbalance
    # within any single sequence"; the released config.json's aux_loss_alpha says 1e-3.
    "moe.load_balance_loss_weight": 1e-4,
    # One multi-token-prediction module (num_nextn_predict_layers 1), λ 0.3 (the paper's for the
    # first 10T tokens, then 0.1).
    "model.mtp_depth": 1,
    "model.mtp_loss_weight": 0.3,
  },
  "dbrx": {
    "model.vocab_size": 100352,
    "model.num_layers": 40,
    "model.d_model": 6144,
    "model.num_heads": 48,
    "model.num_kv_heads": 8,
    "model.head_dim": 128,
    "model.norm": "layer",  # LayerNorm without bias, nn.LayerNorm's epsilon
    "model.norm_eps": 1e-5,
    "model.clip_qkv": 8.0,
    "model.rope_theta": 500000.0,
    "model.activation": "swiglu",
    "model.d_ff": 10752,
    "model.moe_every": 1,
    "moe.num_experts": 16,
    "moe.top_k": 4,
    "moe.combine_weights": "renormalized",  # moe_normalize_expert_weights 1: the top-4 / their sum
    "moe.dispatcher": "dropless",
    # moe_jitter_eps 0.01: in training the router scales its input in place, so the experts see it too.
    "moe.router_noise": "jitter",
    "moe.jitter_eps": 0.01,
    "moe.jitter_scope": "router_and_experts",
    **_HF_BALANCE,
    "moe.load_balance_loss_weight": 0.05,  # moe_loss_weight
  },
  "arctic": {  # Snowflake/snowflake-arctic-base config.json, modeling_arctic.py (trust_remote_code).
    "model.vocab_size": 32000,
    "model.num_layers": 35,
    "model.d_model": 7168,
    "model.num_heads": 56,
    "model.num_kv_heads": 8,
    "model.head_dim": 128,
    "model.norm_eps": 1e-5,
    "model.rope_theta": 10000.0,
    "model.activation": "swiglu",
    "model.d_ff": 4864,  # intermediate_size: the experts'
    "model.moe_every": 1,  # moe_layer_frequency 1
    # parallel_attn_mlp_res: a dense residual MLP of hidden size hidden_size beside the MoE.
    "model.parallel_dense_d_ff": 7168,
    "moe.num_experts": 128,
    "moe.top_k": 2,
    "moe.combine_weights": "renormalized",  # Mixtral's routing (softmax, top-2, renormalised)
    "moe.dispatcher": "dropless",
    **_HF_BALANCE,
    "moe.load_balance_loss_weight": 1e-3,  # router_aux_loss_coef
  },
  "grok_1": {  # xai-org/grok-1 run.py (its LanguageModelConfig) and model.py.
    "model.vocab_size": 131072,
    "model.num_layers": 64,
    "model.d_model": 6144,
    "model.num_heads": 48,
    "model.num_kv_heads": 8,
    "model.head_dim": 128,
    "model.norm_eps": 1e-5,
    "model.rope_theta": 10000.0,
    "model.post_norms": True,  # a norm after the attention and after the MoE, as before them
    "model.attention_softcap": 30.0,  # max_attn_val: logits 30·tanh(s / 30), s scaled by 1/√128
    "model.embed_multiplier": 78.38367176906169,
    "model.output_multiplier": 0.5773502691896257,
    "model.tie_embeddings": True,  # InOutEmbed: the output head is the embedding
    "model.activation": "geglu",  # gelu(x·W) ⊙ (x·V), then W_1
    "model.d_ff": 32768,  # ffn_size(6144, widening_factor 8): int(8·6144)·2 // 3, a multiple of 8
    "model.moe_every": 1,
    "moe.num_experts": 8,
    "moe.top_k": 2,
    "moe.combine_weights": "raw",  # the softmax probabilities of the chosen two
    "moe.dispatcher": "dropless",
  },
  "gpt_oss_120b": {**_GPT_OSS, "model.num_layers": 36, "moe.num_experts": 128},
  "gpt_oss_20b": {**_GPT_OSS, "model.num_layers": 24, "moe.num_experts": 32},
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
