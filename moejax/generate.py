"""Text generation with the KV cache: sampling rules and the decoding loop (issue #15).

`sample` draws the next token from logits: greedy (temperature 0), or from softmax(logits / T)
restricted to the top_k most likely tokens and to the smallest set whose probability reaches
top_p (nucleus sampling, Holtzman et al. 2020), both applied when both are set. `generate`
prefills the prompts into a fixed-size cache (`DecoderLM.decode`) and decodes one token at a time,
yielding each new column of tokens as it is drawn (streaming); the draw of step i uses
fold_in(key(seed), i), so a seed gives the same text on every run.

Decoding runs the main model (no multi-token-prediction modules) in eval mode. Routers must be
causal: expert choice, soft MoE and batch-prioritised routing see other tokens of their group,
which a decoder does not have yet (`check_decodable`).
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

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
  if cfg.model.moe_every == 0 and not cfg.model.mtp_depth:
    return
  if cfg.moe.router in ("expert_choice", "soft_moe") or cfg.moe.priority == "bpr":
    raise ConfigError(
      "moe.router" if cfg.moe.priority != "bpr" else "moe.priority",
      "routes each token by the other tokens of its group, which a decoder has not seen yet; it cannot generate",
    )


_step = nnx.jit(lambda model, tokens, cache, start: model.decode(tokens, cache, start))


def generate(
  model,
  prompts: jax.Array,
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
) -> Iterator[jax.Array]:
  """Yields the new tokens <int32>[B], one column per step, for prompts <int32>[B, P] (all of length P).

  The cache holds P + max_new_tokens positions; the model's positions (learned position tables,
  RoPE's trained range) are the caller's to respect.
  """
  batch, length = prompts.shape
  if not 0 < top_p <= 1 or temperature < 0 or top_k < 0:
    raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {temperature}, {top_k}, {top_p}")
  if length < 1 or max_new_tokens < 1:
    raise ValueError(f"need a prompt of at least one token and max_new_tokens >= 1, got {length} and {max_new_tokens}")
  key = jax.random.key(seed)
  cache = model.init_cache(batch, length + max_new_tokens)
  logits, cache = _step(model, prompts, cache, jnp.int32(0))
  draw = jax.jit(sample, static_argnames=("temperature", "top_k", "top_p"))
  for i in range(max_new_tokens):
    token = draw(logits[:, -1], jax.random.fold_in(key, i), temperature=temperature, top_k=top_k, top_p=top_p)
    yield token
    if i + 1 < max_new_tokens:
      logits, cache = _step(model, token[:, None], cache, jnp.int32(length + i))
