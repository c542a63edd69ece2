"""model.scan_layers: the repeating blocks run as one lax.scan, with the losses and gradients of the loop.

First which blocks repeat (hand-checkable patterns, then the structures of real models), then
the scanned model against the unrolled one: a plain MoE decoder on an expert-parallel mesh under
each remat policy, DeepSeek-like (dense first block, MLA, shared experts, the routing bias, MTP),
gpt-oss-like (alternating windows) and the ViT; then the compiled program's size. What it does
to compile time, step time and memory at a realistic size: `python -m experiments.scan_layers`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from cli_util import REPO
from flax import nnx

from moejax.config import ConfigError, base_config, differences, override, validate
from moejax.layers.moe import MoEConfig
from moejax.models import scan
from moejax.models.build import decoder_config
from moejax.models.decoder import DecoderLM
from moejax.models.vit import ViT, ViTConfig
from moejax.parallel import make_mesh

sys.path.insert(0, os.path.join(REPO, "configs"))
import architectures

TINY = {
  "model.num_layers": 4,
  "model.d_model": 32,
  "model.num_heads": 2,
  "model.d_ff": 32,
  "model.moe_every": 1,
  "model.vocab_size": 16,
  "moe.num_experts": 4,
  "moe.top_k": 2,
  "train.seq_len": 8,
}
# DeepSeek-V3's options (MLA, sigmoid routing with the balancing bias over expert groups, a shared
# expert, MTP) at tiny sizes, with one dense first block (V3 has three).
DEEPSEEK = {
  **architectures.PRESETS["deepseek_v3"],
  **TINY,
  "model.num_layers": 3,
  "model.dense_layers": (0,),
  "model.q_lora_rank": 8,
  "model.kv_lora_rank": 8,
  "model.qk_nope_head_dim": 8,
  "model.qk_rope_head_dim": 4,
  "model.v_head_dim": 8,
  "moe.num_experts": 8,
  "moe.d_expert": 16,
  "moe.num_expert_groups": 4,
  "moe.top_expert_groups": 2,
  "moe.dispatcher": "sort",  # Compiles faster than V3's dropless; the scan does not depend on it.
}
# gpt-oss's options (a window in the even blocks, sinks, biases, clamped SwiGLU experts) at tiny sizes.
GPT_OSS = {
  **architectures.PRESETS["gpt_oss_20b"],
  **TINY,
  "model.num_heads": 4,
  "model.num_kv_heads": 2,
  "model.head_dim": 8,
  "model.sliding_window": 3,
  # Router noise, so that a wrong block index in the scan's rngs (units of p = 2) changes the result.
  "moe.router_noise": "jitter",
}


# The hand-checkable cases: one letter per block (equal letters: equal structures), and the
# unrolled prefix s and period p. With no repetition of at least two units: (n, 0).
REPETITIONS = [
  ("MMMM", (0, 1)),  # Every block MoE: four units of one.
  ("DMMMMM", (1, 1)),  # DeepSeek-V2: the first block dense, then MoE.
  ("DDDMMMMM", (3, 1)),  # DeepSeek-V3: three dense blocks first.
  ("DMDMDM", (0, 2)),  # MoE every 2nd block (Switch): units of (dense, MoE).
  ("SFSFSF", (0, 2)),  # gpt-oss: a sliding window in the even blocks, full attention in the odd.
  ("ABBABB", (0, 3)),  # The smallest prefix first: s = 0 with p = 3, not s = 1 ...
  ("ABAAAA", (2, 1)),  # ... and s = 2 with p = 1 here, as no s < 2 repeats.
  ("DDDM", (4, 0)),  # Nothing repeats twice: every block unrolled.
  ("DM", (2, 0)),
  ("M", (1, 0)),
]


@pytest.mark.parametrize("kinds,expected", REPETITIONS, ids=[k for k, _ in REPETITIONS])
def test_prefix_and_period(kinds, expected):
  assert scan.find_repetition(kinds) == expected


def _decoder(fields, mesh=None, abstract=False) -> DecoderLM:
  """A tiny decoder; abstract: shapes only (`nnx.eval_shape`, nothing initialised), enough for `scan.plan`."""
  cfg = override(base_config("lm"), {**TINY, **fields})
  validate(cfg, 8)
  build = lambda: DecoderLM(decoder_config(cfg, 16), mesh=mesh, rngs=nnx.Rngs(0))
  return nnx.eval_shape(build) if abstract else build()


def _vit(abstract=False, **fields) -> ViT:
  moe = dataclasses.replace(MoEConfig(), num_experts=4, top_k=2, d_expert=16, remat=fields.get("remat", "none"))
  shape = {"image_size": 8, "channels": 1, "num_classes": 3, "num_layers": 4, "d_model": 16, "num_heads": 2, "d_ff": 16}
  build = lambda: ViT(ViTConfig(**{**shape, **fields}, moe=moe), rngs=nnx.Rngs(0))
  return nnx.eval_shape(build) if abstract else build()


def test_the_plan_of_real_models():
  """The structures nnx.split sees, static attributes (the window) included, decide the units."""
  plan = lambda model: scan.plan(model.blocks)
  assert plan(_decoder({"model.num_layers": 6, "model.dense_layers": (0,)}, abstract=True)) == (1, 1)
  assert plan(_decoder({"model.num_layers": 6, "model.moe_every": 2}, abstract=True)) == (0, 2)
  # gpt-oss: every block MoE, windows alternating; the block structures differ only in the window.
  assert plan(_decoder({"model.sliding_window": 3, "model.full_attention_every": 2}, abstract=True)) == (0, 2)
  assert plan(_decoder(DEEPSEEK, abstract=True)) == (1, 1)  # The MTP block is not one of model.blocks.
  assert plan(_vit(num_layers=6, moe_every=0, moe_last=2, abstract=True)) == (4, 1)  # 4 dense, 2 MoE.
  assert plan(_vit(num_layers=4, moe_every=2, abstract=True)) == (0, 2)
  model = _decoder({}, abstract=True)
  for layer in model.moe_layers():  # moejax.analysis's sow changes the state: unrolled.
    layer.capture_routing = True
  assert scan.plan(model.blocks) == (4, 0)


def _flat(tree) -> dict:
  return {".".join(map(str, path)): np.asarray(value) for path, value in jax.tree_util.tree_leaves_with_path(tree)}


def _loss_and_grads(model, inputs, mtp: bool = False):
  """(loss, aux of every MoE layer, gradients w.r.t. every Param), by path, of a training step with router noise."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    model = nnx.merge(graphdef, params, rest)
    if mtp:
      logits, aux, mtp_logits = model.forward(inputs, train=True, rng=jax.random.key(2))
      logits = logits + sum(mtp_logits)
    else:
      logits, aux = model(inputs, train=True, rng=jax.random.key(2))
    return jnp.mean(logits**2) + sum(a["load_balance_loss"] for a in aux), aux

  (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return float(value), _flat(aux), _flat(nnx.to_pure_dict(grads))


def _assert_same(scanned, unrolled, label=""):
  (loss, aux, grads), (base_loss, base_aux, base_grads) = scanned, unrolled
  assert loss == pytest.approx(base_loss, rel=1e-5), label
  assert aux.keys() == base_aux.keys() and grads.keys() == base_grads.keys()
  for name in base_aux:
    np.testing.assert_allclose(aux[name], base_aux[name], rtol=1e-5, atol=1e-7, err_msg=f"{label} aux {name}")
  # atol: the two programs are fused differently, so float32 sums may round differently (seen:
  # 1.2e-7 on a gradient entry of 2e-3 in a block that runs unrolled in both); a wrong rng, bias
  # or block order moves the gradients by orders of magnitude more.
  for name in base_grads:
    np.testing.assert_allclose(grads[name], base_grads[name], rtol=1e-5, atol=1e-6, err_msg=f"{label} {name}")


TOKENS = jax.random.randint(jax.random.key(1), (8, 8), 0, 16)


def test_expert_parallel_moe_decoder_with_moe_remat():
  """Data 2 × expert 2, jitter noise (each block's rng matters), 'moe' remat inside the layers'
  shard_map: the loss, aux and gradients of the unrolled loop without remat."""
  mesh = make_mesh(2, 2)
  fields = {
    "model.num_layers": 3,
    "moe.router_noise": "jitter",
    "moe.jitter_eps": 0.01,
    "moe.dispatcher": "sort",
  }
  unrolled = _loss_and_grads(_decoder(fields, mesh), TOKENS)
  scanned = _loss_and_grads(_decoder({**fields, "model.scan_layers": True, "model.remat": "moe"}, mesh), TOKENS)
  _assert_same(scanned, unrolled)


def test_a_bfloat16_stream_is_scanned():
  """model.dtype bfloat16 with float32 weights: every block keeps the bfloat16 stream (the norms
  return its dtype), so all 3 blocks are scanned, 3 steps. The scan's program rounds in other
  places than the loop's, so the logits agree to bfloat16 rounding (mean |difference| 0.8% of the
  mean |logit| when written; a block reading the wrong weights is off by the order of the logits)."""
  fields = {"model.num_layers": 3, "model.dtype": "bfloat16"}
  unrolled, scanned = _decoder(fields), _decoder({**fields, "model.scan_layers": True})
  forward = lambda model: model(TOKENS)
  assert "length=3" in str(jax.make_jaxpr(lambda: forward(scanned))())  # The scan's steps.
  (logits, aux), (base_logits, base_aux) = nnx.jit(forward)(scanned), nnx.jit(forward)(unrolled)
  logits, base_logits = np.asarray(logits), np.asarray(base_logits)
  assert np.abs(logits - base_logits).mean() < 0.02 * np.abs(base_logits).mean()
  assert _flat(aux).keys() == _flat(base_aux).keys() and len(aux) == len(base_aux) == 3


def test_deepseek_like_decoder():
  """Blocks 1-2 scanned after the dense block 0, without remat; the routing bias (a RouterBias,
  not a Param) is read from each block's own state; the MTP module runs after the scan, its aux last."""

  def model(scan_layers):
    decoder = _decoder({**DEEPSEEK, "model.scan_layers": scan_layers})
    for k, layer in enumerate(decoder.moe_layers()):  # A different bias per layer, large enough to change the choices.
      layer.router.bias[...] = jax.random.normal(jax.random.key(10 + k), layer.router.bias.shape)
    return decoder

  _assert_same(_loss_and_grads(model(True), TOKENS, mtp=True), _loss_and_grads(model(False), TOKENS, mtp=True))


def test_gpt_oss_like_decoder_with_full_remat():
  """Units of (sliding, full) attention blocks, each block under 'full' remat inside the scan."""
  unrolled = _loss_and_grads(_decoder(GPT_OSS), TOKENS)
  scanned = _loss_and_grads(_decoder({**GPT_OSS, "model.scan_layers": True, "model.remat": "full"}), TOKENS)
  _assert_same(scanned, unrolled)


def test_vit():
  """Two MoE blocks (units of 1) under 'dots' remat; with nothing that repeats (2 blocks, the last
  MoE) scan_layers runs the loop."""
  images = jax.random.normal(jax.random.key(3), (4, 8, 8, 1))
  fields = {"num_layers": 2, "moe_every": 1}
  scanned = _loss_and_grads(_vit(**fields, scan_layers=True, remat="dots"), images)
  _assert_same(scanned, _loss_and_grads(_vit(**fields), images))
  unscannable = _vit(num_layers=2, moe_every=0, moe_last=1, scan_layers=True)
  assert scan.plan(unscannable.blocks) == (2, 0)
  logits, aux = nnx.eval_shape(lambda model, x: model(x), unscannable, images)
  assert logits.shape == (4, 3) and len(aux) == 1


def test_the_program_holds_one_block():
  """8 MoE blocks: the scanned gradient program has a while loop where the unrolled one has none
  (the 'sort' dispatcher has no loop of its own), and is under half as long."""

  def program(scan_layers):
    model = _decoder({"model.num_layers": 8, "moe.dispatcher": "sort", "model.scan_layers": scan_layers})
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda params: nnx.merge(graphdef, params, rest)(TOKENS, train=True)[0].sum()
    return jax.jit(jax.grad(loss)).lower(params).as_text()

  unrolled, scanned = program(False), program(True)
  assert "stablehlo.while" not in unrolled and "stablehlo.while" in scanned
  assert len(scanned) < 0.5 * len(unrolled)


def test_routing_capture_runs_unrolled():
  """moejax.analysis on a scan_layers model: the layers sow their decisions, as without the option."""
  from moejax.analysis import routing_decisions

  unrolled = routing_decisions(_decoder({}), TOKENS)
  scanned = routing_decisions(_decoder({"model.scan_layers": True}), TOKENS)
  assert len(scanned) == len(unrolled) == 4
  for a, b in zip(scanned, unrolled):
    np.testing.assert_array_equal(a.expert_index, b.expert_index)


def test_config():
  """A bool, refused otherwise; it may change when a run resumes, and is not part of the model's function."""
  from moejax.config import RESUMABLE_CHANGES
  from moejax.convert.hf_config import NOT_THE_FUNCTION

  cfg = base_config("lm").to_dict()
  cfg["model"]["scan_layers"] = "yes"
  with pytest.raises(ConfigError, match="model.scan_layers: must be True or False"):
    validate(ml_collections.ConfigDict(cfg), num_devices=1)
  saved = json.loads(json.dumps(base_config("lm").to_dict()))  # As a workdir's config.json holds it.
  resumed = override(base_config("lm"), {"model.scan_layers": True}).to_dict()
  assert differences(saved, resumed) == ["model.scan_layers=False->True"]
  assert differences(saved, resumed, ignore=RESUMABLE_CHANGES) == []
  assert "model.scan_layers" in NOT_THE_FUNCTION


def test_the_start_up_line_says_what_is_scanned():

  assert scan.note(1, 1, 6) == "scan_layers: blocks 0..0 unrolled, then 5 units of 1 block(s) scanned"
  assert scan.note(0, 2, 6) == "scan_layers: 3 units of 2 block(s) scanned"
  assert "all 3 blocks run unrolled" in scan.note(3, 0, 3)
