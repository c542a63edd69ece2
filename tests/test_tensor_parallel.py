"""Tensor parallelism: meshes with 'model' > 1 compute what one device does (issue #16).

The MoE layer with every router family and both data paths (the cases of test_expert_parallel),
the decoder with every attention kind and architecture piece (configs/lm_architectures.py, plus
grouped-query attention with QK-norm and the ViT), each on meshes (data, expert, model) of the 8
fake CPU devices against (1, 1, 1): outputs, aux losses and gradients, to float32 reduction-order
tolerance. The CLI's trajectory on a data × expert × model mesh with FSDP is in
test_expert_parallel.py (test_training_follows_the_one_device_losses).
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.config import base_config, override
from moejax.layers.moe import MoEConfig, MoELayer
from moejax.models.build import decoder_config
from moejax.models.decoder import DecoderLM
from moejax.parallel import BATCH_AXES, make_mesh, state_sharding, undivided
from test_expert_parallel import CASES, _assert_same
from test_router_training import _config_module


def _layer_loss_and_grads(cfg: MoEConfig, mesh, x, ids):
  layer = MoELayer(8, cfg, mesh=mesh, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  params = jax.device_put(params, state_sharding(mesh, params))  # As the trainer places them.

  def loss_fn(params):
    y, aux = nnx.merge(graphdef, params, rest)(x, train=True, token_ids=ids)
    return jnp.sum(jnp.sin(y)) + aux["load_balance_loss"] + aux["z_loss"], (y, aux)

  (loss, (y, aux)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return y, loss, aux, grads


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_layer_on_model_meshes_equals_one_device(case):
  """Each 'model' device computes a slice of every local expert's hidden dimension (f = 16 in 2
  or 4 slices); the partial outputs are summed after the combine."""
  cfg = MoEConfig(num_experts=8, d_expert=16, capacity_factor=1.0, **CASES[case])
  x = jax.random.normal(jax.random.key(0), (16, 8, 8))
  ids = jax.random.randint(jax.random.key(1), (16, 8), 0, 50)
  want = _layer_loss_and_grads(cfg, make_mesh(1, 1, 1), x, ids)
  for shape in ((2, 2, 2), (1, 2, 4)):
    _assert_same(_layer_loss_and_grads(cfg, make_mesh(*shape), x, ids), want, f"{case} mesh {shape}")


def test_experts_hidden_dimension_is_split_over_model():
  """Inside the layer a device of a 2 × 2 (expert × model) mesh holds [E/2, d, f/2] = [4, 8, 16]
  and the outputs are summed over 'model' (an all-reduce the expert-only mesh does not have)."""
  cfg = MoEConfig(num_experts=8, top_k=2, d_expert=32)
  text = lambda mesh: (
    jax.jit(lambda x: MoELayer(8, cfg, mesh=mesh, rngs=nnx.Rngs(0))(x, train=False)[0])
    .lower(jnp.ones((8, 8, 8)))
    .as_text()
  )
  split, whole = text(make_mesh(1, 2, 2)), text(make_mesh(2, 2, 1))
  assert "tensor<4x8x16xf32>" in split and "tensor<4x16x8xf32>" in split  # wi/wg and wo slices
  assert "tensor<4x8x16xf32>" not in whole and "tensor<4x8x32xf32>" in whole
  assert "all_reduce" in split and "all_reduce" not in whole


def test_state_sharding_follows_the_rules():
  """Logical axes to mesh axes: heads, kv heads, the FFN's and experts' hidden dims and the
  vocabulary over 'model' by default; a dimension 'model' does not divide stays whole; '' replicates."""
  cfg = override(
    base_config("lm"),
    {
      "model.num_layers": 2,
      "model.d_model": 16,
      "model.num_heads": 4,
      "model.num_kv_heads": 2,
      "model.d_ff": 32,
      "model.moe_every": 2,
      "moe.num_experts": 4,
      "train.seq_len": 8,
    },
  )
  params = nnx.state(nnx.eval_shape(lambda: DecoderLM(decoder_config(cfg, 64), rngs=nnx.Rngs(0))), nnx.Param)

  def specs(mesh, **kw):
    flat = nnx.to_flat_state(state_sharding(mesh, params, **kw))
    return {".".join(map(str, path)): tuple(s.spec) for path, s in flat}

  tp = specs(make_mesh(1, 2, 4))
  assert tp["blocks.0.attention.wq"] == (None, "model", None)  # [d, N=4, H]
  assert tp["blocks.0.attention.wkv"] == (None, None, None, None)  # [d, 2, N_kv=2, H]: 4 does not divide 2
  assert tp["blocks.0.attention.wo"] == ("model", None)  # [N·H, d]
  assert tp["blocks.0.ffn.wi"] == (None, "model") and tp["blocks.0.ffn.wo"] == ("model", None)  # dense FFN
  assert tp["blocks.1.ffn.wi"] == ("expert", None, "model")  # [E, d, f]
  assert tp["blocks.1.ffn.wo"] == ("expert", "model", None)
  assert tp["blocks.1.ffn.router.kernel"] == (None, None)
  assert tp["embed.embedding"] == ("model", None) and tp["unembed.kernel"] == (None, "model")
  assert specs(make_mesh(1, 2, 2))["blocks.0.attention.wkv"] == (None, None, "model", None)
  rules = {"heads": "", "kv_heads": "model", "mlp": "", "expert_mlp": "model", "vocab": ""}
  some = specs(make_mesh(1, 2, 2), rules=rules)
  assert some["blocks.0.attention.wq"] == (None, None, None) and some["blocks.0.ffn.wi"] == (None, None)
  assert some["blocks.1.ffn.wi"] == ("expert", None, "model") and some["embed.embedding"] == (None, None)
  # With FSDP, 'data' takes the largest dimension left free.
  fsdp = specs(make_mesh(2, 2, 2), fsdp=True)
  assert fsdp["blocks.1.ffn.wi"] == ("expert", "data", "model") and fsdp["blocks.0.ffn.wi"] == ("data", "model")
  # What stays whole is said at start-up: the 2 key/value heads on 4 'model' devices, nothing on 2.
  assert undivided(make_mesh(1, 2, 4), params) == ["kv_heads: 2 on 4 'model' devices"]
  assert (
    undivided(make_mesh(1, 2, 2), params) == []
    and undivided(make_mesh(1, 1, 4), params, {**rules, "kv_heads": ""}) == []
  )


def test_refusals():
  """One line naming the field: the experts' hidden dim and a process's devices must take 'model'."""
  from moejax.config import validate
  from moejax.errors import ConfigError

  cfg = override(base_config("lm"), {"mesh.model": 4, "moe.d_expert": 6, "model.moe_every": 1})
  with pytest.raises(ConfigError, match="mesh.model: 4 model devices must divide the experts' hidden dimension 6"):
    validate(cfg, 8)
  cfg = override(base_config("lm"), {"mesh.model": 4, "mesh.data": 1, "mesh.expert": 2})
  with pytest.raises(ConfigError, match="mesh.model: 4 must divide each process's 2 devices"):
    validate(cfg, 8, 4)


ARCHITECTURES = _config_module("lm_architectures")
TINY = {
  "model.num_layers": 2,
  "model.d_model": 32,
  "model.num_heads": 4,
  "model.d_ff": 32,
  "model.moe_every": 1,
  "moe.num_experts": 8,
  "moe.expert_exchange": "padded",
  "train.seq_len": 16,
}
# Every architecture piece, and the quickstart's multi-head attention and GQA with QK-norm.
MODELS = {
  **{name: lambda name=name: ARCHITECTURES.get_config(name) for name in ARCHITECTURES.PRESETS},
  "mha": lambda: base_config("lm"),
  "gqa_qk_norm": lambda: override(base_config("lm"), {"model.num_kv_heads": 2, "model.qk_norm": True}),
}


def _decoder_loss_and_grads(name, mesh, fsdp=False):
  cfg = override(MODELS[name](), TINY)
  if cfg.moe.d_expert:
    cfg.moe.d_expert = 16  # Fine-grained: half the tiny d_ff, still split by 4.
  if cfg.model.num_kv_heads:
    cfg.model.num_kv_heads = 2
  if cfg.model.sliding_window:
    cfg.model.sliding_window = 4
  model = DecoderLM(decoder_config(cfg, 64), mesh=mesh, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.device_put(params, state_sharding(mesh, params, fsdp=fsdp))
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
  tokens = jax.device_put(tokens, NamedSharding(mesh, P(BATCH_AXES)))

  def loss_fn(params):
    logits, aux, mtp = nnx.merge(graphdef, params, rest).forward(tokens, train=True, rng=jax.random.key(2))
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))
    loss += sum(a["load_balance_loss"] + a["z_loss"] for a in aux) + sum(jnp.mean(m**2) for m in mtp)
    return loss, (logits, aux)

  (loss, (logits, aux)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return logits, loss, aux, grads


# Every model 2 ways (data 2 × expert 2 × model 2, FSDP on); 4 ways (expert 2 × model 4, where 2
# key/value heads stay whole) for GQA and MLA by default, the others slow-marked (same code paths).
FOUR_WAYS_BY_DEFAULT = ("gqa_qk_norm", "mla")
DECODER_CASES = [(name, (2, 2, 2)) for name in sorted(MODELS)] + [
  pytest.param(name, (1, 2, 4), marks=() if name in FOUR_WAYS_BY_DEFAULT else pytest.mark.slow)
  for name in sorted(MODELS)
]


@pytest.mark.parametrize("name,shape", DECODER_CASES)
def test_decoder_on_model_meshes_equals_one_device(name, shape):
  """Heads, FFN and expert hidden dims, vocabulary split over 'model': logits, aux and grads
  equal one device's. DBRX's router jitter is drawn per device of the batch (as with expert
  parallelism), so there the reference is the same data × expert mesh with model 1."""
  noisy = MODELS[name]().moe.router_noise != "none"
  reference = (*shape[:2], 1) if noisy else (1, 1, 1)
  want = _decoder_loss_and_grads(name, make_mesh(*reference))
  fsdp = shape == (2, 2, 2)
  _assert_same(_decoder_loss_and_grads(name, make_mesh(*shape), fsdp=fsdp), want, f"{name} {shape} vs {reference}")


def test_vit_on_a_model_mesh_equals_one_device():
  import dataclasses

  from moejax.models.vit import ViT, ViTConfig

  images = jax.random.normal(jax.random.key(3), (8, 8, 8, 1))

  def run(mesh):
    moe = dataclasses.replace(MoEConfig(), num_experts=4, top_k=2, d_expert=16)
    cfg = ViTConfig(image_size=8, channels=1, num_classes=3, num_layers=2, d_model=16, num_heads=2, d_ff=16, moe=moe)
    graphdef, params, rest = nnx.split(ViT(cfg, mesh=mesh, rngs=nnx.Rngs(0)), nnx.Param, ...)
    params = jax.device_put(params, state_sharding(mesh, params))

    def loss_fn(params):
      logits, aux = nnx.merge(graphdef, params, rest)(images, train=True)
      return jnp.sum(logits**2) + sum(a["load_balance_loss"] for a in aux), (logits, aux)

    (loss, (logits, aux)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return logits, loss, aux, grads

  _assert_same(run(make_mesh(2, 2, 2)), run(make_mesh(1, 1, 1)), "vit (2, 2, 2)")
