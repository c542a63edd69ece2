"""Fine-tuning controls: frozen groups and patterns get no update at all (optim.freeze, freeze_patterns)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx

from cli_util import run_cli
from moejax import config as config_lib
from moejax import finetune, tasks
from moejax.config import common
from moejax.errors import ConfigError
from moejax.train import Trainer

TINY = {
  "model.num_layers": 2,
  "model.d_model": 32,
  "model.num_heads": 2,
  "model.d_ff": 32,
  "model.moe_every": 2,
  "model.activation": "swiglu",
  "moe.num_experts": 4,
  "moe.num_shared_experts": 1,
  "moe.router": "deepseek",
  "moe.load_balance_density": "topk",
  "train.seq_len": 16,
  "train.batch_size": 8,
  "optim.warmup_steps": 1,
  "optim.learning_rate": 1e-2,
  "data.markov.vocab_size": 16,
  "data.markov.num_train": 256,
  "data.markov.num_validation": 16,
}


def _trainer(data_dir, **fields):
  cfg = common.small_lm()
  config_lib.override(cfg, {**TINY, "data.data_dir": data_dir, **fields})
  config_lib.validate(cfg, jax.device_count())
  data = tasks.make_data(cfg)
  return Trainer(cfg, tasks.make_task(cfg, data)), data


def _params(trainer):
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(trainer.state["params"])}


def test_groups_by_hand():
  """Which group each parameter of a tiny DeepSeek-style decoder falls in (dense block 0, MoE block 1)."""
  cfg = common.small_lm()
  config_lib.override(cfg, TINY)
  from moejax.models import build
  from moejax.models.decoder import DecoderLM

  model = nnx.eval_shape(lambda: DecoderLM(build.decoder_config(cfg, 16), rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  groups = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = finetune._names(path)
    groups[".".join(names)] = {g for g in finetune.GROUPS if finetune.in_group(g, names, len(leaf.shape))}
  assert groups["blocks.1.ffn.wi"] == {"experts"}  # [E, d, f]
  assert groups["blocks.1.ffn.shared.wi"] == {"experts"}  # The shared expert is an expert too.
  assert groups["blocks.0.ffn.wi"] == {"non_experts"}  # Block 0's dense FFN.
  assert groups["blocks.1.ffn.router.kernel"] == {"router", "non_experts"}
  assert groups["blocks.0.attention.wqkv"] == {"attention", "non_experts"}
  assert groups["embed.embedding"] == {"embeddings", "non_experts"}
  assert groups["final_norm.scale"] == {"non_experts"}


@pytest.mark.parametrize(
  "freeze, patterns",
  [(("experts",), ()), (("non_experts",), ()), (("router", "attention"), ()), ((), (r"blocks\.0\..*",))],
)
def test_frozen_parameters_are_bit_identical_after_training(freeze, patterns, data_dir):
  trainer, data = _trainer(data_dir, **{"optim.freeze": freeze, "optim.freeze_patterns": patterns})
  before = _params(trainer)
  labels = {
    ".".join(finetune._names(p)): label for p, label in jax.tree_util.tree_flatten_with_path(trainer.param_labels)[0]
  }
  batches = data.train_batches(0)
  for _ in range(5):
    trainer.train_step(next(batches))
  after = _params(trainer)
  frozen = [n for n, label in labels.items() if label == "frozen"]
  trained = [n for n, label in labels.items() if label == "train"]
  assert frozen and trained
  for name in frozen:
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  moved = [n for n in trained if not np.array_equal(after[n], before[n])]
  assert len(moved) >= len(trained) - 2, sorted(set(trained) - set(moved))  # (a norm scale may stay put)
  # The frozen parameters hold no optimizer state: AdamW's moments cover the trained ones only.
  moments = sum(x.size for x in jax.tree.leaves(trainer.state["opt_state"]) if x.ndim)
  assert moments == 2 * sum(after[n].size for n in trained) == 2 * trainer.trained_params()


def test_a_freeze_that_matches_nothing_is_refused(data_dir, tmp_path):
  with pytest.raises(ConfigError, match=re.escape("optim.freeze_patterns: 'decoder\\..*' matches no parameter")):
    _trainer(data_dir, **{"optim.freeze_patterns": (r"decoder\..*",)})
  from cli_util import TINY

  dense = [flag for flag in TINY if not flag.startswith("--config.moe.")]  # A dense model reads no moe field.
  result = run_cli(
    tmp_path / "w",
    *dense,
    "--config.optim.freeze=('router',)",
    "--config.model.moe_every=0",
    data_dir=data_dir,
    tiny=False,
  )
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and lines == ["error: config optim.freeze: 'router' matches no parameter of this model"]
  assert not (tmp_path / "w").exists()
  result = run_cli(tmp_path / "w", "--config.optim.freeze=('decoder',)", data_dir=data_dir)
  lines = result.stderr.strip().splitlines()
  assert (
    result.returncode == 2
    and len(lines) == 1
    and lines[0].startswith("error: config optim.freeze: 'decoder' is not a group")
  )
