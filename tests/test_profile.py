"""Profiles (train.profile_start/profile_steps): a jax.profiler trace of the chosen steps, and the MoE
layer's named scopes (router, dispatch, experts, combine, all_to_all) in the compiled program."""

from __future__ import annotations

import glob
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from cli_util import run_cli
from moejax.config import base_config, override
from moejax.models.build import decoder_config
from moejax.models.decoder import DecoderLM
from moejax.parallel import make_mesh

SCOPES = ("router", "dispatch", "experts", "combine", "all_to_all")


@pytest.mark.parametrize("dispatcher", ["dropless", "sort"])
def test_the_moe_layer_parts_are_named_scopes(dispatcher):
  """In the lowered gradient of an expert-parallel decoder (data 2 × expert 2), each part's operations
  carry its scope, and the all_to_all exchanges sit in the all_to_all scope."""
  cfg = override(
    base_config("lm"),
    {
      "model.num_layers": 2,
      "model.d_model": 32,
      "model.num_heads": 2,
      "model.d_ff": 32,
      "moe.num_experts": 4,
      "train.seq_len": 8,
      "moe.dispatcher": dispatcher,
      "moe.expert_exchange": "padded",
    },
  )
  graphdef, state = nnx.split(DecoderLM(decoder_config(cfg, 16), mesh=make_mesh(2, 2), rngs=nnx.Rngs(0)))
  loss = lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0].sum()
  text = jax.jit(jax.grad(loss)).lower(state, jnp.zeros((4, 8), jnp.int32)).as_text(debug_info=True)
  for scope in SCOPES:
    assert re.search(rf'loc\("(?:[^"]*/)?{scope}/', text), scope
  assert re.search(r'loc\("(?:[^"]*/)?all_to_all/[^"]*all_to_all', text)  # The exchange op itself.


def test_the_chosen_steps_are_traced(tmp_path, data_dir):
  workdir = tmp_path / "run"
  result = run_cli(
    workdir,
    "--config.train.num_steps=4",
    "--config.train.profile_start=2",
    "--config.train.profile_steps=2",
    data_dir=data_dir,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  traces = glob.glob(str(workdir / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1, traces
  with open(traces[0], "rb") as f:
    trace = f.read()
  assert b"train_step" in trace and b"router/" in trace  # The jitted step and the MoE layer's scope.


def test_a_profile_past_the_run_is_refused(tmp_path, data_dir):
  result = run_cli(
    tmp_path / "run",
    "--config.train.num_steps=4",
    "--config.train.profile_start=3",
    "--config.train.profile_steps=3",
    data_dir=data_dir,
  )
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and lines == [
    "error: config train.profile_start: profiles steps 3..5, past train.num_steps = 4"
  ], result.stderr[-2000:]
