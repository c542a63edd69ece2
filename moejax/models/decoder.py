"""Decoder-only transformer language model whose FFNs are dense or MoE.

Legend: B batch, L sequence length, d model dim, V vocabulary.

Pre-norm blocks: x + Attn(Norm(x)), then x + FFN(Norm(x)). With `moe_every = P > 0`, the FFN of
every P-th block (blocks P-1, 2P-1, ...; P = 2 is Switch's every-other-layer) is an MoE layer,
but for the blocks listed in `dense_layers`; `moe_every = 0` is the dense baseline. The attention
is one of `ATTENTION_KINDS` (multi-head / grouped-query, or DeepSeek's multi-head latent
attention), with RoPE (and YaRN) from `moejax.layers.rope`. This is the architecture of Mixtral,
OLMoE, Qwen2/3-MoE and DeepSeek-V2/V3 (`moejax.convert.hf` maps their weights).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config.schema import DTYPES, POSITIONS, defaults, moe_layer_indices
from moejax.layers.attention import CausalSelfAttention, decode_positions
from moejax.layers.ffn import FeedForward, fan_in_init
from moejax.layers.mla import MultiHeadLatentAttention
from moejax.layers.moe import MoEConfig, MoELayer
from moejax.layers.rope import Rope
from moejax.models import remat, scan

_MODEL = defaults("lm", "model")  # The schema's defaults (moejax/config/schema.py), stated once.


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Static shape and options of the decoder: the config's model.* fields (meanings in moejax/config/schema.py).

  Built from a config by `moejax.models.build.decoder_config`; max_len is train.seq_len.
  """

  vocab_size: int
  num_layers: int = _MODEL["num_layers"]
  d_model: int = _MODEL["d_model"]
  num_heads: int = _MODEL["num_heads"]
  attention: str = _MODEL["attention"]
  num_kv_heads: int = _MODEL["num_kv_heads"]
  head_dim: int = _MODEL["head_dim"]
  qk_norm: bool = _MODEL["qk_norm"]
  qk_norm_scope: str = _MODEL["qk_norm_scope"]
  attention_bias: str = _MODEL["attention_bias"]
  sliding_window: int = _MODEL["sliding_window"]
  full_attention_every: int = _MODEL["full_attention_every"]
  attention_sinks: bool = _MODEL["attention_sinks"]
  q_lora_rank: int = _MODEL["q_lora_rank"]
  kv_lora_rank: int = _MODEL["kv_lora_rank"]
  qk_nope_head_dim: int = _MODEL["qk_nope_head_dim"]
  qk_rope_head_dim: int = _MODEL["qk_rope_head_dim"]
  v_head_dim: int = _MODEL["v_head_dim"]
  rope_theta: float = _MODEL["rope_theta"]
  rope_interleaved: bool = _MODEL["rope_interleaved"]
  rope_scaling: str = _MODEL["rope_scaling"]
  yarn_factor: float = _MODEL["yarn_factor"]
  yarn_original_max_len: int = _MODEL["yarn_original_max_len"]
  yarn_beta_fast: float = _MODEL["yarn_beta_fast"]
  yarn_beta_slow: float = _MODEL["yarn_beta_slow"]
  yarn_truncate: bool = _MODEL["yarn_truncate"]
  yarn_mscale: float = _MODEL["yarn_mscale"]
  yarn_mscale_all_dim: float = _MODEL["yarn_mscale_all_dim"]
  yarn_attention_factor: float = _MODEL["yarn_attention_factor"]
  norm_eps: float = _MODEL["norm_eps"]
  norm: str = _MODEL["norm"]
  clip_qkv: float = _MODEL["clip_qkv"]
  attention_softcap: float = _MODEL["attention_softcap"]
  post_norms: bool = _MODEL["post_norms"]
  parallel_dense_d_ff: int = _MODEL["parallel_dense_d_ff"]
  embed_multiplier: float = _MODEL["embed_multiplier"]
  output_multiplier: float = _MODEL["output_multiplier"]
  d_ff: int = _MODEL["d_ff"]
  max_len: int = defaults("lm", "train")["seq_len"]
  positions: str = _MODEL["positions"]
  activation: str = _MODEL["activation"]
  moe_every: int = _MODEL["moe_every"]
  dense_layers: tuple = _MODEL["dense_layers"]
  tie_embeddings: bool = _MODEL["tie_embeddings"]
  mtp_depth: int = _MODEL["mtp_depth"]
  mtp_loss_weight: float = _MODEL["mtp_loss_weight"]
  init_scale: float = _MODEL["init_scale"]
  dtype: str = _MODEL["dtype"]
  remat: str = _MODEL["remat"]
  scan_layers: bool = _MODEL["scan_layers"]
  moe: MoEConfig = MoEConfig()

  def __post_init__(self):
    object.__setattr__(self, "dense_layers", tuple(self.dense_layers))  # Hashable: the config is static.

  def is_moe_layer(self, index: int) -> bool:
    return index in moe_layer_indices(self)

  def attention_width(self) -> float:
    """The mean over blocks of the width attention scores and values are taken over, × visible keys / L.

    Multi-head: N·H; latent: (N·(H_n + H_r) + N·H_v) / 2. A sliding window of w keys counts
    min(w, L) / L of the full width (`moejax.accounting`'s attention FLOPs).
    """
    if self.attention == "mla":
      return self.num_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim) / 2
    width = self.num_heads * (self.head_dim or self.d_model // self.num_heads)
    visible = [min(self.window(i) or self.max_len, self.max_len) / self.max_len for i in range(self.num_layers)]
    return width * sum(visible) / self.num_layers

  def window(self, index: int) -> int:
    """Block index's sliding window (0: it attends to every earlier key)."""
    every = self.full_attention_every
    return 0 if every and index % every == every - 1 else self.sliding_window


def _multi_head(cfg: DecoderConfig, index: int, rope: Rope | None, rngs: nnx.Rngs) -> nnx.Module:
  return CausalSelfAttention(
    cfg.d_model,
    cfg.num_heads,
    cfg.init_scale,
    rope=rope,
    num_kv_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    qk_norm=cfg.qk_norm,
    qk_norm_scope=cfg.qk_norm_scope,
    bias=cfg.attention_bias,
    norm_eps=cfg.norm_eps,
    window=cfg.window(index),
    sinks=cfg.attention_sinks,
    clip_qkv=cfg.clip_qkv,
    softcap=cfg.attention_softcap,
    rngs=rngs,
  )


def _latent(cfg: DecoderConfig, index: int, rope: Rope | None, rngs: nnx.Rngs) -> nnx.Module:
  return MultiHeadLatentAttention(
    cfg.d_model,
    cfg.num_heads,
    cfg.init_scale,
    q_lora_rank=cfg.q_lora_rank,
    kv_lora_rank=cfg.kv_lora_rank,
    qk_nope_head_dim=cfg.qk_nope_head_dim,
    qk_rope_head_dim=cfg.qk_rope_head_dim,
    v_head_dim=cfg.v_head_dim,
    rope=rope,
    rngs=rngs,
  )


# model.attention -> the builder of block `index`'s attention (its fields: schema.ATTENTION_OPTIONS).
ATTENTION_KINDS = {"mha": _multi_head, "mla": _latent}


def make_norm(kind: str, d_model: int, eps: float, rngs: nnx.Rngs) -> nnx.Module:
  """'rms': RMSNorm (scale) | 'layer': LayerNorm with a scale and no bias (DBRX's nn.LayerNorm(bias=False))."""
  if kind == "layer":
    return nnx.LayerNorm(d_model, epsilon=eps, use_bias=False, rngs=rngs)
  return nnx.RMSNorm(d_model, epsilon=eps, rngs=rngs)


def _normed(norm: nnx.Module, x: jax.Array) -> jax.Array:
  """norm(x) in x's dtype: the norms' float32 scales would otherwise promote a bfloat16 stream to float32
  (their statistics are float32 either way), and every later block would run in float32."""
  return norm(x).astype(x.dtype)


class TransformerBlock(nnx.Module):
  """Pre-norm block [B, L, d] -> ([B, L, d], aux of its MoE layer or None).

  x + Attn(Norm(x)), then x + FFN(Norm(x)); the FFN is an MoE layer when `moe` is given, else
  dense with hidden size d_ff. Shared with the ViT (`moejax.models.vit`), which is not causal.
  Options of released models:
    post_norms (Grok-1's "sandwich" norms): x + Norm'(Attn(Norm(x))), then h + Norm'(FFN(Norm(h))).
    parallel_dense_d_ff > 0 (Snowflake Arctic's dense-MoE hybrid, in an MoE block): with
      h = x + Attn(Norm(x)), the output is h + Dense(Norm_r(h)) + MoE(Norm(x)): a dense SwiGLU
      FFN of that hidden size on the residual stream, and the MoE in parallel on the block's
      input (Arctic's parallel_attn_mlp_res, its modeling_arctic.py).
  """

  def __init__(
    self,
    d_model: int,
    d_ff: int,
    activation: str,
    init_scale: float,
    *,
    attention: Callable[[nnx.Rngs], nnx.Module],
    moe: MoEConfig | None,
    mesh,
    rngs: nnx.Rngs,
    norm_eps: float = 1e-6,
    norm: str = "rms",
    post_norms: bool = False,
    parallel_dense_d_ff: int = 0,
  ):
    """attention: rngs -> the block's attention, [B, L, d] -> [B, L, d] (`ATTENTION_KINDS`, or the ViT's).

    norm: 'rms' | 'layer' (`make_norm`)."""
    self.attention_norm = make_norm(norm, d_model, norm_eps, rngs)
    self.attention = attention(rngs=rngs)
    self.ffn_norm = make_norm(norm, d_model, norm_eps, rngs)
    if moe is not None:
      self.ffn = MoELayer(d_model, moe, mesh=mesh, rngs=rngs)
    else:
      self.ffn = FeedForward(d_model, d_ff, activation, init_scale, rngs=rngs)
    self.attention_post_norm = make_norm(norm, d_model, norm_eps, rngs) if post_norms else None
    self.ffn_post_norm = make_norm(norm, d_model, norm_eps, rngs) if post_norms else None
    arctic = parallel_dense_d_ff and moe is not None
    self.dense_norm = make_norm(norm, d_model, norm_eps, rngs) if arctic else None
    self.dense_ffn = FeedForward(d_model, parallel_dense_d_ff, activation, init_scale, rngs=rngs) if arctic else None

  def __call__(self, x: jax.Array, *, train: bool, rng: jax.Array | None = None, token_ids: jax.Array | None = None):
    """rng: training noise of the router; token_ids: for the hash router."""
    return self._after_attention(x, self.attention(_normed(self.attention_norm, x)), train, rng, token_ids)

  def decode(self, x: jax.Array, cache: dict, start: jax.Array, token_ids: jax.Array | None = None):
    """x [B, L, d], the tokens at positions start .. start + L - 1, with the attention's cache (`decode`
    of `CausalSelfAttention` and `MultiHeadLatentAttention`): (out, aux, the updated cache). Eval mode."""
    attended, cache = self.attention.decode(_normed(self.attention_norm, x), cache, start)
    out, aux = self._after_attention(x, attended, False, None, token_ids)
    return out, aux, cache

  def _after_attention(self, x, attended, train, rng, token_ids):
    """The block from its attention's output on: the residuals, norms and FFN (dense, MoE, Arctic's both)."""
    block_input = x
    x = x + (attended if self.attention_post_norm is None else _normed(self.attention_post_norm, attended))
    # Arctic: the MoE reads the block's input, beside a dense FFN on the residual stream.
    h = _normed(self.ffn_norm, block_input if self.dense_ffn is not None else x)
    if isinstance(self.ffn, MoELayer):
      h, aux = self.ffn(h, train=train, rng=rng, token_ids=token_ids)
    else:
      h, aux = self.ffn(h), None
    if self.ffn_post_norm is not None:
      h = _normed(self.ffn_post_norm, h)
    if self.dense_ffn is not None:
      x = x + self.dense_ffn(_normed(self.dense_norm, x))
    return x + h, aux


class MultiTokenPrediction(nnx.Module):
  """DeepSeek-V3's MTP module (§2.2): (h [B, L, d], embedding of the token k ahead [B, L, d]) -> h'.

  h' = Block(W·[Norm(emb); Norm(h)]), W [2d, d]: the order of the released weights (eh_proj
  reads [enorm(embedding), hnorm(hidden)], as every DeepSeek-V3 MTP implementation loads it;
  the paper writes the hidden part first). Its logits are Norm(h')·(the shared output head).
  """

  def __init__(self, cfg: DecoderConfig, block: Callable[[nnx.Rngs], TransformerBlock], *, rngs: nnx.Rngs):
    self.embed_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, rngs)
    self.hidden_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, rngs)
    self.proj = nnx.Param(fan_in_init(cfg.init_scale)(rngs.params(), (2 * cfg.d_model, cfg.d_model)))
    self.block = block(rngs=rngs)
    self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, rngs)

  def __call__(self, hidden, embedded, *, train: bool, rng=None, token_ids=None):
    """(h' [B, L, d], Norm(h') for the output head, the block's MoE aux or None)."""
    x = jnp.concatenate([_normed(self.embed_norm, embedded), _normed(self.hidden_norm, hidden)], axis=-1)
    x = x @ self.proj[...].astype(x.dtype)
    x, aux = self.block(x, train=train, rng=rng, token_ids=token_ids)
    return x, self.norm(x), aux


class DecoderLM(nnx.Module):
  """tokens <int32>[B, L] -> (logits <float32>[B, L, V], aux of each MoE layer, in order).

  With cfg.mtp_depth = D > 0, D multi-token-prediction modules follow the blocks; they run in
  `forward` (what training calls), not in `__call__`, whose logits are the main model's.
  """

  def __init__(self, cfg: DecoderConfig, *, mesh: jax.sharding.Mesh | None = None, rngs: nnx.Rngs):
    self.cfg = cfg
    vocab_split = {"out_sharding": ("vocab", None), "eager_sharding": False}  # [V, d]: tensor parallelism splits V.
    self.embed = nnx.Embed(
      cfg.vocab_size,
      cfg.d_model,
      embedding_init=nnx.initializers.normal(1.0),
      embedding_metadata=vocab_split,
      rngs=rngs,
    )
    self.position_embed = (
      nnx.Embed(cfg.max_len, cfg.d_model, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
      if cfg.positions == "learned"
      else None
    )
    rope = Rope.from_model(cfg) if cfg.positions == "rope" else None

    def block(index: int, moe: bool, rngs: nnx.Rngs) -> TransformerBlock:
      return TransformerBlock(
        cfg.d_model,
        cfg.d_ff,
        cfg.activation,
        cfg.init_scale,
        attention=functools.partial(ATTENTION_KINDS[cfg.attention], cfg, index, rope),
        moe=cfg.moe if moe else None,
        mesh=mesh,
        rngs=rngs,
        norm_eps=cfg.norm_eps,
        norm=cfg.norm,
        post_norms=cfg.post_norms,
        parallel_dense_d_ff=cfg.parallel_dense_d_ff,
      )

    self.blocks = nnx.List([block(i, cfg.is_moe_layer(i), rngs) for i in range(cfg.num_layers)])
    # MTP blocks are built as the last block is (DeepSeek-V3's layer 61: MLA and MoE, like layer 60).
    last = cfg.num_layers - 1
    self.mtp = (
      nnx.List(
        [
          MultiTokenPrediction(cfg, functools.partial(block, last, cfg.is_moe_layer(last)), rngs=rngs)
          for _ in range(cfg.mtp_depth)
        ]
      )
      if cfg.mtp_depth
      else None
    )
    self.final_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, rngs)
    self.unembed = (
      None
      if cfg.tie_embeddings
      else nnx.Linear(
        cfg.d_model,
        cfg.vocab_size,
        use_bias=False,
        rngs=rngs,
        kernel_init=nnx.initializers.variance_scaling(cfg.init_scale, "fan_in", "truncated_normal"),
        kernel_metadata={"out_sharding": (None, "vocab"), "eager_sharding": False},  # [d, V]
      )
    )

  def moe_layers(self) -> list[MoELayer]:
    """The MoE layers in block order, then the MTP modules' (the order of `forward`'s aux list)."""
    blocks = [*self.blocks, *(m.block for m in self.mtp or ())]
    return [block.ffn for block in blocks if isinstance(block.ffn, MoELayer)]

  def __call__(self, tokens: jax.Array, *, train: bool = False, rng: jax.Array | None = None):
    """rng: key for the routers' training noise (noisy top-k, jitter, GShard's random 2nd expert)."""
    logits, moe_aux, _ = self.forward(tokens, train=train, rng=rng, mtp=False)
    return logits, moe_aux

  def forward(self, tokens: jax.Array, *, train: bool = False, rng: jax.Array | None = None, mtp: bool = True):
    """(logits, MoE aux of every layer that ran, MTP logits): all the model computes.

    MTP logits (with mtp and cfg.mtp_depth = D > 0; else []): D arrays <float32>[B, L, V], the
    k-th (k = 1..D) predicting token i + 1 + k at position i. Its input at position i is the
    embedding of token i + k; for the last k positions, which have none, the tokens wrap around,
    and `moejax.losses.multi_token_prediction_loss` leaves those positions out.
    """
    dtype = jnp.dtype(self.cfg.dtype)
    x = self.embed(tokens)
    if self.cfg.embed_multiplier != 1.0:  # Grok-1: embeddings × 78.38.
      x = x * self.cfg.embed_multiplier
    if self.position_embed is not None:
      x = x + self.position_embed(jnp.arange(tokens.shape[1]))[None]
    x = x.astype(dtype)
    call = remat.block_call(self.cfg.remat, train)
    x, moe_aux = scan.run_blocks(self.blocks, x, call, rng, tokens, scan=self.cfg.scan_layers)
    logits = self._logits(self.final_norm(x))
    mtp_logits = []
    for k, module in enumerate(self.mtp if mtp and self.mtp is not None else (), start=1):
      ahead = jnp.roll(tokens, -k, axis=1)  # Token i + k at position i (wrapping: masked in the loss).
      layer_rng = None if rng is None else jax.random.fold_in(rng, self.cfg.num_layers + k - 1)
      x, normed, aux = module(x, self.embed(ahead).astype(dtype), train=train, rng=layer_rng, token_ids=ahead)
      if aux is not None:
        moe_aux.append(aux)
      mtp_logits.append(self._logits(normed))
    return logits, moe_aux, mtp_logits

  def init_cache(self, batch: int, max_len: int) -> list[dict]:
    """Empty decoding caches, one per block (`decode`), for sequences of up to max_len tokens, in cfg.dtype."""
    dtype = jnp.dtype(self.cfg.dtype)
    return [block.attention.init_cache(batch, max_len, dtype) for block in self.blocks]

  def decode(self, tokens: jax.Array, cache: list[dict], start: jax.Array, last: jax.Array | None = None):
    """tokens <int32>[B, L], row b's at positions start[b] .. start[b] + L - 1 -> (logits <float32>[B, L, V], the cache).

    start: <int32>[B], or one offset for every row. Prefill is start = 0 with the prompts, decoding
    L = 1 at start = each row's tokens so far: rows of different lengths share a cache (a row's
    slots at and past its start are overwritten before any query of it can see them). Positions
    must stay below the cache's length: a write past it is dropped (JAX's out-of-bounds scatter).
    last <int32>[B]: return only the logits of row b's token at index last[b] ([B, 1, V]), e.g.
    each prompt's last token at prefill, without the [B, L, V] of every position. The logits
    equal `__call__`'s on the whole sequence at those positions (eval mode; the main model, no MTP),
    for a router whose choice for a token does not depend on later tokens; a capacity dispatcher
    decoding one token per routing group cannot drop it (tests/test_decode.py).
    """
    dtype = jnp.dtype(self.cfg.dtype)
    x = self.embed(tokens)
    if self.cfg.embed_multiplier != 1.0:
      x = x * self.cfg.embed_multiplier
    if self.position_embed is not None:
      x = x + self.position_embed(decode_positions(start, *tokens.shape))
    x = x.astype(dtype)
    new_cache = []
    for block, block_cache in zip(self.blocks, cache):
      x, _, block_cache = block.decode(x, block_cache, start, token_ids=tokens)
      new_cache.append(block_cache)
    if last is not None:  # Only row b's position last[b] through the output head: [B, 1, d].
      x = x[jnp.arange(x.shape[0]), last][:, None]
    return self._logits(self.final_norm(x)), new_cache

  def _logits(self, x: jax.Array) -> jax.Array:
    """Normalised hidden states [B, L, d] -> <float32>[B, L, V] through the output head."""
    # On the flattened [B·L, d] tokens: XLA:CPU runs the weight gradient of a 3-D matmul with
    # extra transposes and copies (issue #11; the same holds for the FFNs and projections).
    x = x.astype(jnp.float32)
    b, l, d = x.shape
    flat = x.reshape(b * l, d)
    logits = (self.embed.attend(flat) if self.unembed is None else self.unembed(flat)).reshape(b, l, -1)
    return logits if self.cfg.output_multiplier == 1.0 else logits * self.cfg.output_multiplier  # Grok-1: × 0.577
