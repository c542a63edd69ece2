"""The analytic side of the memory plan: per-device bytes of a train step from a formula.

Legend: D, X, Mo devices on the mesh's 'data', 'expert', 'model' axes; M micro-batches; b
sequences of L tokens per device per micro-batch (b = batch / (D·X·M)) and T = b·L its tokens;
d model dim, H query heads, H_kv key/value heads, h head dim, f a hidden dim (dense d_ff, an
expert's d_expert), E experts, K choices per token, V vocabulary, a bytes per activation
(model.dtype). "/Mo" means split over 'model' when mesh.rules maps that dimension there.

State (exact, from the shardings): parameters, Adam's moments (optax adamw keeps mu and nu in
the parameters' float32 plus a step count; clipping by global norm keeps nothing), the rest of
the state and the batch: each array's bytes / its number of shards.

Step buffers (the formula):
  gradients      float32, one per parameter shard (after the reduce-scatter/all-reduce); with
                 M > 1 twice: the running sum and the current micro-batch's.
  copies         train.param_dtype 'bfloat16': a bfloat16 copy of the parameters (routers and
                 embedding tables stay float32); mesh.fsdp with D > 1: the largest block's weights
                 gathered over 'data', and its gradient before the reduce-scatter; model.scan_layers:
                 the scanned blocks' weights stacked once a step and their gradient stacked too
                 (`moejax.models.scan`).
  activations    per block, the terms below, kept from the forward pass for the backward as
                 model.remat says, plus a working set for the backward pass of one block: the largest
                 block's terms that were not kept (recomputed), their gradients (taken as large as
                 all its terms), and the logits (float32, and their gradient).

Per-block terms (bytes; which policies keep each: N none, F full, D dots, M moe):
  block input           T·d·a                                       N F D M
  residual + norms      3·T·d·a (two norm outputs, the mid residual)  N M
  q, k, v (MHA)         T·(H + 2·H_kv)·h·a /Mo   (dot outputs)      N D M
  rotated q, k          T·(H + H_kv)·h·a /Mo                         N M
  scores                b·H·L·L_w·4 /Mo (float32; L_w = min(L, window)) N D M
  attention output      T·H·h·a /Mo                                 N D M
  MLA instead of MHA    latents T·(r_q + r_kv + h_r)·a, q and k T·2·H·(h_n + h_r)·a /Mo,
                        v T·H·h_v·a /Mo, output T·H·h_v·a /Mo, scores as above
  dense FFN             pre-activations T·f·(2 gated, else 1)·a /Mo   N D M
                        activation T·f·a /Mo                        N M
  MoE router            logits and probabilities 2·T·E·4            N (D: logits) M
  MoE rows              R·d·a received, R·d·a expert outputs, R'·d·a returned   N M (D: outputs)
  MoE expert hidden     R·f·(2 gated, else 1)·a /Mo (D keeps), R·f·a /Mo  N D
where R, the rows an expert device holds, follows moejax's static buffers: dropless with X > 1
reserves X·T·K rows (`moejax.parallel.RowExchange`: every choice of every device of its 'expert'
row could come to it), X = 1: T·K; capacity dispatchers E·G·C slots (C from the router family);
R' (returned rows) is T·K with the 'ragged' exchange a GPU/TPU takes, X·T·K with 'padded'.
'einsum' dispatch adds its [G, S, E, C] dispatch and combine tensors (2·T·E·C·a).
Shared experts and Arctic's parallel dense FFN count as dense FFNs; MTP modules as one more block
each, with their own logits.

The scores are there on every backend: moejax's attention materialises them (jax.nn.
dot_product_attention with implementation=None takes its XLA path; MLA and attention sinks use
moejax's dot_attention); a fused attention kernel would remove the term.

Not counted: XLA's fusion and scheduling (it may keep less, or hold several blocks' buffers at
once: for DeepSeek-V3 on 1024 devices XLA:CPU's buffer assignment reserves 102 of its 163 GiB of
temp for buffers of the 8 GiB [128, 4096, 4096] float32 scores' size, by XLA_FLAGS=--xla_dump_to's
buffer-assignment file, 2026-12-05), optimizer-update temporaries (elementwise, done in place on the
donated state), collectives' staging buffers, and the dropless 'blocks' padding of E·(B-1) rows.
The compiled number beside it (`moejax.plan`) is XLA:CPU's program, which differs in those ways.
"""

from __future__ import annotations

import dataclasses

from moejax import routers
from moejax.layers.ffn import GATED

POLICY_CODES = {"none": "N", "full": "F", "dots": "D", "moe": "M"}


@dataclasses.dataclass(frozen=True)
class Shape:
  """The step's per-device sizes the formula reads (see the legend)."""

  sequences: float  # b: sequences per device per micro-batch
  seq_len: int  # L
  activation_bytes: int  # a
  model_devices: int  # Mo
  expert_devices: int  # X
  rules: dict  # mesh.rules: logical axis -> 'model' or ''
  platform: str  # 'gpu' | 'tpu': what moe.expert_exchange 'auto' resolves to there

  @property
  def tokens(self) -> float:
    return self.sequences * self.seq_len

  def split(self, logical: str, size: int) -> float:
    """size / Mo if mesh.rules puts `logical` on 'model' and Mo divides it, else size."""
    mo = self.model_devices
    return size / mo if self.rules.get(logical) == "model" and mo > 1 and size % mo == 0 else size


def block_terms(model_cfg, index: int, shape: Shape) -> list[tuple[str, float, str]]:
  """[(term, bytes, policies that keep it)] of decoder block `index` (model_cfg: a DecoderConfig)."""
  t, a, d = shape.tokens, shape.activation_bytes, model_cfg.d_model
  terms = [("block input", t * d * a, "NFDM"), ("residual + norms", 3 * t * d * a, "NM")]
  terms += _attention_terms(model_cfg, index, shape)
  if model_cfg.is_moe_layer(index):
    terms += _moe_terms(model_cfg.moe, d, shape)
    if model_cfg.moe.num_shared_experts:
      terms += _ffn_terms(
        "shared experts", model_cfg.moe.num_shared_experts * model_cfg.moe.d_expert, d, model_cfg.activation, shape
      )
    if model_cfg.parallel_dense_d_ff:
      terms += _ffn_terms("parallel dense FFN", model_cfg.parallel_dense_d_ff, d, model_cfg.activation, shape)
  else:
    terms += _ffn_terms("dense FFN", model_cfg.d_ff, d, model_cfg.activation, shape)
  return terms


def _attention_terms(m, index: int, shape: Shape) -> list[tuple[str, float, str]]:
  t, a, L, b = shape.tokens, shape.activation_bytes, shape.seq_len, shape.sequences
  heads = shape.split("heads", m.num_heads)
  if m.attention == "mla":
    nope, rope, hv = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    return [
      ("attention latents", t * (m.q_lora_rank + m.kv_lora_rank + rope) * a, "NDM"),
      ("attention q, k", t * 2 * heads * (nope + rope) * a, "NDM"),
      ("attention v", t * heads * hv * a, "NDM"),
      ("attention scores", b * heads * L * L * 4, "NDM"),
      ("attention output", t * heads * hv * a, "NDM"),
    ]
  h = m.head_dim or m.d_model // m.num_heads
  kv = shape.split("kv_heads", m.num_kv_heads or m.num_heads)
  window = m.window(index)
  visible = min(window, L) if window else L
  return [
    ("attention q, k, v", t * (heads + 2 * kv) * h * a, "NDM"),
    ("rotated q, k", t * (heads + kv) * h * a, "NM"),
    ("attention scores", b * heads * L * visible * 4, "NDM"),
    ("attention output", t * heads * h * a, "NDM"),
  ]


def _ffn_terms(name: str, f: int, d: int, activation: str, shape: Shape) -> list[tuple[str, float, str]]:
  t, a = shape.tokens, shape.activation_bytes
  f = shape.split("mlp", f)
  return [
    (f"{name} pre-activations", t * f * (2 if activation in GATED else 1) * a, "NDM"),
    (f"{name} activation", t * f * a, "NM"),
  ]


def moe_rows(moe_cfg, shape: Shape) -> tuple[float, float]:
  """(R, R'): rows an expert device holds for its experts, and rows returned to a token's device."""
  family = routers.get(moe_cfg.router)
  t, x = shape.tokens, shape.expert_devices
  if family.dispatcher(moe_cfg) == "dropless":
    k = family.choices_per_token(moe_cfg)
    received = x * t * k if x > 1 else t * k
    exchange = moe_cfg.expert_exchange
    padded = exchange == "padded" or (exchange == "auto" and shape.platform not in ("gpu", "tpu"))
    return received, received if padded else t * k
  group = moe_cfg.group_size or shape.seq_len
  groups = t / group
  slots = moe_cfg.num_experts * groups * family.capacity(moe_cfg, group, train=True)
  return slots, slots


def _moe_terms(moe_cfg, d: int, shape: Shape) -> list[tuple[str, float, str]]:
  t, a = shape.tokens, shape.activation_bytes
  e = moe_cfg.num_experts
  f = shape.split("expert_mlp", moe_cfg.d_expert)
  received, returned = moe_rows(moe_cfg, shape)
  gated = 2 if moe_cfg.activation in GATED else 1
  terms = [
    ("router logits", t * e * 4, "NDM"),
    ("router probabilities", t * e * 4, "NM"),
    ("expert rows in", received * d * a, "NM"),
    ("expert pre-activations", received * f * gated * a, "ND"),
    ("expert activation", received * f * a, "N"),
    ("expert rows out", received * d * a, "NDM"),
  ]
  if shape.expert_devices > 1:
    terms.append(("rows returned", returned * d * a, "NM"))
  family = routers.get(moe_cfg.router)
  if family.dispatcher(moe_cfg) == "einsum":
    group = moe_cfg.group_size or shape.seq_len
    terms.append(("einsum dispatch + combine", 2 * t * e * family.capacity(moe_cfg, group, train=True) * a, "ND"))
  return terms


@dataclasses.dataclass(frozen=True)
class Activations:
  """Bytes per device of one micro-batch's activations under a remat policy."""

  kept: float  # Kept from the forward pass for the backward, summed over blocks.
  working: float  # One block's backward: its terms not kept (recomputed), their gradients, the logits.
  per_term: dict  # term -> bytes kept, summed over blocks

  @property
  def total(self) -> float:
    return self.kept + self.working


def activations(model_cfg, shape: Shape, policy: str) -> Activations:
  """The activation estimate of the module docstring for model.remat = policy."""
  code = POLICY_CODES[policy]
  kept, per_term, backward = 0.0, {}, 0.0
  blocks = (
    list(range(model_cfg.num_layers)) + [model_cfg.num_layers - 1] * model_cfg.mtp_depth
  )  # MTP: the last block's kind.
  for index in blocks:
    dropped = total = 0.0
    for name, size, keepers in block_terms(model_cfg, index, shape):
      total += size
      if code in keepers:
        kept += size
        per_term[name] = per_term.get(name, 0.0) + size
      else:
        dropped += size
    backward = max(backward, dropped + total)  # Recomputed terms, and the gradients of all of them.
  vocab = shape.split("vocab", model_cfg.vocab_size)
  logits = 2 * shape.tokens * vocab * 4 * (1 + model_cfg.mtp_depth)
  return Activations(kept=kept, working=backward + logits, per_term=per_term)


def gradient_bytes(float_param_bytes: float, microbatches: int) -> float:
  """float32 gradients of the parameters on this device: once, or twice with micro-batches (sum + current)."""
  return float_param_bytes * (2 if microbatches > 1 else 1)
