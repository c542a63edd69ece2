"""A short training run per router, on the embedded data, whose loss falls; causality per router."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax import routers, tasks
from moejax.train import Trainer

LM_ROUTERS = {
    "top_k": {},
    "top_k_noisy": dict(router_noise="noisy_top_k", load_loss_weight=0.01, importance_loss_weight=0.01),
    "gshard_random": dict(second_expert_policy="random", combine_weights="renormalized", router_noise="jitter"),
    "hash": dict(router="hash"),
    "dense": dict(router="dense"),
    "deepseek": dict(router="deepseek", score_function="sigmoid", combine_weights="renormalized",
                     num_expert_groups=2, top_expert_groups=1, num_shared_experts=1, num_experts=8, top_k=2,
                     d_expert=16),
    "dropless": dict(dispatcher="dropless"),
    "expert_choice_noncausal": dict(router="expert_choice", allow_noncausal=True, capacity_factor=2.0),
    "soft_moe_noncausal": dict(router="soft_moe", allow_noncausal=True),
}
VIT_ROUTERS = {
    "expert_choice": dict(router="expert_choice", capacity_factor=2.0),
    "soft_moe": dict(router="soft_moe", slots_per_expert=2),
    "soft_moe_unnormalized": dict(router="soft_moe", soft_normalize=False),
    "top_k_bpr": dict(router="top_k", priority="bpr"),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _train(cfg, steps):
  config_lib.validate(cfg, jax.device_count())
  data = tasks.make_data(cfg)
  trainer = Trainer(cfg, tasks.make_task(cfg, data))
  batches = data.train_batches(0)
  return [float(trainer.train_step(next(batches))["cross_entropy"]) for _ in range(steps)]


def _lm_config(data_dir, moe):
  cfg = config_lib.base_config("lm")
  cfg.model.update(num_layers=2, d_model=32, num_heads=2, d_ff=32, moe_every=1)
  cfg.moe.update(num_experts=4, top_k=2)
  cfg.moe.update(moe)
  cfg.train.update(seq_len=16, batch_size=16)
  cfg.optim.update(warmup_steps=2, learning_rate=1e-2)
  cfg.data.update(data_dir=data_dir)
  cfg.data.markov.update(vocab_size=16, num_train=512, num_validation=32)
  return cfg


@pytest.mark.parametrize("name", list(LM_ROUTERS))
def test_each_router_trains_a_language_model(name, data_dir):
  losses = _train(_lm_config(data_dir, LM_ROUTERS[name]), steps=25)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses


@pytest.mark.parametrize("name", list(VIT_ROUTERS))
def test_each_router_trains_a_vit_on_digits(name):
  cfg = config_lib.base_config("vit")
  cfg.model.update(num_layers=2, d_model=32, num_heads=2, d_ff=32, patch_size=4, moe_every=1)
  cfg.moe.update(num_experts=4, top_k=2)
  cfg.moe.update(VIT_ROUTERS[name])
  cfg.train.update(batch_size=32)
  cfg.optim.update(warmup_steps=2, learning_rate=3e-3)
  losses = _train(cfg, steps=25)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses


CAUSAL = {k: v for k, v in LM_ROUTERS.items() if "noncausal" not in k}


@pytest.mark.parametrize("name", list(CAUSAL))
def test_causal_routers_do_not_leak_the_future(name, data_dir):
  """Perturb tokens after position t: a causal router's decoder outputs at <= t stay put."""
  cfg = _lm_config(data_dir, {**CAUSAL[name], "capacity_factor": 1.0})  # Tight: experts overflow.
  model_cfg = config_lib.decoder_config(cfg, 16)
  assert routers.is_causal(cfg.moe.router, cfg.moe.top_k, cfg.moe.priority, cfg.moe.dispatcher)
  from moejax.models.decoder import DecoderLM
  model = DecoderLM(model_cfg, rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda m, x: m(x, train=True, rng=jax.random.key(5))[0])
  tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 16)
  t = 7
  changed = tokens.at[:, t + 1:].set(jax.random.randint(jax.random.key(2), (4, 16 - t - 1), 0, 16))
  a, b = forward(model, tokens), forward(model, changed)
  np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-5)


@pytest.mark.parametrize("moe", [dict(router="expert_choice"), dict(router="soft_moe"),
                                 dict(priority="bpr"), dict(priority="choice_major")])
def test_noncausal_routers_leak_and_are_refused_in_a_decoder(moe, data_dir):
  cfg = _lm_config(data_dir, {**moe, "capacity_factor": 1.0})
  with pytest.raises(config_lib.ConfigError, match="allow_noncausal"):
    config_lib.validate(cfg, jax.device_count())
  # And they really leak: some output at or before t moves when only later tokens change.
  from moejax.models.decoder import DecoderLM
  model = DecoderLM(config_lib.decoder_config(cfg, 16), rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda m, x: m(x, train=True)[0])
  leaked = False
  for seed in range(4):
    tokens = jax.random.randint(jax.random.key(10 + seed), (4, 16), 0, 16)
    changed = tokens.at[:, 8:].set(jax.random.randint(jax.random.key(20 + seed), (4, 8), 0, 16))
    leaked |= bool(jnp.abs(forward(model, tokens)[:, :8] - forward(model, changed)[:, :8]).max() > 1e-4)
  assert leaked
