"""Rematerialisation of the transformer blocks in training (model.remat): what the backward pass keeps.

Each block runs under `nnx.remat` (jax.checkpoint) with one of these policies; anything not
saved is recomputed in the backward pass. The losses and gradients are those of 'none'
(tests/test_remat.py); memory and compile time: `python -m experiments.remat_memory`.

  none   no remat: every activation the backward pass needs is kept (the default)
  full   nothing saved inside a block: only its input is kept, the block runs twice
  dots   matmul outputs saved (jax.checkpoint_policies.dots_saveable), the rest recomputed
  moe    inside the MoE layer only: the experts' outputs before the weighted combine and what
         every all_to_all delivered are saved by name (`moejax.layers.moe.EXPERT_OUTPUT`,
         `EXCHANGED`), and the rest of the layer (router, dispatch, the experts' hidden
         activations, combine) is recomputed, so no exchange is redone (tests/test_remat.py
         counts them); attention and dense FFNs keep their activations. The checkpoint wraps
         the layer's per-device function (`MoELayer.__call__`), so only the MoE layer is
         rematerialised.
"""

from __future__ import annotations

import jax
from flax import nnx

POLICIES = {  # The block-level policies; 'moe' is applied inside the MoE layer.
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "moe": None,
}


def block_call(policy: str, train: bool):
  """(block, x, rng, token_ids) -> block(x, train=train, rng=rng, token_ids=token_ids), rematerialised
  under `policy` in training (eval mode keeps nothing for a backward pass: the plain call)."""

  def call(block, x, rng, token_ids):
    return block(x, train=train, rng=rng, token_ids=token_ids)

  if POLICIES[policy] is None or not train:
    return call
  return nnx.remat(call, policy=POLICIES[policy])
