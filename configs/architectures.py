"""Published MoE architectures at full size, for parameter/FLOP accounting and as scale-up templates.

  python -m moejax.count_params --config configs/architectures.py:<preset>     # no weights allocated
  python -m moejax.main --config configs/architectures.py:<preset> --workdir ...  # needs accelerators

Presets, the published sizes they reproduce, and what `count_params` counts (with
`nnx.eval_shape`, so nothing is allocated; tests/test_presets.py checks each):
  mixtral_8x7b     Mixtral of Experts (Jiang et al. 2024): 46.7B total, 12.9B active per token;
                   counted 46,702,792,704 (the released checkpoint's exact count) and 12.88B.
  mixtral_8x22b    Mixtral 8x22B (Mistral AI 2024 model card): 141B total, 39B active; counted
                   140.63B and 39.16B.
  olmoe_1b_7b      OLMoE-1B-7B (Muennighoff et al. 2024): 6.9B total, 1.3B active; counted 6.92B
                   and 1.28B.
  qwen3_30b_a3b    Qwen3-30B-A3B (Qwen3 technical report 2025): 30.5B total, 3.3B active; counted
                   30.53B and 3.35B (both embedding matrices included; the published 3.3B is
                   truncated).
Active parameters include the embedding and unembedding matrices, as the published figures do.
Architecture details not modelled, none of which changes a count at the published precision:
OLMoE normalises q and k over all heads jointly (here per head: 65k fewer parameters); sliding
windows, RoPE bases and context lengths do not hold parameters.

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
}

_MIXTRAL = {
  "model.activation": "swiglu",
  "model.moe_every": 1,
  "model.head_dim": 128,
  "model.num_kv_heads": 8,
  "moe.num_experts": 8,
  "moe.top_k": 2,
  "moe.combine_weights": "renormalized",  # softmax over the 2 selected logits
  "moe.dispatcher": "dropless",
}

PRESETS = {
  "mixtral_8x7b": {
    **_MIXTRAL,
    "model.vocab_size": 32000,
    "model.num_layers": 32,
    "model.d_model": 4096,
    "model.num_heads": 32,
    "model.d_ff": 14336,
  },
  "mixtral_8x22b": {
    **_MIXTRAL,
    "model.vocab_size": 32768,
    "model.num_layers": 56,
    "model.d_model": 6144,
    "model.num_heads": 48,
    "model.d_ff": 16384,
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
    "moe.num_experts": 64,
    "moe.top_k": 8,
    "moe.combine_weights": "raw",  # no top-k renormalisation
    "moe.dispatcher": "dropless",
    "moe.load_balance_loss_weight": 1e-2,
    "moe.z_loss_weight": 1e-3,
  },
  "qwen3_30b_a3b": {
    "model.vocab_size": 151936,
    "model.num_layers": 48,
    "model.d_model": 2048,
    "model.num_heads": 32,
    "model.num_kv_heads": 4,
    "model.head_dim": 128,
    "model.qk_norm": True,
    "model.d_ff": 768,
    "model.activation": "swiglu",
    "model.moe_every": 1,
    "moe.num_experts": 128,
    "moe.top_k": 8,
    "moe.combine_weights": "renormalized",
    "moe.dispatcher": "dropless",
    "moe.load_balance_loss_weight": 1e-3,
    "moe.load_balance_scope": "global_batch",
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
