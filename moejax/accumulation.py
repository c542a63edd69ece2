"""Gradient accumulation (train.microbatches): how micro-batches' results make the batch's.

`moejax.train.Trainer._gradients` runs M equal micro-batches one after another (a lax.scan);
`MicroBatchReduce` combines their gradients (summed, then / M), metrics and MoE aux (means, but
extremes are extremes and load ratios come from the mean load), and `microbatch_note` is the
start-up line for settings under which the accumulated step is not the whole batch's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from moejax.config import schema


class MicroBatchReduce:
  """How (gradients, metrics, MoE aux) of micro-batches combine into the batch's (gradient accumulation)."""

  def __init__(self, shapes):
    """shapes: the (gradients, metrics, aux) of one micro-batch, abstract; gradients are always summed."""
    self.shapes = shapes
    grads, metrics, moe_aux = shapes
    kind = lambda path, _: self._kind(path)
    self.kinds = (
      jax.tree.map(lambda _: "sum", grads),
      jax.tree_util.tree_map_with_path(kind, metrics),
      jax.tree_util.tree_map_with_path(kind, moe_aux),
    )

  @staticmethod
  def _kind(path) -> str:
    name = str(getattr(path[-1], "key", "")) if path else ""
    last = name.split("/")[-1]
    if last.endswith("_min") or last == "min_selected_gate":
      return "min"
    if last.endswith("_max") or last == "max_selected_gate":
      return "max"
    return "sum"

  def start(self):
    fill = {"sum": 0, "min": jnp.inf, "max": -jnp.inf}
    return jax.tree.map(lambda kind, s: jnp.full(s.shape, fill[kind], s.dtype), self.kinds, self.shapes)

  def add(self, total, new):
    op = {"sum": jnp.add, "min": jnp.minimum, "max": jnp.maximum}
    return jax.tree.map(lambda kind, a, b: op[kind](a, b), self.kinds, total, new)

  def finish(self, total, m: int):
    grads, metrics, moe_aux = jax.tree.map(lambda kind, x: x / m if kind == "sum" else x, self.kinds, total)
    for i, aux in enumerate(moe_aux):  # A ratio of the mean load, not a mean of micro-batch ratios.
      if f"moe_layer{i}/max_over_mean_load" in metrics:
        load = aux["expert_load"]
        metrics[f"moe_layer{i}/max_over_mean_load"] = load.max() / load.mean()
        metrics[f"moe_layer{i}/min_over_mean_load"] = load.min() / load.mean()
    return grads, metrics, moe_aux


def microbatch_note(cfg: ml_collections.ConfigDict) -> str | None:
  """A start-up line when train.microbatches > 1 with settings whose step is not the whole batch's, else None.

  Those are the losses and groups taken over more than one sequence: their statistics are per
  micro-batch, so the accumulated gradient is the mean of micro-batch gradients of a nonlinear
  function, not the whole batch's (exactly equal with the defaults: tests/test_accumulation.py).
  """
  m, e = cfg.train.microbatches, cfg.moe
  if m == 1 or not schema.has_moe_layers(cfg):
    return None
  reasons = []
  if e.get("load_balance_scope", "group") != "group":
    reasons.append(f"moe.load_balance_scope={e.load_balance_scope!r} takes f and P over each micro-batch")
  for name in ("importance_loss_weight", "load_loss_weight"):
    if e.get(name, 0.0) > 0:
      reasons.append(f"moe.{name} > 0: the CV² is over each micro-batch's groups")
  if cfg.task == "lm" and e.group_size > cfg.train.seq_len:
    reasons.append(f"moe.group_size={e.group_size} spans sequences: groups form within each micro-batch")
  if not reasons:
    return None
  return (
    f"note: train.microbatches={m}: " + "; ".join(reasons) + ", so the step is close to, not equal to, "
    "the whole batch's"
  )
