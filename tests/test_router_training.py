"""A short training run per router, on the embedded data, whose loss falls; causality per router."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax.models import build
from moejax import routers, tasks
from moejax.train import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config_module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


LM_PRESETS = _config_module("lm_routers")
ARCHITECTURE_PRESETS = _config_module("lm_architectures")
VIT_PRESETS = _config_module("vit_digits")
CAUSAL = [p for p in LM_PRESETS.PRESETS if not LM_PRESETS.get_config(p).moe.allow_noncausal and p != "dense"]


def _train(cfg, steps):
  config_lib.validate(cfg, jax.device_count())
  data = tasks.make_data(cfg)
  trainer = Trainer(cfg, tasks.make_task(cfg, data))
  batches = data.train_batches(0)
  return [float(trainer.train_step(next(batches))["cross_entropy"]) for _ in range(steps)]


TINY_LM = {
  "model.num_layers": 2,
  "model.d_model": 32,
  "model.num_heads": 2,
  "model.d_ff": 32,
  "model.moe_every": 1,
  "train.seq_len": 16,
  "train.batch_size": 16,
  "optim.warmup_steps": 2,
  "optim.learning_rate": 1e-2,
  "data.markov.vocab_size": 16,
  "data.markov.num_train": 512,
  "data.markov.num_validation": 32,
}


def _lm_config(data_dir, preset, **extra):
  cfg = LM_PRESETS.get_config(preset)
  moe_every = 0 if preset == "dense" else 1
  config_lib.override(cfg, {**TINY_LM, "model.moe_every": moe_every, "data.data_dir": data_dir, **extra})
  if cfg.moe.d_expert:
    cfg.moe.d_expert = 8  # Fine-grained: a quarter of the tiny d_ff.
  return cfg


@pytest.mark.parametrize("preset", list(LM_PRESETS.PRESETS))
def test_each_lm_preset_trains(preset, data_dir):
  losses = _train(_lm_config(data_dir, preset), steps=25)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses


@pytest.mark.parametrize("preset", list(ARCHITECTURE_PRESETS.PRESETS))
def test_each_architecture_piece_trains(preset, data_dir):
  # MLA and YaRN, multi-token prediction, DeepSeek-V2/V3 routing, sliding windows and sinks.
  cfg = ARCHITECTURE_PRESETS.get_config(preset)
  config_lib.override(cfg, {**TINY_LM, "data.data_dir": data_dir})
  if cfg.moe.d_expert:
    cfg.moe.d_expert = 8
  if cfg.model.sliding_window:
    cfg.model.sliding_window = 4  # Shorter than the tiny 16-token sequences, so that it cuts.
  losses = _train(cfg, steps=25)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses


@pytest.mark.parametrize("preset", list(VIT_PRESETS.PRESETS))
def test_each_vit_preset_trains_on_digits(preset):
  cfg = VIT_PRESETS.get_config(preset)
  config_lib.override(
    cfg,
    {
      "model.num_layers": 2,
      "model.d_model": 32,
      "model.num_heads": 2,
      "model.d_ff": 32,
      "model.patch_size": 4,
      "train.batch_size": 32,
      "optim.warmup_steps": 2,
      "optim.learning_rate": 3e-3,
    },
  )
  if cfg.model.moe_last:
    cfg.model.moe_last = 1
  losses = _train(cfg, steps=25)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses


@pytest.mark.parametrize("preset", CAUSAL)
def test_causal_routers_do_not_leak_the_future(preset, data_dir):
  """Perturb tokens after position t: a causal router's decoder outputs at <= t stay put."""
  cfg = _lm_config(data_dir, preset, **{"moe.capacity_factor": 1.0})  # Tight: experts overflow.
  model_cfg = build.decoder_config(cfg, 16)
  assert routers.get(cfg.moe.router).is_causal(cfg.moe)
  from moejax.models.decoder import DecoderLM

  model = DecoderLM(model_cfg, rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda m, x: m(x, train=True, rng=jax.random.key(5))[0])
  tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 16)
  t = 7
  changed = tokens.at[:, t + 1 :].set(jax.random.randint(jax.random.key(2), (4, 16 - t - 1), 0, 16))
  a, b = forward(model, tokens), forward(model, changed)
  np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-5)


@pytest.mark.parametrize(
  "preset,extra", [("expert_choice", {}), ("soft_moe", {}), ("bpr", {}), ("top2", {"moe.priority": "choice_major"})]
)
def test_noncausal_routers_leak_and_are_refused_in_a_decoder(preset, extra, data_dir):
  cfg = _lm_config(data_dir, preset, **{"moe.capacity_factor": 1.0, "moe.allow_noncausal": False, **extra})
  with pytest.raises(config_lib.ConfigError, match="allow_noncausal"):
    config_lib.validate(cfg, jax.device_count())
  # And they really leak: some output at or before t moves when only later tokens change.
  from moejax.models.decoder import DecoderLM

  model = DecoderLM(build.decoder_config(cfg, 16), rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda m, x: m(x, train=True)[0])
  leaked = False
  for seed in range(4):
    tokens = jax.random.randint(jax.random.key(10 + seed), (4, 16), 0, 16)
    changed = tokens.at[:, 8:].set(jax.random.randint(jax.random.key(20 + seed), (4, 8), 0, 16))
    leaked |= bool(jnp.abs(forward(model, tokens)[:, :8] - forward(model, changed)[:, :8]).max() > 1e-4)
  assert leaked
