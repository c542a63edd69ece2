"""Language-model batches for the trainer: `make_lm_data(config.data, ...)`.

The order of training examples is a pure function of (seed, step): the
training stream is a grain MapDataset (random access), shuffled with a fresh
permutation per epoch (grain's `shuffle` before `repeat` reseeds each epoch
with seed + epoch), repeated forever and cut into batches. Batch s is read by
index, so a run resumed at step s sees exactly what an unbroken run saw,
without replaying the stream.

With several processes, global batch s is the rows [s*B, (s+1)*B) of that
stream; process p reads only its rows [p*b, (p+1)*b) of it (b = B / P), which
grain expresses as "batches of b, every P-th one starting at p".

Splits are read once into memory (uint8 for vocabularies up to 256); grain
orders row indices and each batch is one gather. That suits datasets up to a
few GB; a larger one would hand grain the TFDS data source instead.

Stored sequences hold L+1 tokens: inputs are tokens[:-1], targets tokens[1:].
Sources ('data.source'):
  * markov_mixture: `builders.markov_builder` (known Bayes floor).
  * text_bytes: `builders.text_builder`, local files, vocabulary 256.
  * tfds: `builders.read_tfds_text`, any prepared TFDS text dataset, bytes.
tensorflow_datasets and grain are imported only when data is made.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterator, Sequence

import numpy as np

from moejax.data import config as config_lib
from moejax.data import markov

BYTE_VOCAB_SIZE = 256
# Batches read ahead by background threads while the trainer computes.
_READ_THREADS = 1
_PREFETCH_BATCHES = 16


class StepBatches:
  """Batch access shared by LMData and images.ImageData: `_train` is a grain MapDataset of
  batches (batch s = step s), `_eval` the fixed eval batches."""

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch of training step `step` (random access, no prefetch)."""
    return self._train[step]

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches; the i-th one yielded is the batch of start_step + i."""
    import grain  # pylint: disable=g-import-not-at-top

    read_options = grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
    return iter(self._train[start_step:].to_iter_dataset(read_options))

  def eval_batches(self) -> list[dict[str, np.ndarray]]:
    """The fixed eval batches: the first stored eval examples, unshuffled."""
    return list(self._eval)


@dataclasses.dataclass
class LMData(StepBatches):
  """Batches of one dataset for one process.

  Batches are dicts {'inputs': <int32>[b, L], 'targets': <int32>[b, L]} of
  numpy arrays, b = global_batch_size // process_count, this process's rows.

  Attributes:
    vocab_size: token ids are in [0, vocab_size).
    seq_len: L, the model input length.
    global_batch_size: B, rows of a batch summed over processes.
    info: 'dataset' (readable name), 'unigram_loss' (nats: cross-entropy on
      the eval targets of the add-one smoothed unigram distribution of the
      training tokens), 'bayes_floor' (markov_mixture: mean Bayes-optimal loss
      on exactly the eval targets; else None), 'manifest' (text_bytes: digest
      and file list; else None), 'num_train_sequences', 'num_eval_batches',
      'data_dir'.
  """

  vocab_size: int
  seq_len: int
  global_batch_size: int
  info: dict[str, Any]
  _train: Any = dataclasses.field(repr=False)  # grain.MapDataset of batches.
  _eval: list[dict[str, np.ndarray]] = dataclasses.field(repr=False)


def resolve_data_dir(data_dir: str) -> str:
  """'' -> $MOEJAX_DATA_DIR, else ~/.cache/moejax/tensorflow_datasets."""
  if data_dir:
    return os.path.expanduser(data_dir)
  return os.environ.get("MOEJAX_DATA_DIR") or os.path.expanduser("~/.cache/moejax/tensorflow_datasets")


def make_lm_data(
  data_cfg, *, seq_len: int, global_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
) -> LMData:
  """Prepares (if needed) and opens the dataset that `data_cfg` describes.

  Args:
    data_cfg: `config.default_data_config()`-like object (attribute access).
    seq_len: L; stored sequences have L+1 tokens.
    global_batch_size: B, divisible by process_count.
    seed: seed of the training order.
    process_index, process_count: this process and how many read the data.

  Returns:
    An LMData; its batches hold this process's rows only, while `info` is
    about the global eval batches (identical in every process).

  Raises:
    ValueError: unknown data.source, bad batch size, or too little data.
  """
  if data_cfg.source not in config_lib.SOURCES:
    raise ValueError(f"Unknown data.source={data_cfg.source!r}; allowed: {', '.join(config_lib.SOURCES)}")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}")
  data_dir = resolve_data_dir(data_cfg.data_dir)
  if data_cfg.source == "tfds":
    splits = _tfds_splits(data_cfg, data_dir, seq_len + 1, global_batch_size)
  else:
    splits = _builder_splits(data_cfg, data_dir, seq_len + 1, global_batch_size)
  train_tokens, eval_tokens, info = splits.train, splits.eval, splits.info
  if len(train_tokens) < global_batch_size:
    raise ValueError(
      f"{info['dataset']}: {len(train_tokens)} training sequences, fewer than one batch of {global_batch_size}"
    )
  info["unigram_loss"] = unigram_loss(train_tokens, eval_tokens[:, 1:], splits.vocab_size)
  info["bayes_floor"] = splits.mixture.bayes_floor(eval_tokens) if splits.mixture else None
  info["num_train_sequences"] = len(train_tokens)
  info["num_eval_batches"] = len(eval_tokens) // global_batch_size
  info["data_dir"] = data_dir

  local_batch = global_batch_size // process_count
  rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
  eval_batches = [_lm_example(batch[rows]) for batch in np.split(eval_tokens, info["num_eval_batches"])]
  train = _train_dataset(
    train_tokens, local_batch=local_batch, seed=seed, process_index=process_index, process_count=process_count
  )
  logging.info("LM data %s: %s", info["dataset"], {k: v for k, v in info.items() if k != "manifest"})
  return LMData(
    vocab_size=splits.vocab_size,
    seq_len=seq_len,
    global_batch_size=global_batch_size,
    info=info,
    _train=train,
    _eval=eval_batches,
  )


@dataclasses.dataclass
class _Splits:
  """What a source provides: <uint>[N, L+1] train and eval rows, and more."""

  vocab_size: int
  train: np.ndarray
  eval: np.ndarray  # Exactly the global eval batches, in order.
  info: dict[str, Any]
  mixture: markov.MarkovMixture | None = None


def _builder_splits(data_cfg, data_dir: str, length: int, global_batch_size: int) -> _Splits:
  """Prepares (if needed) and reads one of moejax's own TFDS datasets."""
  from moejax.data import builders  # pylint: disable=g-import-not-at-top

  if data_cfg.source == "markov_mixture":
    m = data_cfg.markov
    builder = builders.markov_builder(
      data_dir,
      vocab_size=m.vocab_size,
      num_sources=m.num_sources,
      branching=m.branching,
      seed=m.seed,
      num_train=m.num_train,
      num_validation=m.num_validation,
      length=length,
    )
    vocab_size, mixture = m.vocab_size, builder.builder_config.mixture
  else:
    paths = [p.strip() for p in data_cfg.text.paths.split(",") if p.strip()]
    builder = builders.text_builder(data_dir, paths=paths, max_bytes=data_cfg.text.max_bytes, length=length)
    vocab_size, mixture = BYTE_VOCAB_SIZE, None
  sources = builders.prepare(builder)
  if mixture is not None:
    builders.read_mixture_params(builder)  # Raises if the tokens disagree.
  num_eval = _num_eval_batches(data_cfg, len(sources["validation"]), global_batch_size) * global_batch_size
  info = {
    "dataset": f"{builder.name}/{builder.builder_config.name}",
    "manifest": (builders.read_manifest(builder) if data_cfg.source == "text_bytes" else None),
  }
  return _Splits(
    vocab_size=vocab_size,
    train=_stack(builders.read_records(sources["train"], "tokens"), vocab_size),
    eval=_stack(builders.read_records(sources["validation"], "tokens", 0, num_eval), vocab_size),
    info=info,
    mixture=mixture,
  )


def _tfds_splits(data_cfg, data_dir: str, length: int, global_batch_size: int) -> _Splits:
  """Reads and packs a text feature of a prepared TFDS dataset."""
  from moejax.data import builders  # pylint: disable=g-import-not-at-top

  t = data_cfg.tfds
  train = builders.read_tfds_text(
    t.name, split=t.train_split, data_dir=data_dir, length=length, text_key=t.text_key, max_bytes=t.max_bytes
  )
  wanted = data_cfg.num_eval_batches * global_batch_size
  eval_rows = builders.read_tfds_text(
    t.name, split=t.eval_split, data_dir=data_dir, length=length, text_key=t.text_key, max_bytes=wanted * length
  )
  num_eval = _num_eval_batches(data_cfg, len(eval_rows), global_batch_size) * global_batch_size
  info = {"dataset": f"tfds:{t.name}[{t.train_split}] ({t.text_key!r} bytes)", "manifest": None}
  return _Splits(vocab_size=BYTE_VOCAB_SIZE, train=train, eval=eval_rows[:num_eval], info=info)


def unigram_loss(train_tokens: np.ndarray, eval_targets: np.ndarray, vocab_size: int) -> float:
  """Cross-entropy (nats) of the add-one smoothed training unigram on targets.

  Args:
    train_tokens: <int>[N, T] training sequences (all positions count).
    eval_targets: <int>[M, L] tokens to score.
    vocab_size: V.

  Returns:
    -mean log q(target), q(v) = (count(v) + 1) / (num_tokens + V).
  """
  counts = np.bincount(np.asarray(train_tokens).ravel(), minlength=vocab_size)
  log_q = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
  return float(-np.mean(log_q[np.asarray(eval_targets)]))


def _stack(rows: Sequence[np.ndarray], vocab_size: int) -> np.ndarray:
  """Rows -> one array in the smallest unsigned dtype that holds the ids.

  Splits are held in memory (ours are small by design: 20k x 129 Markov
  tokens are 2.6 MB as uint8): random batches are then one fancy-indexing
  read instead of one TFDS deserialisation per row.
  """
  dtype = np.uint8 if vocab_size <= 2**8 else (np.uint16 if vocab_size <= 2**16 else np.int32)
  return np.stack(rows).astype(dtype)


def _num_eval_batches(data_cfg, num_sequences: int, global_batch_size: int):
  """Requested eval batches, or as many full ones as the split holds."""
  available = num_sequences // global_batch_size
  if available < 1:
    raise ValueError(
      f"The eval split has {num_sequences} sequences, fewer than one global "
      f"batch of {global_batch_size}; raise data.markov.num_validation or "
      "data.text.max_bytes, or lower the batch size."
    )
  if available < data_cfg.num_eval_batches:
    logging.warning("Only %d eval batches available (asked for %d).", available, data_cfg.num_eval_batches)
  return min(available, data_cfg.num_eval_batches)


def _lm_example(tokens: np.ndarray) -> dict[str, np.ndarray]:
  """<int>[b, L+1] -> {'inputs', 'targets'}: <int32>[b, L] each."""
  tokens = np.asarray(tokens, np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def _train_dataset(tokens: np.ndarray, *, local_batch: int, seed: int, process_index: int, process_count: int):
  """grain.MapDataset whose item s is this process's part of global batch s.

  Args:
    tokens: <uint>[N, L+1], the training split in memory.
    local_batch: b, rows per process.
    seed: seed of the order.
    process_index, process_count: p and P.
  """
  import grain  # pylint: disable=g-import-not-at-top

  # Grain orders row indices; rows are gathered in one read per batch.
  rows = grain.MapDataset.range(len(tokens))
  rows = rows.shuffle(seed=seed % 2**32).repeat()  # New permutation per epoch.
  rows = rows.batch(local_batch, drop_remainder=True)  # <int64>[b] chunks.
  # Global batch s = chunks s*P .. s*P + P-1; this process takes chunk s*P + p.
  rows = rows[process_index::process_count]
  return rows.map(lambda index: _lm_example(tokens[index]))
