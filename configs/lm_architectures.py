"""The released models' architectural pieces on the quickstart's decoder, one preset per piece.

  python -m moejax.main --config configs/lm_architectures.py:<preset> --workdir workdirs/arch_<preset>

Each preset is the quickstart model (4 blocks at d = 96, MoE in blocks 2 and 4, 8 experts, top-2,
synthetic Markov mixture) with one piece of a model of configs/architectures.py switched on, at
a size that trains in minutes on a laptop (tests/test_architecture_pieces.py trains each):
  mla            DeepSeek's multi-head latent attention: query and key/value latents, decoupled
                 RoPE, interleaved pairs, YaRN (factor 4 over a 32-token "pre-training" context)
  mtp            DeepSeek-V3's multi-token prediction: 2 extra depths, loss weight 0.3
  deepseek_v3    the two together with V3's routing: sigmoid affinities, balancing bias, 4 groups
                 of 4 fine-grained experts keep 2 by their top-2 sum, 1 shared expert, weights ×
                 2.5, the first block dense, V3's sequence-wise balance loss
  deepseek_v2    MLA with V2's routing: softmax, 4 groups (devices) keep 2 by their best expert, 2
                 shared experts, weights × 4 (V2's × 16 is for its 160 experts), V2's expert-,
                 device- and communication-level balance losses
  sliding_sinks  gpt-oss's attention: a 16-token sliding window in every other block, a learned
                 sink logit per head
  dbrx           DBRX: LayerNorm without bias, q/k/v clipped (at ±2 here), 16 fine-grained experts
                 top-4, router jitter on the router's and experts' input
  arctic         Snowflake Arctic: a dense SwiGLU FFN on the residual stream in every MoE block, the
                 MoE beside it reading the block's input
  grok_1         Grok-1: sandwich norms, attention logits capped at 30, embeddings × √d, logits ×
                 1/√3, tied embeddings, GeGLU experts with raw top-2 weights
  gpt_oss        all of gpt-oss: those, q/k/v/o biases, grouped-query attention, YaRN (not
                 truncated), top-4 with a router bias over clamped SwiGLU experts with biases
"""

from moejax.config import common

_MLA = {
  "model.attention": "mla",
  "model.q_lora_rank": 48,
  "model.kv_lora_rank": 32,
  "model.qk_nope_head_dim": 16,
  "model.qk_rope_head_dim": 8,
  "model.v_head_dim": 24,
  "model.rope_interleaved": True,
  "model.rope_scaling": "yarn",
  "model.yarn_factor": 4.0,
  "model.yarn_original_max_len": 32,
  "model.yarn_mscale": 0.707,
  "model.yarn_mscale_all_dim": 0.707,
}

_FINE_GRAINED = {
  "model.activation": "swiglu",
  "model.moe_every": 1,
  "model.dense_layers": (0,),
  "moe.router": "deepseek",
  "moe.dispatcher": "dropless",
  "moe.num_experts": 16,
  "moe.top_k": 4,
  "moe.d_expert": 64,
  "moe.num_expert_groups": 4,
  "moe.top_expert_groups": 2,
  "moe.load_balance_density": "topk",
  "moe.z_loss_weight": 0.0,
}

PRESETS = {
  "mla": _MLA,
  "mtp": {"model.mtp_depth": 2, "model.mtp_loss_weight": 0.3},
  "deepseek_v3": {
    **_MLA,
    **_FINE_GRAINED,
    "model.mtp_depth": 1,
    "moe.score_function": "sigmoid",
    "moe.combine_weights": "renormalized",
    "moe.group_score": "top2_sum",
    "moe.routed_scaling_factor": 2.5,
    "moe.num_shared_experts": 1,
    "moe.load_balance_loss_weight": 1e-4,  # V3's sequence-wise α beside the aux-loss-free bias
  },
  "deepseek_v2": {
    **_MLA,
    **_FINE_GRAINED,
    "moe.score_function": "softmax",
    "moe.combine_weights": "raw",
    "moe.group_score": "max",
    "moe.routed_scaling_factor": 4.0,
    "moe.bias_update_rate": 0.0,
    "moe.num_shared_experts": 2,
    "moe.load_balance_loss_weight": 3e-3,  # V2's expert-level α1, device-level α2, communication α3
    "moe.device_balance_loss_weight": 0.05,
    "moe.comm_balance_loss_weight": 0.02,
  },
  "sliding_sinks": {"model.sliding_window": 16, "model.full_attention_every": 2, "model.attention_sinks": True},
  "dbrx": {
    "model.norm": "layer",
    "model.norm_eps": 1e-5,
    "model.clip_qkv": 2.0,
    "model.num_kv_heads": 2,
    "model.rope_theta": 500000.0,
    "model.activation": "swiglu",
    "model.moe_every": 1,
    "moe.num_experts": 16,
    "moe.top_k": 4,
    "moe.d_expert": 96,
    "moe.combine_weights": "renormalized",
    "moe.dispatcher": "dropless",
    "moe.router_noise": "jitter",
    "moe.jitter_scope": "router_and_experts",
  },
  "arctic": {"model.parallel_dense_d_ff": 96, "model.activation": "swiglu", "model.moe_every": 1},
  "grok_1": {
    "model.post_norms": True,
    "model.attention_softcap": 30.0,
    "model.embed_multiplier": 9.8,  # √d at d = 96, as Grok-1's 78.38 is √6144
    "model.output_multiplier": 0.5773502691896257,
    "model.tie_embeddings": True,
    "model.activation": "geglu",
    "moe.combine_weights": "raw",
    "moe.dispatcher": "dropless",
  },
  "gpt_oss": {
    "model.sliding_window": 16,
    "model.full_attention_every": 2,
    "model.attention_sinks": True,
    "model.attention_bias": "qkvo",
    "model.num_kv_heads": 2,
    "model.rope_scaling": "yarn",
    "model.yarn_factor": 4.0,
    "model.yarn_original_max_len": 32,
    "model.yarn_truncate": False,
    "model.activation": "clamped_swiglu",
    "model.moe_every": 1,
    "moe.top_k": 4,
    "moe.combine_weights": "renormalized",
    "moe.router_bias": True,
    "moe.expert_bias": True,
    "moe.dispatcher": "dropless",
  },
}


def get_config(preset="deepseek_v3"):
  return common.with_preset(common.small_lm(), PRESETS, preset)
