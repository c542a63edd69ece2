"""Looking inside a trained MoE model: which tokens each expert takes.

  run = analysis.load_run(workdir)                              # config.json + newest checkpoint
  decisions = analysis.routing_decisions(run.model, inputs)     # one per MoE layer, eval mode
  counts = analysis.assignment_counts(decisions, labels, n)     # [layers, n labels, E]
  analysis.mutual_information(counts)                           # bits of I(label; expert) per layer

Labels are whatever the question is about: `byte_classes` of byte-level text (letters, digits,
whitespace, ...), or the generating source of each sequence of the synthetic Markov mixture
(`markov_sequences`, which draws fresh sequences of a run's mixture together with their sources).
`notebooks/results_explorer.ipynb` asks the "what do experts learn" question with these.

Legend: B batch, L sequence length, G groups, S tokens per group, E experts, K choices per token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import routing

# Classes of a byte, in order; `byte_classes` returns indices into this tuple.
BYTE_CLASSES = (
  "lowercase",
  "uppercase",
  "digit",
  "space/tab",
  "newline",
  "bracket/quote",
  "operator/punct",
  "non-ASCII/control",
)
_BRACKETS_QUOTES = set(b"()[]{}<>'\"`")


@dataclasses.dataclass
class Run:
  """A trained run, restored on this process's devices.

  Attributes:
    cfg: the run's config (from its config.json).
    model: the model with the restored parameters (DecoderLM or ViT).
    step: the training step of the restored checkpoint.
    data: the run's dataset (`tasks.make_data`): eval batches, vocabulary, ...
  """

  cfg: Any
  model: nnx.Module
  step: int
  data: Any


def load_run(workdir: str, step: int | None = None) -> Run:
  """Rebuilds a run's model from <workdir>/config.json and restores a checkpoint (read-only).

  The model is built on a one-device mesh whatever mesh the run trained on (checkpoints restore
  across meshes). `step`: which checkpoint (default the newest).

  Raises:
    FileNotFoundError: no config.json, or no checkpoint (e.g. an experiment's committed results,
      which keep metrics but not checkpoints: re-run it to get them).
  """
  import ml_collections
  import orbax.checkpoint as ocp

  from moejax import tasks, train

  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{workdir} holds no config.json: not a moejax workdir")
  with open(config_path) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # orbax warns that a read-only manager will not save
  try:
    manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")), options=ocp.CheckpointManagerOptions(read_only=True)
    )
  finally:
    absl_logger.setLevel(level)
  try:
    steps = manager.all_steps()
    if not steps or (step is not None and step not in steps):
      raise FileNotFoundError(
        f"{workdir} holds no checkpoint" + (f" of step {step} (it has {sorted(steps)})" if steps else "")
      )
    step = max(steps) if step is None else step
    cfg.mesh.data, cfg.mesh.expert, cfg.mesh.model, cfg.mesh.fsdp = 1, 1, 1, False
    data = tasks.make_data(cfg)
    trainer = train.Trainer(cfg, tasks.make_task(cfg, data), initialize=False)
    state = manager.restore(step, args=ocp.args.StandardRestore(trainer.abstract_state))
  finally:
    manager.close()
  model = trainer.model(state)  # LoRA adapters merged.
  return Run(cfg=cfg, model=model, step=int(step), data=data)


@nnx.jit
def _captured_forward(model, inputs):
  """The nnx.Intermediate values the capturing layers sow during an eval forward pass."""
  # A DecoderLM's `forward` also runs its multi-token-prediction modules, whose MoE layers moe_layers() lists.
  _, captured = nnx.capture(lambda m, x: getattr(m, "forward", m)(x, train=False), nnx.Intermediate)(model, inputs)
  return captured


def routing_decisions(model: nnx.Module, inputs) -> list:
  """The eval-mode routing decision of each MoE layer of `model` on `inputs`, in block order.

  Args:
    model: a DecoderLM or ViT (anything with `moe_layers()` whose forward takes `train=False`).
    inputs: what the model takes: <int32>[B, L] tokens, or images.

  Returns:
    One `routing.RoutingDecision` ([G, S, K] fields) or `routing.SoftRoutingDecision` per MoE
    layer, as numpy arrays; groups are the layer's tokens in row-major order, so
    `x.reshape(G, S, ...)` of a per-token array x of shape [B, L, ...] lines up with them.
  """
  layers = model.moe_layers()
  path_of = {id(node): path for path, node in nnx.iter_graph(model)}
  for layer in layers:
    layer.capture_routing = True
  try:
    captured = dict(nnx.to_flat_state(_captured_forward(model, inputs)))
  finally:
    for layer in layers:
      layer.capture_routing = False
  return [jax.device_get(captured[(*path_of[id(layer)], "routing")].get_value()[0]) for layer in layers]


@nnx.jit
def _captured_decode(model, tokens, cache, start):
  (_, cache), captured = nnx.capture(lambda m, t, c, s: m.decode(t, c, s), nnx.Intermediate)(
    model, tokens, cache, start
  )
  return cache, captured


def decode_routing(model, tokens, prompt_length: int) -> list[dict[str, np.ndarray]]:
  """Which experts each token used when decoded: the prompt as one prefill, then each later token alone.

  tokens <int32>[B, L] (e.g. prompts and what `moejax.generate.generate` drew after them); the
  decisions are those of `DecoderLM.decode`, the pass that generated them (routing is causal: the
  same as `routing_decisions` on the whole sequence for a dropless model). Returns one dict per
  MoE block, in block order: 'expert_index' <int32>[B, L, K] (best first), 'combine_weight'
  <float32>[B, L, K] and 'kept' <bool>[B, L, K].
  """
  tokens = np.asarray(tokens)
  batch, length = tokens.shape
  layers = [block.ffn for block in model.blocks if block.ffn in model.moe_layers()]
  path_of = {id(node): path for path, node in nnx.iter_graph(model)}
  cache = model.init_cache(batch, length)
  steps = [(0, prompt_length)] + [(i, i + 1) for i in range(prompt_length, length)]
  per_layer = [{"expert_index": [], "combine_weight": [], "kept": []} for _ in layers]
  for layer in layers:
    layer.capture_routing = True
  try:
    for begin, end in steps:
      cache, captured = _captured_decode(model, jnp.asarray(tokens[:, begin:end]), cache, jnp.int32(begin))
      captured = dict(nnx.to_flat_state(captured))
      for out, layer in zip(per_layer, layers):
        decision = jax.device_get(captured[(*path_of[id(layer)], "routing")].get_value()[0])
        for name in out:
          out[name].append(np.asarray(getattr(decision, name)).reshape(batch, end - begin, -1))
  finally:
    for layer in layers:
      layer.capture_routing = False
  return [{name: np.concatenate(parts, axis=1) for name, parts in out.items()} for out in per_layer]


def expert_mass(decision, choices: str = "first") -> np.ndarray:
  """<float32>[G·S, E]: how much of each token each expert takes.

  RoutingDecision: 1 for each kept choice ('first': only the token's best kept choice; 'all':
  every kept choice, so a top-2 token counts twice and an expert-choice token as often as it
  was picked). SoftRoutingDecision: the token's dispatch weight into each expert's slots (the
  share of those slots' input that comes from the token).
  """
  if choices not in ("first", "all"):
    raise ValueError(f"choices must be 'first' or 'all', got {choices!r}")
  if isinstance(decision, routing.SoftRoutingDecision):
    weights = np.asarray(decision.dispatch_weights).sum(-1)  # [G, S, E]
    return weights.reshape(-1, weights.shape[-1])
  expert = np.asarray(decision.expert_index).reshape(-1, decision.expert_index.shape[-1])  # [G·S, K]
  kept = np.asarray(decision.kept).reshape(expert.shape)
  if choices == "first":  # Choices are best first: keep the first kept one of each token.
    kept = kept & (np.cumsum(kept, axis=1) == 1)
  mass = np.zeros((expert.shape[0], decision.num_experts), np.float32)
  rows = np.broadcast_to(np.arange(expert.shape[0])[:, None], expert.shape)
  np.add.at(mass, (rows[kept], expert[kept]), 1.0)
  return mass


def assignment_counts(decisions: Sequence, labels, num_labels: int, choices: str = "first") -> np.ndarray:
  """<float64>[layers, num_labels, E]: expert mass (`expert_mass`) summed over tokens of each label.

  labels: <int>[B, L] (or any shape with one entry per token, in the inputs' order), values in
  [0, num_labels). Dropped tokens count for no expert.
  """
  labels = np.asarray(labels).reshape(-1)
  if labels.min() < 0 or labels.max() >= num_labels:
    raise ValueError(f"labels must lie in [0, {num_labels}), got [{labels.min()}, {labels.max()}]")
  out = []
  for decision in decisions:
    mass = expert_mass(decision, choices)
    if mass.shape[0] != labels.size:
      raise ValueError(f"{labels.size} labels for {mass.shape[0]} routed tokens")
    counts = np.zeros((num_labels, mass.shape[1]))
    np.add.at(counts, labels, mass)
    out.append(counts)
  return np.stack(out)


def mutual_information(counts: np.ndarray) -> np.ndarray:
  """Bits of I(label; expert) of joint count tables <[..., num_labels, E]> -> <[...]>.

  0 when experts take every label in the same proportions; at most min(log2 labels, log2 E); nan
  for an empty table (every token dropped).
  """
  total = counts.sum(axis=(-2, -1), keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    joint = counts / total
    outer = joint.sum(-1, keepdims=True) * joint.sum(-2, keepdims=True)
    terms = np.where(joint > 0, joint * np.log2(joint / outer), 0.0)
  return np.where(total[..., 0, 0] > 0, terms.sum(axis=(-2, -1)), np.nan)


def byte_classes(tokens) -> np.ndarray:
  """<int32>[...]: the index in BYTE_CLASSES of each byte value in [0, 256) of `tokens`."""
  tokens = np.asarray(tokens)
  table = np.full(256, BYTE_CLASSES.index("non-ASCII/control"), np.int32)
  for b in range(256):
    c = chr(b)
    if b >= 128:
      continue
    if c.islower():
      table[b] = 0
    elif c.isupper():
      table[b] = 1
    elif c.isdigit():
      table[b] = 2
    elif c in " \t":
      table[b] = 3
    elif c in "\n\r":
      table[b] = 4
    elif b in _BRACKETS_QUOTES:
      table[b] = 5
    elif 33 <= b < 127:
      table[b] = 6
  return table[tokens]


def markov_sequences(cfg, num_sequences: int, seed: int = 12345) -> tuple[np.ndarray, np.ndarray]:
  """Fresh sequences of a run's Markov mixture with their sources: (<int32>[N, L] inputs, <int32>[N]).

  cfg: the run's config (data.source 'markov_mixture'); L = train.seq_len. The seed is the
  samples' own, apart from the training and eval data's.
  """
  from moejax.data import markov

  m = cfg.data.markov
  mixture = markov.MarkovMixture(vocab_size=m.vocab_size, num_sources=m.num_sources, branching=m.branching, seed=m.seed)
  tokens, sources = mixture.sample(num_sequences, cfg.train.seq_len, seed=[seed, 99])
  return tokens, sources
