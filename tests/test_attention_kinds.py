"""RoPE and YaRN, multi-head latent attention, sliding windows and attention sinks, against numpy.

Each piece is re-derived here in float64 numpy from its paper and the released code it follows
(transformers' `_compute_yarn_parameters`; DeepSeek-V2 §2.1 for MLA; gpt-oss's sinks), with
hand-computed values where a formula gives one.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import base_config
from moejax.layers.attention import CausalSelfAttention, dot_attention
from moejax.layers.mla import MultiHeadLatentAttention
from moejax.layers.rope import Rope, apply_rope
from moejax.models.build import decoder_config
from moejax.models.decoder import DecoderLM

# DeepSeek-V2/V3's released rope_scaling (V3: mscale 1.0 = mscale_all_dim) and gpt-oss's.
DEEPSEEK_YARN = Rope(
  rope_theta=10000.0,
  rope_interleaved=True,
  rope_scaling="yarn",
  yarn_factor=40.0,
  yarn_original_max_len=4096,
  yarn_mscale=0.707,
  yarn_mscale_all_dim=0.707,
)
GPT_OSS_YARN = Rope(rope_theta=150000.0, rope_scaling="yarn", yarn_factor=32.0, yarn_truncate=False)


def _np_yarn_inv_freq(dim, base, factor, original, beta_fast, beta_slow, truncate):
  """YaRN (Peng et al. 2023, §3.2 'NTK-by-parts'): θ_i blended by a ramp over the dims' rotation counts."""
  theta = base ** (-np.arange(0, dim, 2) / dim)
  rotations = original * theta / (2 * math.pi)  # How often pair i turns over the original context.

  def dim_turning(n):  # The (fractional) pair index whose rotation count is n, in dims: 2i.
    return dim * math.log(original / (n * 2 * math.pi)) / (2 * math.log(base))

  low, high = dim_turning(beta_fast), dim_turning(beta_slow)
  if truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)  # 0: extrapolate, 1: interpolate.
  assert np.all(rotations[ramp == 0] >= beta_fast * 0.5)  # The kept dims are the fast-turning ones.
  return theta * (1 - ramp) + theta / factor * ramp


@pytest.mark.parametrize("rope", [DEEPSEEK_YARN, GPT_OSS_YARN], ids=["deepseek", "gpt_oss"])
def test_yarn_frequencies_match_the_paper(rope):
  dim = 64
  want = _np_yarn_inv_freq(
    dim,
    rope.rope_theta,
    rope.yarn_factor,
    rope.yarn_original_max_len,
    rope.yarn_beta_fast,
    rope.yarn_beta_slow,
    rope.yarn_truncate,
  )
  got = rope.inv_frequencies(dim)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  # The fastest pair keeps its frequency, the slowest is interpolated by 1/factor.
  assert got[0] == pytest.approx(1.0) and got[-1] == pytest.approx(want[-1])
  assert got[-1] == pytest.approx(rope.rope_theta ** (-(dim - 2) / dim) / rope.yarn_factor, rel=1e-5)


def test_yarn_scales_by_hand():
  # gpt-oss: no mscale given: attention factor 0.1·ln(32) + 1 on cos and sin; softmax unscaled.
  assert GPT_OSS_YARN.attention_factor == pytest.approx(1.346574, rel=1e-6)
  assert GPT_OSS_YARN.softmax_scale_factor == 1.0
  # DeepSeek: mscale = mscale_all_dim: the rotary factor cancels to 1, the softmax gets (0.0707·ln 40 + 1)².
  assert DEEPSEEK_YARN.attention_factor == 1.0
  assert DEEPSEEK_YARN.softmax_scale_factor == pytest.approx((0.0707 * math.log(40) + 1) ** 2, rel=1e-9)
  assert DEEPSEEK_YARN.softmax_scale_factor == pytest.approx(1.58962, rel=1e-5)
  # Without scaling, and with factor 1, YaRN is plain RoPE.
  plain = Rope(rope_theta=500.0)
  np.testing.assert_allclose(plain.inv_frequencies(8), 500.0 ** (-np.arange(0, 8, 2) / 8), rtol=1e-6)
  np.testing.assert_allclose(
    Rope(rope_theta=500.0, rope_scaling="yarn", yarn_factor=1.0).inv_frequencies(8), plain.inv_frequencies(8)
  )


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_rotates_the_pairs_it_names(interleaved):
  rope = Rope(
    rope_theta=100.0, rope_interleaved=interleaved, rope_scaling="yarn", yarn_factor=4.0, yarn_original_max_len=16
  )
  x = np.asarray(jax.random.normal(jax.random.key(0), (1, 5, 2, 8)), np.float64)
  theta, factor = rope.inv_frequencies(8).astype(np.float64), rope.attention_factor
  angle = np.arange(5)[:, None] * theta[None]  # [L, 4]
  pairs = [(2 * i, 2 * i + 1) for i in range(4)] if interleaved else [(i, i + 4) for i in range(4)]
  want = np.empty_like(x)
  for i, (a, b) in enumerate(pairs):  # Each pair turns as a complex number by its angle.
    z = (x[..., a] + 1j * x[..., b]) * np.exp(1j * angle[:, i])[None, :, None] * factor
    want[..., a], want[..., b] = z.real, z.imag
  np.testing.assert_allclose(apply_rope(jnp.asarray(x, jnp.float32), rope), want, rtol=1e-5, atol=1e-5)
  # Relative positions: q·k depends on positions only through their difference.
  q, k = jnp.asarray(x[:, :1], jnp.float32), jnp.asarray(x[:, 1:2], jnp.float32)
  dots = [float(jnp.sum(apply_rope(q, rope, jnp.array([p + 3])) * apply_rope(k, rope, jnp.array([p])))) for p in (0, 7)]
  assert dots[0] == pytest.approx(dots[1], rel=1e-4)


def _softmax(s):
  s = s - s.max(-1, keepdims=True)
  e = np.exp(s)
  return e / e.sum(-1, keepdims=True)


def _np_mla(layer, x):
  """MLA in float64 numpy, head by head, from DeepSeek-V2 §2.1 (eqs. 9-19), with DeepSeek's RMSNorm."""

  def rms(v, scale, eps=1e-6):
    return v / np.sqrt((v**2).mean(-1, keepdims=True) + eps) * scale

  def rot(v, pos):  # Interleaved pairs, as DeepSeek's released code.
    theta = layer.rope.inv_frequencies(v.shape[-1]).astype(np.float64)
    z = (v[..., 0::2] + 1j * v[..., 1::2]) * np.exp(1j * pos[:, None] * theta)
    out = np.empty_like(v)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out

  p = {k: np.asarray(v, np.float64) for k, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
  p = {".".join(map(str, k)): v for k, v in p.items()}
  hn, hr, hv, r = layer.nope_dim, layer.rope_dim, layer.v_dim, layer.kv_rank
  b, l, _ = x.shape
  pos = np.arange(l, dtype=np.float64)
  c_q = rms(x @ p["wq_a"], p["q_norm.scale"])  # [B, L, r_q]
  c_kv = rms((x @ p["wkv_a"])[..., :r], p["kv_norm.scale"])  # [B, L, r]
  k_r = rot((x @ p["wkv_a"])[..., r:], pos)  # [B, L, H_r], one for all heads
  scale = (hn + hr) ** -0.5 * layer.rope.softmax_scale_factor
  heads = []
  for n in range(layer.num_heads):
    q = c_q @ p["wq_b"][:, n]  # [B, L, H_n + H_r]
    q_c, q_r = q[..., :hn], rot(q[..., hn:], pos)
    k_c = c_kv @ p["wkv_b"][:, n, :hn]
    v_c = c_kv @ p["wkv_b"][:, n, hn:]
    s = (np.einsum("blh,bth->blt", q_c, k_c) + np.einsum("blh,bth->blt", q_r, k_r)) * scale
    s = np.where(np.tril(np.ones((l, l), bool)), s, -np.inf)
    heads.append(_softmax(s) @ v_c)  # [B, L, H_v]
  return np.concatenate(heads, -1) @ p["wo"]


def test_mla_matches_the_paper_and_its_absorbed_form():
  rope = DEEPSEEK_YARN  # The released YaRN settings, so that the softmax's mscale² shows.
  layer = MultiHeadLatentAttention(
    16,
    3,
    1.0,
    q_lora_rank=12,
    kv_lora_rank=10,
    qk_nope_head_dim=6,
    qk_rope_head_dim=4,
    v_head_dim=5,
    rope=rope,
    rngs=nnx.Rngs(0),
  )
  layer.q_norm.scale[...] = jnp.linspace(0.5, 1.5, 12)  # Norm scales away from 1, so a missing norm would show.
  layer.kv_norm.scale[...] = jnp.linspace(2.0, 0.5, 10)
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 7, 16)), np.float64)
  want = _np_mla(layer, x)
  x32 = jnp.asarray(x, jnp.float32)
  np.testing.assert_allclose(layer(x32), want, rtol=1e-4, atol=1e-5)
  # The cache a decoder keeps: r + H_r = 14 numbers per token, not 2·N·H = 2·3·10.
  latent, k_rope = layer.latent_cache(x32)
  assert latent.shape == (2, 7, 10) and k_rope.shape == (2, 7, 4)
  np.testing.assert_allclose(layer.attend_latent(x32, latent, k_rope), want, rtol=1e-4, atol=1e-5)
  # The last 3 queries against the whole cache: the naive form's last 3 rows (what decoding computes).
  np.testing.assert_allclose(layer.attend_latent(x32[:, 4:], latent, k_rope), want[:, 4:], rtol=1e-4, atol=1e-5)


def test_mla_without_query_latent():
  # V2-Lite: q = x·W_q, no query latent or norm.
  layer = MultiHeadLatentAttention(
    8,
    2,
    1.0,
    q_lora_rank=0,
    kv_lora_rank=6,
    qk_nope_head_dim=4,
    qk_rope_head_dim=2,
    v_head_dim=3,
    rope=Rope(rope_interleaved=True),
    rngs=nnx.Rngs(2),
  )
  assert layer.wq_a is None and layer.q_norm is None and layer.wq[...].shape == (8, 2, 6)
  x = jax.random.normal(jax.random.key(3), (1, 5, 8))
  latent, k_rope = layer.latent_cache(x)
  np.testing.assert_allclose(layer.attend_latent(x, latent, k_rope), layer(x), rtol=1e-5, atol=1e-6)


def _np_masked_attention(q, k, v, visible, sinks=None):
  """q [B, L, N, H], k/v [B, T, N, H] (heads already repeated), visible [L, T]; sinks [N] or None."""
  s = np.einsum("blnh,btnh->bnlt", q, k) / np.sqrt(q.shape[-1])
  s = np.where(visible, s, -np.inf)
  if sinks is not None:
    m = np.maximum(s.max(-1, keepdims=True), sinks[None, :, None, None])
    e = np.exp(s - m)
    w = e / (e.sum(-1, keepdims=True) + np.exp(sinks[None, :, None, None] - m))
  else:
    w = _softmax(s)
  return np.einsum("bnlt,btnh->blnh", w, v)


@pytest.mark.parametrize("window, sinks", [(3, False), (0, True), (3, True)])
def test_sliding_window_and_sinks_match_explicit_masks(window, sinks):
  layer = CausalSelfAttention(8, 4, 1.0, num_kv_heads=2, head_dim=4, window=window, sinks=sinks, rngs=nnx.Rngs(0))
  if sinks:
    layer.sinks[...] = jnp.array([-1.0, 0.0, 0.5, 2.0])  # Head 3's sink takes most of its weight.
  x = np.asarray(jax.random.normal(jax.random.key(4), (2, 6, 8)), np.float64)
  wq, wkv, wo = (np.asarray(p[...], np.float64) for p in (layer.wq, layer.wkv, layer.wo))
  q = np.einsum("bld,dnh->blnh", x, wq)
  k, v = np.einsum("bld,dtkh->tblkh", x, wkv)
  k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
  i, j = np.arange(6)[:, None], np.arange(6)[None, :]
  visible = (j <= i) & ((i - j < window) if window else True)
  if window == 3:  # Query 5 sees keys 3, 4, 5 only.
    assert visible[5].tolist() == [False, False, False, True, True, True]
  want = _np_masked_attention(q, k, v, visible, np.asarray(layer.sinks[...]) if sinks else None)
  got = layer(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, want.reshape(2, 6, -1) @ wo, rtol=1e-4, atol=1e-5)


def test_a_sink_takes_its_share_and_adds_nothing():
  # One key of value 1 and score 0, a sink of logit log 3: the key gets 1/4 of the weight, the output 1/4.
  q, k, v = jnp.zeros((1, 1, 1, 2)), jnp.zeros((1, 1, 1, 2)), jnp.ones((1, 1, 1, 2))
  out = dot_attention(q, k, v, scale=1.0, sinks=jnp.array([math.log(3.0)]))
  np.testing.assert_allclose(out, 0.25 * np.ones((1, 1, 1, 2)), rtol=1e-6)


def test_alternating_windows_in_the_decoder():
  # gpt-oss's layout: even blocks slide, odd blocks (every 2nd: 1, 3) attend to every earlier key.
  cfg = base_config("lm")
  cfg.model.num_layers, cfg.model.sliding_window, cfg.model.full_attention_every = 4, 5, 2
  model = DecoderLM(decoder_config(cfg, 16), rngs=nnx.Rngs(0))
  assert [block.attention.window for block in model.blocks] == [5, 0, 5, 0]
  cfg.model.full_attention_every = 0  # Every block slides.
  model = DecoderLM(decoder_config(cfg, 16), rngs=nnx.Rngs(0))
  assert [block.attention.window for block in model.blocks] == [5, 5, 5, 5]
