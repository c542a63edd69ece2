"""moejax.generate: the sampling rules by hand and by frequency, and generation against the full forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import generate
from moejax.config import base_config, override
from moejax.errors import ConfigError
import hf_reference
from test_decode import CASES, SMALL, VOCAB, _model

LOGITS = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))  # Probabilities by hand, rank: 1, 3, 4, 2, 0.


def _draws(n=4000, **rule):
  keys = jax.random.split(jax.random.key(0), n)
  tokens = jax.vmap(lambda k: generate.sample(LOGITS, k, **rule))(keys)[:, 0]
  return np.bincount(np.asarray(tokens), minlength=5) / n


def test_greedy_is_the_argmax():
  assert int(generate.sample(LOGITS, jax.random.key(0))[0]) == 1
  assert int(generate.sample(LOGITS, jax.random.key(0), temperature=1.0, top_k=1)[0]) == 1
  assert int(generate.sample(LOGITS, jax.random.key(0), temperature=1.0, top_p=0.01)[0]) == 1


def test_temperature_one_draws_the_softmax():
  np.testing.assert_allclose(_draws(temperature=1.0), [0.05, 0.4, 0.1, 0.3, 0.15], atol=0.025)


def test_top_k_keeps_the_k_most_likely_renormalised():
  np.testing.assert_allclose(_draws(temperature=1.0, top_k=2), [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], atol=0.025)


def test_top_p_keeps_the_smallest_set_reaching_p():
  # 0.4 + 0.3 = 0.7 < 0.8, so the third most likely (0.15) joins: {1, 3, 4} of mass 0.85.
  np.testing.assert_allclose(
    _draws(temperature=1.0, top_p=0.8), [0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85], atol=0.025
  )
  # Exactly reached at 0.7: {1, 3}.
  np.testing.assert_allclose(_draws(temperature=1.0, top_p=0.7), [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], atol=0.025)


def test_temperature_sharpens():
  squared = np.array([0.05, 0.4, 0.1, 0.3, 0.15]) ** 2  # softmax(log p / 0.5) = p² normalised.
  np.testing.assert_allclose(_draws(temperature=0.5), squared / squared.sum(), atol=0.02)


def test_greedy_generation_is_the_argmax_of_the_full_forward_each_step():
  """An independent reference: the whole sequence so far through __call__, its last argmax appended."""
  model = _model({"model.num_kv_heads": 2, "model.qk_norm": True})
  prompts = jax.random.randint(jax.random.key(4), (2, 4), 0, VOCAB)
  got = jnp.stack(list(generate.generate(model, prompts, 8)), axis=1)
  call = nnx.jit(lambda m, t: m(t)[0])
  tokens = prompts
  for _ in range(8):
    tokens = jnp.concatenate([tokens, jnp.argmax(call(model, tokens)[:, -1], -1)[:, None].astype(jnp.int32)], 1)
  np.testing.assert_array_equal(got, tokens[:, 4:])


def test_sampling_follows_the_seed():
  model = _model({})
  prompts = jnp.zeros((3, 2), jnp.int32)
  run = lambda seed: np.stack(list(generate.generate(model, prompts, 6, temperature=1.0, seed=seed)), 1)
  np.testing.assert_array_equal(run(7), run(7))
  assert not np.array_equal(run(7), run(8))


@pytest.mark.parametrize(
  "overrides",
  [
    {},  # Dropless top-2.
    {**CASES["mla_deepseek_v3"], "model.mtp_depth": 0},
    CASES["sliding_window_sinks"],
    CASES["learned_positions_tied_hash"],
  ],
  ids=["dropless", "mla_deepseek", "window_sinks", "learned_positions_hash"],
)
def test_prompts_of_different_lengths_in_one_batch_generate_as_alone(overrides):
  """generate() on ragged prompts (one batch, one cache): each row's tokens are those it gets alone,
  greedy, and sampled (row b draws with its own key, whatever the other rows hold)."""
  model = _model(overrides)
  prompts = [[3, 1, 4, 1, 5], [9], [2, 6, 5, 3, 5, 8, 9], [7, 9]]
  for rule in ({}, {"temperature": 1.0, "top_k": 5, "seed": 3}):
    together = np.stack([np.asarray(t) for t in generate.generate(model, prompts, 5, **rule)], 1)
    for b, prompt in enumerate(prompts):
      alone = np.stack([np.asarray(t) for t in generate.generate(model, [prompt], 5, **rule)], 1)
      if rule:  # Row b of a batch draws with fold_in(key, b); alone it is row 0.
        alone = np.stack([np.asarray(t) for t in generate.generate(model, [[0]] * b + [prompt], 5, **rule)], 1)[b:]
      np.testing.assert_array_equal(together[b : b + 1], alone, err_msg=f"prompt {b}, {rule}")


def test_what_generate_refuses():
  """A capacity dispatcher with prompts of different lengths (the padding would change the capacity;
  one length is fine), routing groups across tokens, and a router that is not causal."""
  capacity = _model({"moe.dispatcher": "sort", "moe.eval_capacity_factor": 0.5})
  with pytest.raises(ValueError, match="prompts of different lengths with a capacity dispatcher"):
    next(generate.generate(capacity, [[1, 2, 3], [4]], 2))
  assert len(list(generate.generate(capacity, [[1, 2, 3], [4, 5, 6]], 2))) == 2
  with pytest.raises(ValueError, match="moe.group_size=4"):
    next(generate.generate(_model({"moe.group_size": 4}), [[1, 2, 3, 4]], 2))
  bpr = _model({"moe.dispatcher": "sort", "moe.priority": "bpr", "moe.allow_noncausal": True})
  with pytest.raises(ValueError, match="'top_k' with these options is not causal"):
    next(generate.generate(bpr, [[1, 2, 3, 4]], 2))
  with pytest.raises(ValueError, match=f"0 <= top_k <= {VOCAB}"):
    next(generate.generate(_model({}), [[1]], 2, temperature=1.0, top_k=VOCAB + 1))


@pytest.mark.parametrize(
  "fields, field",
  [
    ({"moe.router": "expert_choice"}, "moe.router"),
    ({"moe.priority": "bpr", "moe.dispatcher": "einsum"}, "moe.priority"),  # Dropless BPR is causal.
  ],
)
def test_non_causal_routers_cannot_generate(fields, field):
  cfg = override(base_config("lm"), {**SMALL, "moe.allow_noncausal": True, **fields})
  with pytest.raises(ConfigError, match=f"{field}: routes each token by the other tokens of its group"):
    generate.check_decodable(cfg)
  generate.check_decodable(override(base_config("lm"), SMALL))  # Top-k token choice: causal.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
  from cli_util import run_cli

  workdir = tmp_path_factory.mktemp("gen") / "run"
  result = run_cli(workdir, "--config.train.num_steps=3", data_dir=data_dir)
  assert result.returncode == 0, result.stderr
  return workdir


def _generate_cli(*args, devices: int = 1):
  import os
  import subprocess
  import sys

  from cli_util import REPO

  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.run(
    [sys.executable, "-m", "moejax.generate", *map(str, args)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )


def test_the_command_line_generates_what_the_run_computes(tiny_run):
  """Greedy tokens from `python -m moejax.generate` on a run's workdir = the argmax loop of the run's
  model as moejax.analysis.load_run restores it (another loader); a batch of prompts of two lengths."""
  from moejax import analysis

  result = _generate_cli("--checkpoint", tiny_run, "--prompt", "1 2 3", "--prompt", "4 5", "--max_new_tokens", "6")
  assert result.returncode == 0, result.stderr[-2000:]
  model = analysis.load_run(str(tiny_run)).model
  call = nnx.jit(lambda m, t: m(t)[0])
  for prompt, line in zip(([1, 2, 3], [4, 5]), result.stdout.strip().splitlines()):
    tokens = jnp.asarray([prompt], jnp.int32)
    for _ in range(6):
      tokens = jnp.concatenate([tokens, jnp.argmax(call(model, tokens)[:, -1], -1)[:, None].astype(jnp.int32)], 1)
    assert line == " ".join(map(str, np.asarray(tokens[0]).tolist()))


def test_the_command_line_on_a_mesh_generates_what_one_device_does(tiny_run, capsys):
  """--mesh_data 2 --mesh_expert 4 (8 fake devices; experts split over 4, three prompts filled up to 8
  rows) prints the one-device greedy tokens, and reads each expert weight split over 'expert'."""
  prompts = ("--prompt", "1 2 3", "--prompt", "4 5", "--prompt", "6 7 8 9 10", "--max_new_tokens", "5")
  assert generate.main(["--checkpoint", str(tiny_run), *prompts]) == 0
  one = capsys.readouterr().out
  assert generate.main(["--checkpoint", str(tiny_run), *prompts, "--mesh_data", "2", "--mesh_expert", "4"]) == 0
  out, err = capsys.readouterr()
  assert out == one and len(one.splitlines()) == 3
  # The run's dispatcher is 'sort': said, once a load; and the donated cache is reused on the mesh.
  assert err.splitlines() == ["note: generating with moe.dispatcher 'sort' -> 'dropless' (no token is dropped)"]
  cfg, model = generate.load_decoder(str(tiny_run), mesh=generate._mesh(2, 4))
  assert cfg.moe.dispatcher == "dropless"  # The run's 'sort' dispatcher: the prefill drops nothing.
  wi = model.blocks[1].ffn.wi[...]
  assert wi.sharding.spec[0] == "expert" and wi.addressable_shards[0].data.shape[0] == 1


@pytest.mark.parametrize(
  "devices, line",
  [
    (8, "error: --mesh_expert: 3 must divide the 4 experts"),
    (2, "error: --mesh_data x --mesh_expert: 1 x 3 devices asked for, 2 present (CPU: XLA_FLAGS="),
  ],
)
def test_a_mesh_that_does_not_fit_is_one_line(tiny_run, devices, line):
  result = _generate_cli("--checkpoint", tiny_run, "--prompt", "1", "--mesh_expert", "3", devices=devices)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(line), result.stderr[-2000:]


@pytest.mark.parametrize(
  "args, line",
  [
    (("--prompt", "1 99"), "error: --prompt: '1 99' holds token 99, outside the vocabulary of 16"),
    (("--prompt", "one"), "error: --prompt: 'one': this model's prompts are token ids"),
    (("--prompt", "1", "--top_p", "0"), "error: --top_p: 0.0 is out of range"),
    ((), "error: --prompt: give at least one"),
    (("--prompt", "1", "--top_k", "17"), "error: --top_k: 17 is more than the vocabulary's 16 tokens"),
    (("--prompt", "1", "--seed", "-1"), "error: --seed: -1 is out of range"),
  ],
)
def test_bad_input_is_one_line(tiny_run, args, line):
  result = _generate_cli("--checkpoint", tiny_run, *args)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(line), result.stderr[-2000:]


@pytest.mark.parametrize(
  "source, vocab, kind", [("text_bytes", 256, "bytes"), ("tfds", 256, "bytes"), ("markov_mixture", 256, "ids")]
)
def test_prompts_are_bytes_for_byte_level_text_data(source, vocab, kind, tmp_path):
  """moejax's own text data (local files, TFDS text) is UTF-8 bytes: prompts and outputs are text."""
  cfg = override(base_config("lm"), {"data.source": source})
  codec = generate._Codec(cfg, str(tmp_path), None, vocab)
  assert codec.kind == kind
  if kind == "bytes":
    assert codec.encode("é!") == [0xC3, 0xA9, 0x21] and codec.decode([0xC3, 0xA9, 0x21]) == "é!"


def test_a_missing_checkpoint_is_one_line(tmp_path):
  result = _generate_cli("--checkpoint", tmp_path / "nothing", "--prompt", "1")
  assert (
    result.returncode == 2
    and result.stderr.strip() == f"error: --checkpoint: '{tmp_path / 'nothing'}' is not a directory"
  )


def _converted_generation(case, tmp_path):
  """(prompts, our greedy tokens for them in one batch, the hf dir) of a converted tiny HF fixture model."""

  from test_convert import _quiet, _write_hf_dir

  from moejax.convert import checkpoints

  meta, state, arrays = hf_reference.load_fixture(case)
  config = meta["config"]
  _write_hf_dir(tmp_path / "hf", config, state)
  without_mtp = bool(config.get("num_nextn_predict_layers"))
  checkpoints.from_hf(str(tmp_path / "hf"), str(tmp_path / "moejax"), without_mtp=without_mtp, say=_quiet)
  prompts = hf_reference.generation_prompts(arrays)
  _, model = generate.load_decoder(str(tmp_path / "moejax"))
  ours = np.stack([np.asarray(t) for t in generate.generate(model, prompts, hf_reference.NEW_TOKENS)], 1)
  return prompts, ours.tolist(), str(tmp_path / "hf")


GENERATION_CASES = list(hf_reference.GENERATION_CASES)


# Where transformers' generate leaves its own model's function: gpt-oss (a sliding window of 4 in
# its even blocks) with the 7-token prompt, longer than the window, where generate's greedy tokens
# differ from the argmax of transformers' own full forward pass from the first token on (found by
# the test below; transformers 5.25, eager attention). Our decoding follows the forward pass.
GENERATE_LEAVES_FORWARD = {("gpt_oss_20b", 2)}


@pytest.mark.parametrize("case", GENERATION_CASES)
def test_greedy_generation_equals_the_recorded_transformers_tokens(case, tmp_path):
  """A converted tiny Hugging Face model generates greedily, with prompts of three lengths in one
  batch, the tokens of transformers' full forward pass argmax for each prompt alone, and those of
  its generate wherever generate agrees with that (tests/fixtures/hf/generation.json, written by
  `python tests/hf_reference.py --generation`; no torch needed)."""
  import json

  with open(f"{hf_reference.FIXTURES}/generation.json") as f:
    recorded = json.load(f)["cases"][case]
  prompts, ours, _ = _converted_generation(case, tmp_path)
  assert prompts == recorded["prompts"]
  assert ours == recorded["forward"]
  differ = {(case, row) for row, (a, b) in enumerate(zip(recorded["generated"], recorded["forward"])) if a != b}
  assert differ == {key for key in GENERATE_LEAVES_FORWARD if key[0] == case}


@pytest.mark.parametrize("case", GENERATION_CASES)
def test_live_greedy_generation_equals_transformers_generate(case, tmp_path):
  """The same against transformers run now: its forward-pass argmax, and its generate but where it
  leaves its forward pass (GENERATE_LEAVES_FORWARD)."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")

  _, ours, hf_dir = _converted_generation(case, tmp_path)
  theirs = hf_reference.generated_by_transformers(case, hf_dir)
  assert ours == theirs["forward"]
  for row, (a, b) in enumerate(zip(ours, theirs["generated"])):
    assert (a == b) == ((case, row) not in GENERATE_LEAVES_FORWARD), (row, a, b)


def test_the_routing_of_decoding_is_captured():
  """analysis.decode_routing: each token's experts as the decoding pass chose them = the full forward's
  decisions (a dropless model: routing is causal), token for token."""
  from moejax import analysis

  model = _model({"moe.router": "deepseek", "moe.num_experts": 8, "moe.top_k": 2, "moe.num_shared_experts": 1})
  prompts = jax.random.randint(jax.random.key(5), (2, 4), 0, VOCAB)
  new = jnp.stack(list(generate.generate(model, prompts, 5)), axis=1)
  tokens = jnp.concatenate([prompts, new], axis=1)
  decoded = analysis.decode_routing(model, tokens, prompt_length=4)
  full = analysis.routing_decisions(model, tokens)
  assert len(decoded) == len(full) == 1  # Block 1 is the MoE block.
  np.testing.assert_array_equal(decoded[0]["expert_index"], np.asarray(full[0].expert_index).reshape(2, 9, 2))
  np.testing.assert_allclose(
    decoded[0]["combine_weight"], np.asarray(full[0].combine_weight).reshape(2, 9, 2), atol=1e-6
  )
  assert decoded[0]["kept"].all()
