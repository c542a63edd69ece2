"""Text generation with the KV cache: sampling rules and the decoding loop (issue #15).

`sample` draws the next token from logits: greedy (temperature 0), or from softmax(logits / T)
restricted to the top_k most likely tokens and to the smallest set whose probability reaches
top_p (nucleus sampling, Holtzman et al. 2020), both applied when both are set. `generate`
prefills the prompts into a fixed-size cache (`DecoderLM.decode`) and decodes one token at a time,
yielding each new column of tokens as it is drawn (streaming); row b's draw of step i uses
fold_in(fold_in(key(seed), i), b), so a seed gives the same text on every run. Prompts of
different lengths share one batch and one cache (`pad_prompts`).

Decoding runs the main model (no multi-token-prediction modules) in eval mode. Routers must be
causal as their family declares (`is_causal` in moejax/routers/; `check_decodable`): expert
choice and soft MoE see the other tokens of their group, which a decoder does not have yet.
`load_decoder` runs token-choice routers dropless, where no slot order by later tokens remains
(BPR and choice-major top-k included); a model built with capacity slots ordered by later
tokens is refused by `check_decodable`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import parallel
from moejax.errors import ConfigError


def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """The next token <int32>[B] of logits <float32>[B, V].

  temperature 0: the most likely token (ties: the lowest id). Otherwise a draw from
  softmax(logits / temperature), after keeping only the top_k largest logits (0: all) and the
  smallest set of most likely tokens whose probability sums to at least top_p (1: all; the most
  likely token is always kept).
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]  # [B, 1]: the k-th largest logit.
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]  # Descending.
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # Probability of the tokens ranked above each.
    cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_decodable(cfg) -> None:
  """ConfigError unless the model's routers decide each token from it and the tokens before it."""
  from moejax import routers
  from moejax.config import schema

  if not schema.has_moe_layers(cfg):
    return
  family = routers.get(cfg.moe.router)
  if not family.is_causal(cfg.moe):  # The family says (moejax/routers/): expert choice, soft MoE, BPR priority.
    field = "moe.priority" if "priority" in {o.name for o in family.options} else "moe.router"
    raise ConfigError(
      field, "routes each token by the other tokens of its group, which a decoder has not seen yet; it cannot generate"
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_k", "top_p"), donate_argnames="cache")
def _next_tokens(graphdef, state, tokens, cache, start, last, key, step, **rule):
  """(the drawn tokens <int32>[B], the cache): `DecoderLM.decode`, then `_draw_rows` of each row's logits at `last`.

  One jitted call a step: the model split once (no per-call graph traversal), the cache donated
  (written in place, not copied).
  """
  logits, cache = nnx.merge(graphdef, state).decode(tokens, cache, start, last)
  return _draw_rows(logits[:, 0], jax.random.fold_in(key, step), **rule), cache


def pad_prompts(prompts) -> tuple[jax.Array, jax.Array]:
  """(tokens <int32>[B, P], lengths <int32>[B]) of prompts: an int array [B, P] (every row P long) or a
  list of token-id lists of any lengths, right-padded with 0 to the longest (P)."""
  if hasattr(prompts, "shape"):
    tokens = jnp.asarray(prompts, jnp.int32)
    if tokens.ndim != 2:
      raise ValueError(f"prompts must be [B, P] token ids, got shape {tokens.shape}")
    return tokens, jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
  rows = [list(p) for p in prompts]
  if not rows:
    raise ValueError("no prompts")
  longest = max(map(len, rows))
  tokens = jnp.asarray([r + [0] * (longest - len(r)) for r in rows], jnp.int32)
  return tokens, jnp.asarray([len(r) for r in rows], jnp.int32)


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def _draw_rows(logits: jax.Array, key: jax.Array, **rule) -> jax.Array:
  """`sample` of each row of logits [B, V] with its own key fold_in(key, b) (independent of the other rows)."""
  keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(logits.shape[0]))
  return jax.vmap(lambda row, k: sample(row[None], k, **rule)[0])(logits, keys)


def generate(
  model,
  prompts,
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  mesh: jax.sharding.Mesh | None = None,
) -> Iterator[jax.Array]:
  """Yields the new tokens <int32>[B], one column per step, for prompts (`pad_prompts`: [B, P] or ragged).

  Prompts of different lengths run as one batch in one cache of P + max_new_tokens positions
  (P the longest): each row is prefilled right-padded and then decoded at its own positions. The
  padding sits after a row's last token, where causal attention never looks and a causal
  router's choices for earlier tokens cannot depend on it, so with dropless MoE layers (or none)
  a row gets the tokens it would get alone (sampled: with its batch's key for row b). A capacity
  dispatcher's capacity grows with the padded length, so prompts of different lengths are refused
  there (`load_decoder` runs capacity models dropless). mesh: the mesh the
  model was built on, to split the batch, the cache and every layer's work over its devices. The
  model's positions (learned position tables, RoPE's trained range) are the caller's to respect.
  """
  tokens, lengths = pad_prompts(prompts)
  batch, longest = tokens.shape
  vocab = model.cfg.vocab_size
  if not 0 < top_p <= 1 or temperature < 0 or not 0 <= top_k <= vocab:
    raise ValueError(
      f"need temperature >= 0, 0 <= top_k <= {vocab} and 0 < top_p <= 1, got {temperature}, {top_k}, {top_p}"
    )
  if int(jnp.min(lengths)) < 1 or max_new_tokens < 1:
    raise ValueError(
      f"need prompts of at least one token and max_new_tokens >= 1, got lengths {lengths.tolist()} and {max_new_tokens}"
    )
  for layer in model.moe_layers():
    cfg = layer.cfg
    if not layer.router.family.is_causal(cfg):
      raise ValueError(
        f"router {cfg.router!r} with these options is not causal (its family's is_causal): no generation"
      )
    if cfg.group_size:
      raise ValueError(
        f"moe.group_size={cfg.group_size}: decoding routes one sequence's tokens, or one token, per group; "
        "build the model with group_size 0 (load_decoder does)"
      )
    if layer.router.family.dispatcher(cfg) != "dropless" and int(jnp.min(lengths)) != longest:
      raise ValueError(
        "prompts of different lengths with a capacity dispatcher: the padding changes the capacity; "
        "use moe.dispatcher='dropless' (as load_decoder does) or prompts of one length"
      )
  key = jax.random.key(seed)
  rule = dict(temperature=temperature, top_k=top_k, top_p=top_p)
  graphdef, state = nnx.split(model)
  cache = model.init_cache(batch, longest + max_new_tokens)
  if mesh is not None:  # Rows (and their cache) split over the batch devices, as the MoE layers split them.
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.BATCH_AXES))
    tokens, lengths, cache = jax.device_put((tokens, lengths, cache), rows)
  zeros = jnp.zeros_like(lengths)
  token, cache = _next_tokens(graphdef, state, tokens, cache, zeros, lengths - 1, key, 0, **rule)  # Prefill.
  for i in range(max_new_tokens):
    yield token
    if i + 1 < max_new_tokens:  # Each row's next position; its one new token is at index 0.
      token, cache = _next_tokens(graphdef, state, token[:, None], cache, lengths + i, zeros, key, i + 1, **rule)


def load_decoder(source: str, step: int | None = None, field: str = "--checkpoint", mesh=None, say=None):
  """(the moejax config, a DecoderLM holding the weights) of a run's workdir (its newest checkpoint, or
  `step`), one step of a run, or a converted model; the main model only.

  mesh: a ('data', 'expert', 'model') mesh (`moejax.parallel.make_mesh`) to hold and run the model on:
  expert weights split over 'expert' (and with 'model' > 1 the dimensions the saved config's
  mesh.rules name, as in training), the rest replicated, each device reading only its share;
  None: the default device.

  A capacity dispatcher ('sort', 'einsum') is replaced by 'dropless', the same function as a
  capacity of every token, so that no token is dropped, the prompt's included, and moe.group_size
  by 0; the config returned holds them and `say` (if given) gets a note line. A LoRA run's
  weights come merged (`moejax.weights.restore`). ConfigError names what is wrong.
  """
  import os

  from moejax import parallel, weights
  from moejax.config import saved_config, schema
  from moejax.models.build import decoder_config
  from moejax.models.decoder import DecoderLM

  item_dir, _ = weights.item_directory(source, step, fields=(field, "--step"))
  root = _root(source)
  config_path = os.path.join(root, "config.json")
  if not os.path.isfile(config_path):
    raise ConfigError(field, f"{root!r} holds no config.json (a run's workdir and a converted model do)")
  cfg = saved_config(config_path)
  if cfg.task != "lm":
    raise ConfigError(field, f"{root!r} holds a {cfg.task} model; only decoder LMs generate")
  if schema.has_moe_layers(cfg):
    # No prompt token dropped at prefill (a decoded token, alone in its group, cannot be): the
    # dropless dispatcher computes what a capacity of every token of the group (C = S) would,
    # without the E·S padded slots (experiments/inference.py measures what the capacity path
    # costs). Before the causality check: with no capacity, no slot order by later tokens remains.
    # Without a capacity, routing groups change nothing: one sequence each (group_size 0).
    wanted = {"dispatcher": "dropless", "group_size": 0}
    changed = [f"moe.{k} {cfg.moe[k]!r} -> {v!r}" for k, v in wanted.items() if cfg.moe[k] != v]
    if changed:
      cfg.moe.update(wanted)
      (say or (lambda _: None))(f"note: generating with {', '.join(changed)} (no token is dropped)")
  check_decodable(cfg)
  saved = weights.metadata(item_dir, field=field)
  embedding = saved["params"].get(("embed", "embedding"))
  if embedding is None:
    raise ConfigError(field, f"{item_dir!r} holds no embed.embedding: not a decoder's weights")
  cfg.model.mtp_depth = 0  # Generation runs the main model.
  model_cfg = decoder_config(cfg, embedding[0][0])
  if mesh is not None and model_cfg.moe_every and model_cfg.moe.num_experts % mesh.shape["expert"]:
    raise ConfigError("--mesh_expert", f"{mesh.shape['expert']} must divide the {model_cfg.moe.num_experts} experts")
  model = nnx.eval_shape(lambda: DecoderLM(model_cfg, mesh=mesh, rngs=nnx.Rngs(0)))
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placement = jax.tree.map(lambda _: device, nnx.state(model))
  else:
    placement = parallel.state_sharding(mesh, nnx.state(model), rules=cfg.mesh.rules.to_dict())
  placement = dict(nnx.to_flat_state(placement))
  targets = {}
  for section, selector in (("params", nnx.Param), ("model_state", nnx.Not(nnx.Param))):
    flat = dict(nnx.to_flat_state(nnx.state(model, selector)))
    for path, variable in flat.items():
      got = saved[section].get(weights.key(path))
      if got is None or got[0] != tuple(variable.get_value().shape):
        what = "is missing" if got is None else f"has shape {got[0]}, the config makes it {variable.get_value().shape}"
        raise ConfigError(f"parameter {weights.dotted(path)}", f"{what} in {item_dir}")
    targets[section] = {
      p: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=_unwrap(placement[p]))
      for p, v in flat.items()
    }
  restored = weights.restore(item_dir, targets, field=field, saved=saved)
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  for arrays in restored.values():
    for path, array in arrays.items():
      flat[path] = flat[path].replace(array)
  return cfg, nnx.merge(nnx.graphdef(model), nnx.from_flat_state(flat))


def _root(source: str) -> str:
  """The directory holding a source's config.json: the workdir of <workdir>/checkpoints/<step>, else source."""
  import os

  if os.path.basename(os.path.normpath(source)).isdigit():
    return os.path.dirname(os.path.dirname(os.path.normpath(source)))
  return source


def _unwrap(x):
  return x.get_value() if isinstance(x, nnx.Variable) else x


def _mesh(num_data: int, num_expert: int):
  """The ('data', 'expert') mesh of the command line (no 'model' split), or None for one device; ConfigError if it does not fit."""
  from moejax import parallel

  for value, field in ((num_data, "--mesh_data"), (num_expert, "--mesh_expert")):
    if value < 1:
      raise ConfigError(field, f"{value}: must be >= 1")
  if num_data * num_expert == 1:
    return None
  if num_data * num_expert > jax.device_count():
    hint = (
      " (CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N makes N)" if jax.default_backend() == "cpu" else ""
    )
    raise ConfigError(
      "--mesh_data x --mesh_expert", f"{num_data} x {num_expert} devices asked for, {jax.device_count()} present{hint}"
    )
  return parallel.make_mesh(num_data, num_expert)


# ----------------------------------------------------------------------------- command line

EXIT_BAD_INPUT = 2


class _Codec:
  """Prompts to token ids and back: a Hugging Face tokenizer.json, UTF-8 bytes, or ids written as integers."""

  def __init__(self, cfg, root: str, tokenizer: str | None, vocab_size: int):
    import os

    self.vocab_size = vocab_size
    path = tokenizer or os.path.join(root, "tokenizer.json")
    if tokenizer or os.path.isfile(path):
      try:
        from tokenizers import Tokenizer
      except ImportError:
        raise ConfigError("--tokenizer", "needs the tokenizers package (pip install -e '.[hf]')") from None
      try:
        self.tokenizer, self.kind = Tokenizer.from_file(path), "tokenizer"
      except Exception as e:  # noqa: BLE001 - tokenizers raises its own types for a bad file.
        raise ConfigError("--tokenizer", f"{path!r} is not a readable tokenizer.json ({e})") from None
    elif cfg.data.source in ("text_bytes", "tfds") and vocab_size == 256:
      self.kind = "bytes"  # moejax's byte-level text data.
    else:
      self.kind = "ids"  # E.g. the Markov mixture: prompts and outputs are token ids.

  def encode(self, text: str) -> list[int]:
    if self.kind == "tokenizer":
      ids = self.tokenizer.encode(text).ids
    elif self.kind == "bytes":
      ids = list(text.encode("utf-8"))
    else:
      try:
        ids = [int(t) for t in text.split()]
      except ValueError:
        raise ConfigError("--prompt", f"{text!r}: this model's prompts are token ids, written as integers") from None
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if not ids or bad:
      why = "is empty" if not ids else f"holds token {bad[0]}, outside the vocabulary of {self.vocab_size}"
      raise ConfigError("--prompt", f"{text!r} {why}")
    return ids

  def decode(self, ids: list[int]) -> str:
    if self.kind == "tokenizer":
      return self.tokenizer.decode(ids)
    if self.kind == "bytes":
      return bytes(ids).decode("utf-8", errors="replace")
    return " ".join(map(str, ids))


def _parser():
  import argparse

  class Parser(argparse.ArgumentParser):
    def error(self, message):  # One line, exit 2.
      import sys

      print(f"error: {message}", file=sys.stderr, flush=True)
      sys.exit(EXIT_BAD_INPUT)

  parser = Parser(prog="python -m moejax.generate", description="Generate text with a moejax decoder.")
  parser.add_argument("--checkpoint", required=True, help="a run's workdir, one step of a run, or a converted model")
  parser.add_argument("--step", type=int, help="which checkpoint of a run's workdir (default: the newest)")
  parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable: a batch)")
  parser.add_argument("--prompt_file", help="a file of prompts, one a line")
  parser.add_argument("--max_new_tokens", type=int, default=32)
  parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  parser.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
  parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: the smallest set of mass p")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tokenizer", help="a Hugging Face tokenizer.json (default: <checkpoint>/tokenizer.json if any)")
  parser.add_argument("--mesh_data", type=int, default=1, help="devices splitting the batch")
  parser.add_argument("--mesh_expert", type=int, default=1, help="devices splitting the experts (and the batch)")
  return parser


def main(argv: list[str] | None = None) -> int:
  """All prompts run as one batch (`generate`); a single prompt streams its tokens as they come.

  On a mesh of --mesh_data × --mesh_expert devices the batch is split over all of them (it is
  filled up to a multiple of their number with copies of the first prompt, whose output is
  dropped) and the experts over --mesh_expert.
  """
  import sys

  from moejax.errors import silence_stderr

  args = _parser().parse_args(argv)
  from absl import logging

  logging.set_verbosity(logging.ERROR)  # orbax's INFO/WARNING lines (a run's checkpoint read outside its manager).
  try:
    for value, field, ok in (
      (args.max_new_tokens, "--max_new_tokens", args.max_new_tokens >= 1),
      (args.temperature, "--temperature", args.temperature >= 0),
      (args.top_k, "--top_k", args.top_k >= 0),
      (args.top_p, "--top_p", 0 < args.top_p <= 1),
      (args.seed, "--seed", 0 <= args.seed < 2**32),
    ):
      if not ok:
        raise ConfigError(
          field,
          f"{value} is out of range (max_new_tokens >= 1, temperature >= 0, top_k >= 0, 0 < top_p <= 1, "
          "0 <= seed < 2**32)",
        )
    prompts = list(args.prompt)
    if args.prompt_file:
      try:
        with open(args.prompt_file, encoding="utf-8") as f:
          prompts += [line.rstrip("\n") for line in f if line.strip()]
      except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("--prompt_file", f"{args.prompt_file!r} does not read ({e})") from None
    if not prompts:
      raise ConfigError("--prompt", "give at least one (--prompt or --prompt_file)")
    mesh = _mesh(args.mesh_data, args.mesh_expert)
    notes = []  # Said once the input is known to be good (a refusal stays one line).
    cfg, model = load_decoder(args.checkpoint, args.step, mesh=mesh, say=notes.append)
    root = _root(args.checkpoint)
    if args.top_k > model.cfg.vocab_size:
      raise ConfigError("--top_k", f"{args.top_k} is more than the vocabulary's {model.cfg.vocab_size} tokens")
    codec = _Codec(cfg, root, args.tokenizer, model.cfg.vocab_size)
    encoded = [codec.encode(p) for p in prompts]
    longest = max(map(len, encoded)) + args.max_new_tokens
    if cfg.model.positions == "learned" and longest > model.cfg.max_len:
      raise ConfigError(
        "--max_new_tokens", f"prompt + new tokens = {longest} > the {model.cfg.max_len} learned positions"
      )
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    silence_stderr()
    return EXIT_BAD_INPUT
  for line in notes:
    print(line, file=sys.stderr, flush=True)
  outputs: list[list[int]] = [[] for _ in prompts]
  rule = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
  devices = 1 if mesh is None else parallel.batch_devices(mesh)
  batch = encoded + [encoded[0]] * (-len(encoded) % devices)  # Rows for every device; the copies are dropped.
  stream = len(prompts) == 1
  if stream:
    print(prompts[0], end="", flush=True)
  shown = ""
  for column in generate(model, batch, args.max_new_tokens, mesh=mesh, **rule):
    for out, token in zip(outputs, jax.device_get(column).tolist()):
      out.append(token)
    if stream:  # Print what the tokens so far add (a multi-byte character or token appears whole).
      text = codec.decode(outputs[0])
      sep = " " if codec.kind == "ids" and not shown else ""
      print(sep + text[len(shown) :], end="", flush=True)
      shown = text
  if stream:
    print()
  if len(prompts) > 1:
    for prompt, out in zip(prompts, outputs):
      print(f"{prompt}{' ' if codec.kind == 'ids' else ''}{codec.decode(out)}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
