"""model.remat: every policy gives the losses and gradients of no remat, each block under its checkpoint.

What the policies keep and cost at a realistic size: `python -m experiments.remat_memory`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import base_config, override
from moejax.models.build import decoder_config
from moejax.models.decoder import DecoderLM
from moejax.parallel import make_mesh

SMALL = {
  "model.num_layers": 2,
  "model.d_model": 32,
  "model.num_heads": 2,
  "model.d_ff": 32,
  "model.moe_every": 1,
  "moe.num_experts": 4,
  "moe.top_k": 2,
  "moe.expert_exchange": "padded",
  "train.seq_len": 8,
}


def _loss_and_grads(fields, mesh):
  cfg = override(base_config("lm"), {**SMALL, **fields})
  graphdef, params, rest = nnx.split(DecoderLM(decoder_config(cfg, 16), mesh=mesh, rngs=nnx.Rngs(0)), nnx.Param, ...)
  tokens = jax.random.randint(jax.random.key(1), (8, 8), 0, 16)

  def loss(params):
    logits, aux = nnx.merge(graphdef, params, rest)(tokens, train=True, rng=jax.random.key(2))
    return jnp.mean(logits**2) + sum(a["load_balance_loss"] for a in aux)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  checkpoints = str(jax.make_jaxpr(loss)(params)).count("remat2[")  # One per rematerialised block.
  flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
  return float(value), flat, checkpoints


@pytest.mark.parametrize("dispatcher", ["dropless", "sort"])
def test_every_policy_gives_the_gradients_of_no_remat(dispatcher):
  """Expert-parallel (data 2 × expert 2), with router noise: the same loss and gradients under
  'full', 'dots' and 'moe' as without remat; a checkpoint per block ('full', 'dots') or per MoE
  layer inside its shard_map ('moe'), 2 either way."""
  mesh = make_mesh(2, 2)
  fields = {"moe.dispatcher": dispatcher, "moe.router_noise": "jitter", "moe.jitter_eps": 0.01}
  base_loss, base_grads, checkpoints = _loss_and_grads({**fields, "model.remat": "none"}, mesh)
  assert checkpoints == 0
  for policy in ("full", "dots", "moe"):
    loss, grads, checkpoints = _loss_and_grads({**fields, "model.remat": policy}, mesh)
    assert checkpoints == 2, policy
    assert loss == pytest.approx(base_loss, rel=1e-6), policy
    for name in base_grads:
      np.testing.assert_allclose(grads[name], base_grads[name], rtol=1e-5, atol=1e-7, err_msg=f"{policy} {name}")


def test_the_vit_blocks_rematerialise_too():
  """The ViT shares the decoder's blocks: 'full' gives the gradients of 'none' (top-2 capacity, 8×8 images)."""
  import dataclasses

  from moejax.layers.moe import MoEConfig
  from moejax.models.vit import ViT, ViTConfig

  images = jax.random.normal(jax.random.key(3), (4, 8, 8, 1))
  grads = {}
  for policy in ("none", "full"):
    moe = dataclasses.replace(MoEConfig(), num_experts=4, top_k=2, d_expert=16, remat=policy)
    cfg = ViTConfig(
      image_size=8, channels=1, num_classes=3, num_layers=2, d_model=16, num_heads=2, d_ff=16, remat=policy, moe=moe
    )
    graphdef, params, rest = nnx.split(ViT(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    loss = lambda params: jnp.sum(nnx.merge(graphdef, params, rest)(images, train=True)[0] ** 2)
    grads[policy] = jax.tree.leaves(jax.jit(jax.grad(loss))(params))
    if policy == "full":
      assert str(jax.make_jaxpr(loss)(params)).count("remat2[") == 2
  for a, b in zip(grads["full"], grads["none"]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_moe_remat_on_a_model_without_moe_layers_is_refused():
  from moejax.config import validate
  from moejax.errors import ConfigError

  cfg = override(base_config("lm"), {**SMALL, "model.moe_every": 0, "model.remat": "moe"})
  with pytest.raises(ConfigError, match="model.remat: 'moe' rematerialises inside the MoE layers"):
    validate(cfg, 1)


@pytest.mark.parametrize("dispatcher", ["dropless", "sort"])
def test_moe_policy_redoes_no_exchange_and_full_does(dispatcher):
  """In the gradient's program on a data 2 × expert 2 mesh: 'moe' runs exactly the all_to_alls of
  no remat (what they delivered is kept by name), 'full' runs the forward ones again."""

  def exchanges(policy):
    cfg = override(
      base_config("lm"), {**SMALL, "moe.dispatcher": dispatcher, "model.remat": policy, "model.moe_every": 1}
    )
    graphdef, params, rest = nnx.split(
      DecoderLM(decoder_config(cfg, 16), mesh=make_mesh(2, 2), rngs=nnx.Rngs(0)), nnx.Param, ...
    )
    loss = lambda params: nnx.merge(graphdef, params, rest)(jnp.zeros((4, 8), jnp.int32), train=True)[0].sum()
    return str(jax.make_jaxpr(jax.grad(loss))(params)).count("all_to_all[")

  none = exchanges("none")
  assert none > 0 and exchanges("moe") == none and exchanges("full") > none
