"""ViT: patch order, shapes, MoE placement, non-causal attention, position sensitivity, learning.

Models are tiny (8×8 images) and every forward pass is jitted: op-by-op dispatch of the MoE
layer's shard_map costs more than compiling it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moejax.layers.moe import MoEConfig, MoELayer
from moejax.models.vit import ViT, ViTConfig, patchify

# Capacity for every choice (4 experts, top-2: C = S·2·2/4 = S), so no token is dropped and the
# MoE layer treats every token alike, whatever its position.
_MOE = MoEConfig(num_experts=4, top_k=2, d_expert=32, capacity_factor=2.0, eval_capacity_factor=2.0)


def _small(**overrides):
  fields = dict(
    image_size=8,
    channels=1,
    num_classes=10,
    patch_size=2,
    num_layers=2,
    d_model=32,
    num_heads=2,
    d_ff=32,
    moe_every=1,
    moe=_MOE,
  )
  fields.update(overrides)
  return ViTConfig(**fields)


_forward = nnx.jit(lambda model, images: model(images, train=False))


def test_patchify_hand_checked():
  # A 4×4 image with 2 channels, pixel (r, c) = [10r + c, -(10r + c)], patches of 2×2.
  rc = 10 * np.arange(4)[:, None] + np.arange(4)[None, :]
  image = np.stack([rc, -rc], axis=-1)[None].astype(np.float32)  # [1, 4, 4, 2]
  patches = np.asarray(patchify(jnp.asarray(image), 2))
  assert patches.shape == (1, 4, 8)
  # Patch 1 is the top-right one: rows 0-1, columns 2-3, flattened as (row, column, channel).
  np.testing.assert_array_equal(patches[0, 1], [2, -2, 3, -3, 12, -12, 13, -13])
  np.testing.assert_array_equal(patches[0, 2, :2], [20, -20])  # Patch 2 starts at row 2, column 0.


@pytest.fixture(scope="module")
def models():
  """One small model per pooling, shared so that each is compiled once."""
  return {pooling: ViT(_small(pooling=pooling), rngs=nnx.Rngs(0)) for pooling in ("gap", "cls")}


@pytest.mark.parametrize("pooling", ["gap", "cls"])
def test_output_shapes(models, pooling):
  assert models[pooling].cfg.num_tokens == 16 + (pooling == "cls")
  images = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
  logits, aux = _forward(models[pooling], images)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert len(aux) == 2 and aux[0]["expert_load"].shape == (4,)
  assert float(aux[0]["fraction_dropped"].sum()) < 1e-6


def test_moe_placement():
  kinds = lambda cfg: [isinstance(b.ffn, MoELayer) for b in ViT(cfg, rngs=nnx.Rngs(0)).blocks]
  assert kinds(_small(num_layers=4, moe_every=2)) == [False, True, False, True]
  # Soft MoE's placement: MoE in the second half only.
  assert kinds(_small(num_layers=4, moe_every=0, moe_last=2)) == [False, False, True, True]
  assert kinds(_small(num_layers=3, moe_every=0, moe_last=3)) == [True, True, True]
  assert kinds(_small(num_layers=2, moe_every=0)) == [False, False]
  with pytest.raises(ValueError, match="set at most one"):
    _small(moe_every=2, moe_last=1)
  with pytest.raises(ValueError, match="moe_last=3 is not in"):
    _small(moe_every=0, moe_last=3)
  with pytest.raises(ValueError, match="not divisible by patch_size"):
    _small(patch_size=3)
  with pytest.raises(ValueError, match="pooling='max'"):
    _small(pooling="max")


def test_attention_is_not_causal(models):
  """The class token sits at position 0 and is all the head sees: with causal attention it
  could attend to nothing but itself and the logits would not depend on the image at all."""
  model = models["cls"]
  images = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
  last_patch_changed = images.at[:, 6:, 6:].set(1.0 - images[:, 6:, 6:])
  a, _ = _forward(model, images)
  b, _ = _forward(model, last_patch_changed)
  assert np.abs(np.asarray(a - b)).max() > 1e-3


def _swap_patch_rows(images, patch_size):
  """Reverses the order of the rows of patches; each patch's own pixels are unchanged."""
  b, h, w, c = images.shape
  grid = images.reshape(b, h // patch_size, patch_size, w, c)
  return grid[:, ::-1].reshape(b, h, w, c)


@pytest.mark.parametrize("pooling", ["gap", "cls"])
def test_patch_order_matters_only_through_position_embeddings(models, pooling):
  """Attention, the FFNs and the (drop-free) MoE layers treat tokens as a set, and both poolings
  are order-free, so without position embeddings permuting the patches leaves the logits as
  they were; with them it does not."""
  model = nnx.clone(models[pooling])  # The shared model keeps its position embeddings.
  images = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
  permuted = _swap_patch_rows(images, 2)
  assert not np.allclose(patchify(images, 2), patchify(permuted, 2))
  a, aux = _forward(model, images)
  b, _ = _forward(model, permuted)
  assert float(aux[0]["fraction_dropped"].sum()) < 1e-6
  assert np.abs(np.asarray(a - b)).max() > 1e-3
  model.position_embed[...] = jnp.zeros_like(model.position_embed[...])
  a, _ = _forward(model, images)
  b, _ = _forward(model, permuted)
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_few_steps_on_digits_reduce_the_loss():
  from moejax.data import images as images_lib

  data = images_lib.make_image_data(images_lib.default_image_data_config(), global_batch_size=64, seed=0)
  model = ViT(_small(moe_every=2), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(5e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    def loss_fn(model):
      logits, aux = model(batch["images"], train=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
      return loss + 1e-2 * sum(a["load_balance_loss"] for a in aux), loss

    (_, loss), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, batch)) for _, batch in zip(range(25), data.train_batches(0))]
  assert abs(losses[0] - np.log(10)) < 0.5  # Near chance at initialisation.
  assert np.mean(losses[-5:]) < 0.75 * losses[0], losses
  evals = data.eval_batches()
  correct = sum(int((np.asarray(_forward(model, b["images"])[0]).argmax(-1) == b["labels"]).sum()) for b in evals)
  assert correct / data.info["num_eval"] > 3 * data.info["majority_class_accuracy"]


def test_vit_accounting_by_hand():
  from moejax import accounting

  cfg = ViTConfig(
    image_size=8,
    channels=1,
    num_classes=10,
    patch_size=2,
    num_layers=2,
    d_model=16,
    num_heads=2,
    d_ff=32,
    moe_every=2,
    moe=MoEConfig(num_experts=4, top_k=2, d_expert=32),
  )
  n, d = 16, 16  # 16 patches of 2·2·1 = 4 values, model width 16.
  cost = accounting.vit_cost(cfg)
  model = ViT(cfg, rngs=nnx.Rngs(0))
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  expert = 4 * 2 * d * 32
  assert cost.total_params == total
  assert cost.active_params == total - expert // 2  # Top-2 of 4: half the expert weights idle.
  matrices = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)) if x.ndim >= 2)
  # Position embeddings are added, not multiplied; attention scores add 6·layers·N·d.
  assert cost.train_flops_per_token == 6 * (matrices - n * d - expert // 2 + 2 * n * d)
