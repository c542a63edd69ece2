"""LoRA adapters (Hu et al. 2021) on chosen weight matrices, the experts' included (config section `lora`).

A targeted weight W is used as W + (alpha / rank) · A·B, with A drawn N(0, 1/in) and B zero, so
step 0 computes the base model exactly. Every moejax weight is stored input-first:
W [in, *out] (attention's wqkv [d, 3, H, hd], an FFN's wi [d, f], ...), and A·B is [in, prod(out)]
reshaped to W's shape. A routed expert array [E, in, out] gets one adapter per expert:
A [E, in, r], B [E, r, out], split over the 'expert' mesh axis like W.

Which matrices (`lora.targets`, groups; `lora.patterns`, regular expressions over dotted paths):
  attention   every attention projection (wqkv, wq, wkv, wo; MLA's wq_a, wq_b, wkv_a, wkv_b)
  ffn         every FFN matrix: experts and dense_ffn (whichever the model has)
  experts     the MoE layers' routed experts (per-expert adapters) and shared experts
  dense_ffn   the dense FFN matrices: dense blocks, Arctic's parallel dense FFN
  router      the routers' kernels
The default, attention and ffn, adapts every matrix of the attention and FFN blocks of any model.
A pattern may name any other weight of two or more dimensions (an embedding [V, d] is a lookup of
rows, i.e. a one-hot input: LoRA's usual embedding adapter); biases, norm scales and attention
sinks are refused, as is a group or pattern that matches nothing.

How it runs: a re-parametrisation. The train step forms W + s·A·B for each target and merges
that into the model (`apply`), so every layer, router and dispatcher works unchanged, and the
gradient reaches A and B through it. What that costs and saves against full fine-tuning: no
optimizer moments for W (the saving that matters: 2 × the model in Adam), but the merged W and
its full-size gradient exist transiently, layer by layer, as in full fine-tuning; an unmerged
forward (x·W + s·(x·A)·B, which never forms W's gradient) would need every layer to know about
adapters. The base weights train only where `lora.train` names their group; everything else is
frozen (`moejax.finetune`).

A checkpoint of a LoRA run holds the base weights and the adapters ('lora'); reading its
parameters elsewhere (`init.checkpoint`, `python -m moejax.convert to-hf`) gives the merged
weights (`moejax.weights.restore`), the function the run trained.
"""

from __future__ import annotations

import math
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from moejax import finetune
from moejax.errors import ConfigError

GROUPS = ("attention", "ffn", "experts", "dense_ffn", "router")
_EXPERT_MATRICES = ("wi", "wg", "wo")
_NOT_MATRICES = re.compile(r"b[a-z]*|scale|sinks|bias")  # Biases (bi, bqkv, ...), norm scales, sinks.


def routed_expert(names: tuple[str, ...], ndim: int) -> bool:
  """An MoE layer's stacked expert matrix [E, in, out] (…ffn.wi | wg | wo)."""
  return names[-1] in _EXPERT_MATRICES and finetune.routed_expert(names, ndim)


def in_group(group: str, names: tuple[str, ...], ndim: int) -> bool:
  """Whether the weight at `names` (its dotted path's parts) of `ndim` dimensions is in LoRA `group`."""
  leaf = names[-1]
  if not leaf.startswith("w") and leaf != "kernel":
    return False
  if group == "attention":
    return "attention" in names and ndim >= 2
  if group == "ffn":
    return in_group("experts", names, ndim) or in_group("dense_ffn", names, ndim)
  if group == "experts":
    return "ffn" in names and (routed_expert(names, ndim) or ("shared" in names and ndim == 2))
  if group == "dense_ffn":
    return "ffn" in names and "shared" not in names and "router" not in names and leaf in _EXPERT_MATRICES and ndim == 2
  if group == "router":
    return "router" in names and ndim == 2
  raise ValueError(group)


def enabled(cfg) -> bool:
  return cfg.lora.rank > 0


def scale(lora_cfg) -> float:
  return float(lora_cfg.alpha) / lora_cfg.rank


def shapes(lora_cfg, params: dict) -> dict:
  """{path: (A's shape, B's shape)} of the adapters of the weights `lora_cfg` targets.

  params: {path: shape} of the model's parameters (paths as tuples of names). ConfigError
  names the group or pattern that matches nothing, or a pattern that matches a non-matrix.
  """
  patterns = [re.compile(p) for p in lora_cfg.patterns]
  used = {("lora.targets", g): False for g in lora_cfg.targets} | {
    ("lora.patterns", p.pattern): False for p in patterns
  }
  out = {}
  for path, shape in params.items():
    names = tuple(str(n) for n in path)
    dotted = ".".join(names)
    hit = False
    for group in lora_cfg.targets:
      if in_group(group, names, len(shape)):
        used[("lora.targets", group)] = hit = True
    for pattern in patterns:
      if pattern.fullmatch(dotted):
        lead = 1 if routed_expert(names, len(shape)) else 0
        if _NOT_MATRICES.fullmatch(names[-1]) or len(shape) - lead < 2:
          raise ConfigError(
            "lora.patterns", f"{pattern.pattern!r} matches {dotted} {tuple(shape)}, which is no weight matrix"
          )
        used[("lora.patterns", pattern.pattern)] = hit = True
    if hit:
      lead = shape[:1] if routed_expert(names, len(shape)) else ()
      fan_in, fan_out = shape[len(lead)], math.prod(shape[len(lead) + 1 :])
      out[path] = ((*lead, fan_in, lora_cfg.rank), (*lead, lora_cfg.rank, fan_out))
  for (field, what), hit in used.items():
    if not hit:
      raise ConfigError(field, f"'{what}' matches no weight matrix of this model")
  return out


def init(adapter_shapes: dict, seed: int, dtype=jnp.float32) -> dict:
  """{path: {'a', 'b'}}: A ~ N(0, 1/in), B = 0 (Hu et al.: the adapted model starts as the base model)."""
  out = {}
  for path, (a_shape, b_shape) in adapter_shapes.items():
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(".".join(map(str, path)).encode()))
    a = jax.random.normal(key, a_shape, dtype) / math.sqrt(a_shape[-2])
    out[path] = {"a": a, "b": jnp.zeros(b_shape, dtype)}
  return out


def nest(adapters: dict) -> dict:
  """{path: {'a', 'b'}} -> nested dicts with string keys (a train state's 'lora', as checkpoints hold it)."""
  out: dict = {}
  for path, ab in adapters.items():
    node = out
    for key in path:
      node = node.setdefault(str(key), {})
    node.update(ab)
  return out


def unnest(tree: dict) -> dict:
  """The inverse of `nest`, with string keys: {('blocks', '1', 'ffn', 'wi'): {'a', 'b'}}."""
  out = {}

  def walk(node, prefix):
    if "a" in node and "b" in node and not isinstance(node["a"], dict):
      out[prefix] = {"a": node["a"], "b": node["b"]}
      return
    for key, child in node.items():
      walk(child, (*prefix, key))

  walk(tree, ())
  return out


def merged(w, a, b, s: float):
  """W + s·A·B in W's shape and dtype (numpy arrays stay numpy, jax arrays jax)."""
  xp = np if isinstance(w, np.ndarray) else jnp
  delta = xp.matmul(a.astype(xp.float32), b.astype(xp.float32)) * s
  return (w.astype(xp.float32) + delta.reshape(w.shape)).astype(w.dtype)


def apply(flat_params: dict, adapters: dict, s: float) -> dict:
  """{path: weight} with each adapted weight merged: W + s·A·B."""
  out = dict(flat_params)
  for path, ab in adapters.items():
    out[path] = merged(flat_params[path], ab["a"], ab["b"], s)
  return out
