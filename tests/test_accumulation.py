"""Gradient accumulation (train.microbatches): the mean over micro-batches is the whole batch's step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax import tasks
from moejax.config import common
from moejax.errors import ConfigError
from moejax.train import Trainer

TINY = {
  "model.num_layers": 2,
  "model.d_model": 32,
  "model.num_heads": 2,
  "model.d_ff": 32,
  "moe.num_experts": 4,
  "train.seq_len": 16,
  "train.batch_size": 16,
  "mesh.data": 2,
  "mesh.expert": 2,
  "data.markov.vocab_size": 16,
  "data.markov.num_train": 256,
  "data.markov.num_validation": 16,
}


def _trainer(data_dir, fields):
  cfg = common.small_lm()
  config_lib.override(cfg, {**TINY, "data.data_dir": data_dir, **fields})
  config_lib.validate(cfg, jax.device_count())
  data = tasks.make_data(cfg)
  return Trainer(cfg, tasks.make_task(cfg, data)), data


def _gradients(trainer, batch):
  state = trainer.state
  rng = jax.random.key(0)
  grads, metrics, moe_aux = jax.jit(trainer._gradients)(
    trainer._trainable(state), state["model_state"], trainer.shard_batch(batch), rng
  )
  flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
  return flat, jax.device_get(metrics), jax.device_get(moe_aux)


@pytest.mark.parametrize(
  "fields",
  [
    # Capacity routing (sort, cf 1.25): groups are sequences, so each keeps its slots in a micro-batch.
    {"moe.router": "top_k", "moe.top_k": 2, "moe.dispatcher": "sort", "moe.capacity_factor": 1.25},
    # Dropless DeepSeek routing with a shared expert: its balancing bias moves with the mean loads.
    {"moe.router": "deepseek", "moe.top_k": 2, "moe.num_shared_experts": 1, "moe.dispatcher": "dropless"},
  ],
  ids=["top2_capacity", "deepseek_dropless"],
)
@pytest.mark.parametrize("microbatches", [2, 4])
def test_micro_batches_give_the_whole_batch_gradients(data_dir, fields, microbatches):
  """On a data 2 × expert 2 mesh: gradients, loss, aux losses and expert loads of M micro-batches
  (averaged) equal the whole batch's; and one training step moves the DeepSeek bias the same way."""
  whole, data = _trainer(data_dir, fields)
  split, _ = _trainer(data_dir, {**fields, "train.microbatches": microbatches})
  batch = next(data.train_batches(0))
  g1, m1, a1 = _gradients(whole, batch)
  g2, m2, a2 = _gradients(split, batch)
  assert g1.keys() == g2.keys()
  for name in g1:
    np.testing.assert_allclose(g2[name], g1[name], rtol=2e-4, atol=2e-7, err_msg=name)
  for name in ("loss", "cross_entropy"):
    np.testing.assert_allclose(m2[name], m1[name], rtol=1e-5, err_msg=name)
  for layer1, layer2 in zip(a1, a2):  # Each expert's share of the kept choices: a mean of micro-batch
    # shares, which differs from the whole batch's share where the micro-batches keep different numbers.
    np.testing.assert_allclose(layer2["expert_load"], layer1["expert_load"], rtol=1e-2)
  # Extremes are the extremes over the micro-batches, which are the whole batch's (no mean of them).
  for name in ("min_selected_gate", "max_selected_gate", "num_experts_per_token_min", "num_experts_per_token_max"):
    key = f"moe_layer0/{name}"
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)
    assert a2[0][name] == pytest.approx(a1[0][name], rel=1e-5), name
  # The load ratio is the mean load's: max / mean of a2's expert_load, not a mean of ratios.
  load = a2[0]["expert_load"]
  assert m2["moe_layer0/max_over_mean_load"] == pytest.approx(load.max() / load.mean(), rel=1e-6)
  whole.train_step(batch), split.train_step(batch)
  for (path, v1), (_, v2) in zip(
    nnx.to_flat_state(whole.state["model_state"]), nnx.to_flat_state(split.state["model_state"])
  ):
    np.testing.assert_allclose(np.asarray(v2.get_value()), np.asarray(v1.get_value()), atol=1e-6, err_msg=str(path))


@pytest.mark.parametrize(
  "fields, message",
  [
    ({"train.microbatches": 3}, "train.microbatches: 3 must divide train.batch_size = 16"),
    ({"train.microbatches": 8}, "train.batch_size: 16 / train.microbatches = 2 must be divisible by the mesh's 4"),
    ({"train.microbatches": 0}, "train.microbatches: must be > 0"),
  ],
)
def test_micro_batches_that_do_not_fit_are_refused(fields, message):
  cfg = common.small_lm()
  config_lib.override(cfg, {**TINY, **fields})
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
    config_lib.validate(cfg, jax.device_count())


def test_bfloat16_parameters_with_float32_master_weights(data_dir):
  """train.param_dtype 'bfloat16': the step differentiates a bfloat16 copy of the parameters (the
  router's and the embedding's stay float32), so its gradients are the float32 ones to bfloat16
  precision but not equal; the parameters and the optimizer's moments stay float32."""
  fields = {"moe.router": "top_k", "moe.top_k": 2, "moe.dispatcher": "dropless"}
  full, data = _trainer(data_dir, fields)
  half, _ = _trainer(data_dir, {**fields, "train.param_dtype": "bfloat16"})
  batch = next(data.train_batches(0))
  g32, _, _ = _gradients(full, batch)
  g16, _, _ = _gradients(half, batch)
  for name in g32:
    assert g16[name].dtype == np.float32
    scale = np.abs(g32[name]).max()
    np.testing.assert_allclose(g16[name], g32[name], atol=0.05 * scale + 1e-8, err_msg=name)
  assert any(not np.array_equal(g16[name], g32[name]) for name in g32)
  state = half._trainable(half.state)
  jaxpr = str(
    jax.make_jaxpr(half._gradients)(state, half.state["model_state"], half.shard_batch(batch), jax.random.key(0))
  )
  assert "bf16[" in jaxpr
  from moejax.train import _low_precision

  copy = {".".join(map(str, p)): v.get_value().dtype for p, v in nnx.to_flat_state(_low_precision(state, jnp.bfloat16))}
  kept = {"blocks.1.ffn.router.kernel": np.float32, "embed.embedding": np.float32}
  assert {n: d for n, d in copy.items() if n in kept} == kept
  assert all(d == jnp.bfloat16 for n, d in copy.items() if n not in kept)
  # With micro-batches too: their bfloat16 gradients are summed in float32, near the whole batch's.
  both, _ = _trainer(data_dir, {**fields, "train.param_dtype": "bfloat16", "train.microbatches": 2})
  g16m, _, _ = _gradients(both, batch)
  for name in g32:
    np.testing.assert_allclose(g16m[name], g32[name], atol=0.05 * np.abs(g32[name]).max() + 1e-8, err_msg=name)
  half.train_step(batch)
  leaves = jax.tree.leaves(half.state["params"]) + jax.tree.leaves(half.state["opt_state"])
  assert all(x.dtype != jax.numpy.bfloat16 for x in leaves)


def test_start_up_note_names_what_makes_micro_batches_differ():
  """The defaults give the whole batch's step (no note); batch-wide losses and cross-sequence groups get one line."""
  from moejax.accumulation import microbatch_note

  def note(**fields):
    cfg = common.small_lm()
    config_lib.override(cfg, {**TINY, "train.microbatches": 2, **fields})
    return microbatch_note(cfg)

  assert note() is None and note(**{"train.microbatches": 1, "moe.load_balance_scope": "global_batch"}) is None
  line = note(**{"moe.load_balance_scope": "global_batch", "moe.importance_loss_weight": 0.1})
  assert line.startswith("note: train.microbatches=2: moe.load_balance_scope='global_batch'")
  assert "moe.importance_loss_weight > 0" in line and "\n" not in line
  assert "moe.group_size=32 spans sequences" in note(**{"moe.group_size": 32})
