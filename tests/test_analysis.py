"""moejax.analysis: which tokens each expert takes, checked by hand and against the layer itself."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import framework
from moejax import analysis, routing
from moejax.data import markov
from moejax.layers.moe import MoEConfig
from moejax.parallel import make_mesh
from moejax.models.decoder import DecoderConfig, DecoderLM


def test_expert_mass_and_counts_by_hand():
  # 1 group of 4 tokens, top-2 over 3 experts, one slot each: token-major queues.
  # token 0 -> e0 (slot 0), e1 (slot 0); token 1 -> e0 (full: dropped), e2 (slot 0);
  # token 2 -> e1 (full), e2 (full): no expert; token 3 -> e2 (full), e0 (full).
  expert_index = jnp.array([[[0, 1], [0, 2], [1, 2], [2, 0]]])
  decision = routing.route_choices(
    expert_index, jnp.full((1, 4, 2), 0.5), num_experts=3, capacity=1, priority="token_major"
  )
  np.testing.assert_array_equal(decision.kept[0], [[True, True], [False, True], [False, False], [False, False]])
  first = analysis.expert_mass(decision, "first")
  np.testing.assert_array_equal(first, [[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]])  # token 1: its kept 2nd choice
  every = analysis.expert_mass(decision, "all")
  np.testing.assert_array_equal(every, [[1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]])
  labels = np.array([[0, 1, 1, 0]])
  counts = analysis.assignment_counts([decision, decision], labels, 2, choices="all")
  assert counts.shape == (2, 2, 3)
  np.testing.assert_array_equal(counts[0], [[1, 1, 0], [0, 0, 1]])
  with pytest.raises(ValueError, match="labels must lie in"):
    analysis.assignment_counts([decision], labels + 1, 2)


def test_mutual_information():
  assert analysis.mutual_information(np.eye(2) * 50) == pytest.approx(1.0)  # the expert names the label
  assert analysis.mutual_information(np.ones((3, 4))) == pytest.approx(0.0, abs=1e-12)
  assert analysis.mutual_information(np.outer([1, 2, 3], [4, 1])) == pytest.approx(0.0, abs=1e-12)
  table = np.random.default_rng(0).integers(0, 20, (2, 5, 4)).astype(float)
  joint = table / table.sum(axis=(1, 2), keepdims=True)
  entropy = lambda p: -np.sum(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0), axis=tuple(range(1, p.ndim)))
  expected = entropy(joint.sum(2)) + entropy(joint.sum(1)) - entropy(joint)  # H(X) + H(Y) - H(X, Y)
  np.testing.assert_allclose(analysis.mutual_information(table), expected, rtol=1e-10)


def test_byte_classes():
  text = b'aZ3 \n(+\xff\x00\t"}_'
  names = [analysis.BYTE_CLASSES[c] for c in analysis.byte_classes(np.frombuffer(text, np.uint8))]
  assert names == [
    "lowercase",
    "uppercase",
    "digit",
    "space/tab",
    "newline",
    "bracket/quote",
    "operator/punct",
    "non-ASCII/control",
    "non-ASCII/control",
    "space/tab",
    "bracket/quote",
    "bracket/quote",
    "operator/punct",
  ]


def _model(router: str, mesh=None):
  moe_cfg = MoEConfig(num_experts=4, top_k=2, d_expert=16, capacity_factor=1.0, eval_capacity_factor=1.0, router=router)
  cfg = DecoderConfig(
    vocab_size=32, num_layers=2, d_model=16, num_heads=2, d_ff=32, max_len=8, moe_every=1, moe=moe_cfg
  )
  return DecoderLM(cfg, mesh=mesh, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
  "router,mesh_shape", [("top_k", (1, 1)), ("top_k", (2, 4)), ("expert_choice", (1, 1)), ("soft_moe", (1, 1))]
)
def test_routing_decisions_are_what_the_layer_routes(router, mesh_shape):
  model = _model(router, mesh=make_mesh(*mesh_shape))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 32, (8, 8)), jnp.int32)
  decisions = analysis.routing_decisions(model, tokens)
  _, aux = nnx.jit(lambda m, x: m(x, train=False))(model, tokens)
  assert len(decisions) == len(aux) == 2
  for layer, (decision, layer_aux) in enumerate(zip(decisions, aux)):
    mass = analysis.expert_mass(decision, "all")  # [tokens, E]
    assert mass.shape == (64, 4)
    if router == "soft_moe":  # Each slot's dispatch weights sum to 1 over its group's tokens: 8 groups.
      np.testing.assert_allclose(mass.sum(0), 8.0, rtol=1e-5)
    else:  # The layer's own load statistic, computed inside shard_map, from the same decisions.
      np.testing.assert_allclose(mass.sum(0) / mass.sum(), layer_aux["expert_load"], rtol=1e-5, atol=1e-7)
  assert not model.moe_layers()[0].capture_routing
  with pytest.raises(ValueError, match="train=False"):
    model.moe_layers()[0].capture_routing = True
    try:
      model(tokens, train=True)
    finally:
      model.moe_layers()[0].capture_routing = False


def test_captured_decisions_line_up_with_the_tokens():
  # The hash router's expert is a function of the token id alone: token by token, on a 2×4 mesh.
  cfg = DecoderConfig(
    vocab_size=32,
    num_layers=1,
    d_model=16,
    num_heads=2,
    d_ff=32,
    max_len=8,
    moe_every=1,
    moe=MoEConfig(
      num_experts=4, top_k=1, d_expert=16, router="hash", group_size=4, capacity_factor=4.0, eval_capacity_factor=4.0
    ),
  )
  model = DecoderLM(cfg, mesh=make_mesh(2, 4), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 32, (8, 8)), jnp.int32)
  (decision,) = analysis.routing_decisions(model, tokens)
  assert decision.expert_index.shape == (16, 4, 1)  # 16 groups of 4 tokens
  np.testing.assert_array_equal(
    analysis.expert_mass(decision).argmax(-1), np.asarray(routing.hash_experts(tokens, 4)).reshape(-1)
  )
  counts = analysis.assignment_counts([decision], tokens, 32)[0]  # [token id, E]: one expert per id
  assert np.all((counts > 0).sum(-1) <= 1)
  assert analysis.mutual_information(np.zeros((3, 4))) != analysis.mutual_information(np.zeros((3, 4)))  # nan


def test_load_run_restores_the_trained_model(tmp_path, monkeypatch):
  monkeypatch.setenv("MOEJAX_DATA_DIR", str(tmp_path / "tfds"))
  cfg = framework.run_config(
    framework.Experiment("t", "t", (), {}), framework.Variant("moe", "configs/quickstart.py"), "smoke", seed=0
  )
  workdir = tmp_path / "run"
  with pytest.raises(FileNotFoundError, match="no config.json"):
    analysis.load_run(str(workdir))
  assert framework.train_run(cfg, str(workdir)) == "trained"
  with pytest.raises(FileNotFoundError, match="no checkpoint of step 1"):
    analysis.load_run(str(workdir), step=1)
  run = analysis.load_run(str(workdir))
  summary = json.loads((workdir / "summary.json").read_text())
  assert run.step == summary["step"] == cfg.train.num_steps
  # The restored model reproduces the run's own eval loss.
  losses = []
  forward = nnx.jit(lambda m, x: m(x, train=False)[0])
  for batch in run.data.eval_batches():
    logits = forward(run.model, jnp.asarray(batch["inputs"]))
    logp = jax.nn.log_softmax(logits)
    losses.append(-np.mean(np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)))
  assert np.mean(losses) == pytest.approx(summary["eval_cross_entropy"], rel=1e-5)
  # Fresh sequences of the run's mixture follow their own source's transitions.
  tokens, sources = analysis.markov_sequences(run.cfg, 16)
  assert tokens.shape == (16, cfg.train.seq_len) and sources.shape == (16,)
  m = cfg.data.markov
  _, successors, _ = markov.MarkovMixture(m.vocab_size, m.num_sources, m.branching, m.seed)._params
  for seq, source in zip(tokens, sources):
    assert all(b in successors[source, a] for a, b in zip(seq[:-1], seq[1:]))
