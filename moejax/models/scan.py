"""Scan over layers (model.scan_layers): the transformer blocks run as one `jax.lax.scan`.

Legend: n blocks, s blocks of the unrolled prefix, p blocks per unit (the period), U = (n - s) / p
units; B, L, d as in the models.

Unrolled, the compiled program holds one copy of every block, so its size and compile time grow
with n. Scanned, it holds one unit of p blocks, run U times. Blocks differ (DeepSeek's first
dense blocks, an MoE FFN in every P-th block, gpt-oss's alternating sliding and full attention),
so `find_repetition` looks for the shortest prefix s after which the blocks repeat with a period
p: blocks s .. n-1 are U ≥ 2 units whose structures (`nnx.split`'s graphdef, static attributes
such as the window included, and the shapes and dtypes of the variables) are equal unit to unit.
The prefix runs unrolled, then the units are scanned, each step running its p blocks in order;
with no repetition every block runs unrolled. What that changes in program size, compile time,
step time and memory: `python -m experiments.scan_layers`.

Storage: the parameters stay one module per block (`self.blocks`), so checkpoints, the HF
converters (`moejax.convert`), LoRA and freezing, which name each block's weights by path, see
the same tree with scan_layers on or off, and the option may change when a run resumes. At call
time the scanned blocks' variables are stacked (`jnp.stack` of each leaf over the units: a
[U, ...] array for each variable of unit position j) and the scan slices one unit's back out;
the gradient of each block's parameters flows back through that stacking. The stack is a
per-step copy of the scanned blocks' weights (their gradients are formed stacked too, then
sliced), the price of keeping the storage per block.

What the scan keeps equal to the unrolled loop (tests/test_scan.py: losses and gradients):
  * each block is called through the same `call` (`moejax.models.remat.block_call`), so the
    remat policies apply to each block inside the scan body;
  * block i's rng is `jax.random.fold_in(rng, i)`, i its global index (a scanned input);
  * the MoE layers' aux dicts come out stacked over the units and are unstacked into one list
    in block order.
The scan reads each block's variables (Params, DeepSeek's RouterBias, ...) and writes none back:
a block's forward pass must not change its state, as moejax's do not (`MoELayer.update_balance`
updates DeepSeek's bias after the step). A layer sowing its routing decision
(`capture_routing`, `moejax.analysis`) does change it, so the blocks then run unrolled.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def find_repetition(kinds: Sequence[Hashable]) -> tuple[int, int]:
  """(s, p): the smallest prefix s, then the smallest period p, such that kinds[s:] is U ≥ 2 repeats of kinds[s:s + p].

  kinds: one label per block (equal labels: equal structures). (n, 0) when no such (s, p)
  exists: every block runs unrolled. E.g. 'DMMMMM' -> (1, 1); 'DMDMDM' -> (0, 2); 'DDDM' -> (4, 0).
  """
  n = len(kinds)
  for s in range(n):
    rest = n - s
    for p in range(1, rest // 2 + 1):  # At least two units.
      if rest % p == 0 and all(kinds[i] == kinds[i + p] for i in range(s, n - p)):
        return s, p
  return n, 0


def structure(block: nnx.Module) -> tuple:
  """What must be equal for two blocks to share a scan body: graphdef, pytree structure, leaf shapes and dtypes."""
  graphdef, state = nnx.split(block)
  leaves, treedef = jax.tree.flatten(state)
  return graphdef, treedef, tuple((leaf.shape, leaf.dtype) for leaf in leaves)


def plan(blocks: Sequence[nnx.Module]) -> tuple[int, int]:
  """(s, p) of `find_repetition` over the blocks' structures; (n, 0) if a layer captures its routing."""
  if any(getattr(node, "capture_routing", False) for block in blocks for _, node in nnx.iter_graph(block)):
    return len(blocks), 0  # Its sow changes the state, which the scan does not write back.
  kinds, labels = [], []
  for block in blocks:
    signature = structure(block)
    label = next((k for k, seen in enumerate(kinds) if seen == signature), None)
    if label is None:
      label = len(kinds)
      kinds.append(signature)
    labels.append(label)
  return find_repetition(labels)


def run_blocks(
  blocks: Sequence[nnx.Module],
  x: jax.Array,
  call: Callable,
  rng: jax.Array | None,
  token_ids: jax.Array | None,
  *,
  scan: bool,
) -> tuple[jax.Array, list[dict]]:
  """x [B, L, d] through every block in order -> (x [B, L, d], the aux of each MoE layer, in block order).

  call: (block, x, rng, token_ids) -> (x, aux or None), e.g. `moejax.models.remat.block_call`;
  block i gets rng `fold_in(rng, i)` (None if rng is None). scan: the repeating blocks run as a
  `lax.scan` (module docstring); else, or with nothing to scan, every block runs unrolled.
  """
  s, p = plan(blocks) if scan else (len(blocks), 0)
  x, moe_aux = _unrolled(blocks, 0, s, x, call, rng, token_ids)
  if p:
    x, scanned_aux = _scanned(blocks, s, p, x, call, rng, token_ids)
    moe_aux += scanned_aux
  return x, moe_aux


def _unrolled(blocks, start, stop, x, call, rng, token_ids):
  """Blocks start .. stop - 1 as a Python loop: (x, their MoE aux)."""
  moe_aux = []
  for i in range(start, stop):
    x, aux = call(blocks[i], x, None if rng is None else jax.random.fold_in(rng, i), token_ids)
    if aux is not None:
      moe_aux.append(aux)
  return x, moe_aux


def _scanned(blocks, s, p, x, call, rng, token_ids):
  """Blocks s .. n-1, U units of p, as a lax.scan over the units: (x, their MoE aux in block order)."""
  n = len(blocks)
  # Unit position j: the graphdef and state structure its blocks share, and each block's leaves.
  split = [[nnx.split(blocks[i]) for i in range(s + j, n, p)] for j in range(p)]
  graphdefs = [states[0][0] for states in split]
  flat = [[jax.tree.flatten(state) for _, state in states] for states in split]
  treedefs = [leaves_and_treedef[0][1] for leaves_and_treedef in flat]
  leaves = [[block_leaves for block_leaves, _ in position] for position in flat]  # [j][u]: a list of arrays

  def unit(x, unit_inputs):
    """One scan step: the p blocks of a unit, from their leaves and global indices [p]."""
    unit_leaves, index = unit_inputs
    auxes = []
    for j in range(p):
      block = nnx.merge(graphdefs[j], jax.tree.unflatten(treedefs[j], unit_leaves[j]))
      x, aux = call(block, x, None if rng is None else jax.random.fold_in(rng, index[j]), token_ids)
      auxes.append(aux)
    return x, auxes

  # The carry must keep its type; moejax's blocks return their input's dtype (the norms keep a
  # bfloat16 stream bfloat16), but a block that promotes it cannot be scanned: it runs unrolled.
  if _out_type(unit, x, leaves) != (x.shape, x.dtype):
    return _unrolled(blocks, s, n, x, call, rng, token_ids)
  moe_aux = []
  stacked = [[jnp.stack(u_leaves) for u_leaves in zip(*position)] for position in leaves]  # [j][k]: [U, ...]
  indices = jnp.arange(s, n, dtype=jnp.int32).reshape(-1, p)  # [U, p] global block indices, for the rngs
  x, auxes = jax.lax.scan(unit, x, (stacked, indices))  # auxes[j]: unit position j's aux, each leaf [U, ...]
  for u in range(indices.shape[0]):
    moe_aux += [_unit_of(aux, u) for aux in auxes if aux is not None]
  return x, moe_aux


def _unit_of(stacked_aux: dict, u: int) -> dict:
  """Unit u's aux from the scan's output (each leaf [U, ...])."""
  return jax.tree.map(lambda a: a[u], stacked_aux)


def _out_type(unit, x, leaves) -> tuple:
  """(shape, dtype) of a unit's output for input x, from shapes alone (every unit's are the first's)."""
  first_unit = [jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), position[0]) for position in leaves]
  index = jax.ShapeDtypeStruct((len(leaves),), jnp.int32)
  out = jax.eval_shape(lambda x, inputs: unit(x, inputs)[0], x, (first_unit, index))
  return out.shape, out.dtype


def note(s: int, p: int, num_blocks: int) -> str:
  """The start-up line of model.scan_layers for the plan (s, p) of `plan`: what runs unrolled and what is scanned."""
  if not p:
    return f"note: model.scan_layers: no run of equal blocks repeats, so all {num_blocks} blocks run unrolled"
  prefix = f"blocks 0..{s - 1} unrolled, then " if s else ""
  return f"scan_layers: {prefix}{(num_blocks - s) // p} units of {p} block(s) scanned"
