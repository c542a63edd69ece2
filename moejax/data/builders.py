"""TFDS builders for moejax's own datasets, stored as array_record.

Two builders, prepared locally (nothing is downloaded):
  * `moejax_markov_mixture`: sequences sampled from `markov.MarkovMixture`;
    the mixture's parameters are saved next to the data as `mixture.npz`.
  * `moejax_text_bytes`: byte sequences of local files (`text_corpus`); the
    corpus manifest is written next to the data as `manifest.json`.

Every parameter of a dataset, and for text the corpus digest, goes into the
builder config's name (readable fields plus a short hash), so datasets with
different parameters or different file contents never share prepared files.
Preparation writes into a temporary directory that TFDS renames at the end,
so an interrupted or concurrent preparation never leaves a half dataset that
looks prepared.

Reading uses `as_data_source` (random access, numpy, no TensorFlow); array
record is the only format that allows it without TensorFlow.

Also: `read_tfds_text` reads any other prepared TFDS dataset with a text
feature (e.g. lm1b) and packs it into byte sequences; it never downloads.

This module imports tensorflow_datasets at import time (the builders subclass
its classes); `moejax.data` imports it lazily.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from moejax.data import markov
from moejax.data import text_corpus

SPLITS = ("train", "validation")
MANIFEST_FILE = "manifest.json"
MIXTURE_FILE = "mixture.npz"
# Records are read this many at a time (one batched array_record read).
_READ_CHUNK = 4096


def _short_hash(params: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


@dataclasses.dataclass(eq=False)
class MarkovMixtureConfig(tfds.core.BuilderConfig):
  """Parameters of a prepared Markov-mixture dataset (see `markov_builder`)."""

  vocab_size: int = 64
  num_sources: int = 8
  branching: int = 4
  seed: int = 0
  num_train: int = 20_000
  num_validation: int = 512
  length: int = 129

  @property
  def mixture(self) -> markov.MarkovMixture:
    return markov.MarkovMixture(
      vocab_size=self.vocab_size, num_sources=self.num_sources, branching=self.branching, seed=self.seed
    )


class MarkovMixtureBuilder(tfds.core.GeneratorBasedBuilder):
  """Sequences from a mixture of Markov sources; see `markov.py`.

  Train and validation are sampled with seeds [seed, 1] and [seed, 2] (the
  mixture parameters use `seed` itself), in sample order.
  """

  name = "moejax_markov_mixture"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}

  def _info(self) -> tfds.core.DatasetInfo:
    length = self.builder_config.length
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"Markov mixture {self.builder_config.mixture}",
      features=tfds.features.FeaturesDict(
        {
          "tokens": tfds.features.Tensor(shape=(length,), dtype=np.int32),
          "source": tfds.features.Scalar(dtype=np.int32),
        }
      ),
      # Keep sample order: the first validation records are the eval set.
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    # The parameters that generated the tokens, saved with them (self.data_dir
    # is TFDS's temporary directory here): `read_mixture_params` checks them,
    # so a numpy whose samplers changed cannot silently pair these tokens
    # with other parameters (and a wrong Bayes floor).
    with (epath.Path(self.data_dir) / MIXTURE_FILE).open("wb") as f:
      np.savez(f, init_probs=cfg.mixture.init_probs, transitions=cfg.mixture.transitions)
    return {
      "train": self._generate_examples(cfg.num_train, 1),
      "validation": self._generate_examples(cfg.num_validation, 2),
    }

  def _generate_examples(self, num_seqs: int, stream: int):
    cfg = self.builder_config
    tokens, source = cfg.mixture.sample(num_seqs, cfg.length, seed=[cfg.seed, stream])
    for i in range(num_seqs):
      yield i, {"tokens": tokens[i], "source": source[i]}


def markov_builder(
  data_dir: str,
  *,
  vocab_size: int,
  num_sources: int,
  branching: int,
  seed: int,
  num_train: int,
  num_validation: int,
  length: int,
) -> MarkovMixtureBuilder:
  """The (not necessarily prepared) builder of one Markov-mixture dataset.

  Args:
    data_dir: TFDS data directory.
    vocab_size, num_sources, branching, seed: the `markov.MarkovMixture`.
    num_train, num_validation: sequences per split.
    length: tokens per sequence (L+1 for a model of input length L).
  """
  params = dict(
    vocab_size=vocab_size,
    num_sources=num_sources,
    branching=branching,
    seed=seed,
    num_train=num_train,
    num_validation=num_validation,
    length=length,
  )
  name = (
    f"v{vocab_size}_k{num_sources}_b{branching}_s{seed}_l{length}_n{num_train}_m{num_validation}_{_short_hash(params)}"
  )
  config = MarkovMixtureConfig(name=name, description=json.dumps(params), **params)
  return MarkovMixtureBuilder(config=config, data_dir=data_dir, file_format="array_record")


@dataclasses.dataclass(eq=False)
class TextBytesConfig(tfds.core.BuilderConfig):
  """Parameters of a prepared byte-level text dataset (see `text_builder`)."""

  paths: tuple[str, ...] = ()
  max_bytes: int = text_corpus.DEFAULT_MAX_BYTES
  length: int = 129
  manifest: text_corpus.Manifest | None = dataclasses.field(default=None, repr=False)


class TextBytesBuilder(tfds.core.GeneratorBasedBuilder):
  """Byte sequences of local text files; see `text_corpus.py`."""

  name = "moejax_text_bytes"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}

  def _info(self) -> tfds.core.DatasetInfo:
    length = self.builder_config.length
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"Bytes of {list(self.builder_config.paths) or 'stdlib'}",
      features=tfds.features.FeaturesDict({"tokens": tfds.features.Tensor(shape=(length,), dtype=np.int32)}),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    corpus = text_corpus.load_text_corpus(manifest=cfg.manifest, length=cfg.length)
    # self.data_dir is TFDS's temporary directory here, renamed on success, so
    # the manifest appears together with the data.
    manifest_path = epath.Path(self.data_dir) / MANIFEST_FILE
    manifest_path.write_text(json.dumps(corpus.manifest.to_json_dict(), indent=1))
    return {"train": self._generate_examples(corpus.train), "validation": self._generate_examples(corpus.validation)}

  def _generate_examples(self, rows: np.ndarray):
    for i, row in enumerate(rows):
      yield i, {"tokens": row.astype(np.int32)}


def text_builder(data_dir: str, *, paths: Sequence[str] | None, max_bytes: int, length: int) -> TextBytesBuilder:
  """The (not necessarily prepared) builder of one byte-level text dataset.

  Collects and hashes the files now (tens of ms for 8 MiB): the config name
  includes the corpus digest, so edited files give a new dataset.

  Args:
    data_dir: TFDS data directory.
    paths, max_bytes: as in `text_corpus.collect_files`.
    length: bytes per sequence (L+1 for a model of input length L).
  """
  paths = tuple(paths or ())
  manifest = text_corpus.collect_files(paths, max_bytes=max_bytes)
  params = dict(paths=paths, max_bytes=max_bytes, length=length, digest=manifest.digest)
  name = f"l{length}_{_short_hash(params)}"
  config = TextBytesConfig(
    name=name, description=json.dumps(params), paths=paths, max_bytes=max_bytes, length=length, manifest=manifest
  )
  return TextBytesBuilder(config=config, data_dir=data_dir, file_format="array_record")


def prepare(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """Prepares `builder` unless already prepared; returns its data sources.

  Safe to call from several processes sharing `data_dir`: each one writes a
  private temporary directory; a process that loses the final rename finds
  the winner's copy prepared and reads that.

  Returns:
    {'train': source, 'validation': source}; a source supports len(), [i]
    and batched reads, and yields dicts of numpy values (e.g. 'tokens').
  """
  if not builder.is_prepared():
    print(
      f"preparing {builder.name}/{builder.builder_config.name} in {builder.data_dir} (once; later runs reuse it)",
      flush=True,
    )
    tfds.disable_progress_bar()  # Progress bars would drown the trainer's console lines.
    try:
      builder.download_and_prepare(file_format="array_record")
    except OSError:
      # Another process may have renamed its directory into place first.
      if not builder.is_prepared():
        raise
      logging.info("%s was prepared by another process", builder.data_dir)
  # Reopen (cheap: reads dataset_info.json): if another process prepared the files after this
  # builder was made, its DatasetInfo does not know their splits.
  builder = type(builder)(
    config=builder.builder_config, data_dir=os.fspath(builder.data_dir_root), file_format="array_record"
  )
  return {split: builder.as_data_source(split) for split in SPLITS}


def read_manifest(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """The manifest.json that a prepared text dataset was built from."""
  return json.loads((epath.Path(builder.data_dir) / MANIFEST_FILE).read_text())


def read_mixture_params(builder: MarkovMixtureBuilder) -> tuple[np.ndarray, np.ndarray]:
  """(init_probs [K, V], transitions [K, V, V]) stored with a prepared dataset.

  Raises:
    ValueError: if they differ from the parameters recomputed from the config
      (the dataset was prepared with a numpy whose samplers differ).
  """
  with (epath.Path(builder.data_dir) / MIXTURE_FILE).open("rb") as f:
    stored = np.load(f)
    init_probs, transitions = stored["init_probs"], stored["transitions"]
  mixture = builder.builder_config.mixture
  if not (np.array_equal(init_probs, mixture.init_probs) and np.array_equal(transitions, mixture.transitions)):
    raise ValueError(
      f"{builder.data_dir} was sampled from other mixture parameters than "
      f"this numpy ({np.__version__}) builds from its config; delete it to "
      "prepare it again."
    )
  return init_probs, transitions


def read_records(source, key: str, start: int = 0, stop: int | None = None) -> list[Any]:
  """Feature `key` of records [start, stop) of a data source, in order."""
  stop = len(source) if stop is None else min(stop, len(source))
  out = []
  for lo in range(start, stop, _READ_CHUNK):
    indices = list(range(lo, min(lo + _READ_CHUNK, stop)))
    out.extend(record[key] for record in source.__getitems__(indices))
  return out


def prepared_builder(name: str, data_dir: str):
  """(builder, where) of a TFDS dataset already prepared in data_dir; never downloads.

  Raises:
    ValueError: naming data.tfds.name and data.data_dir, if it is unknown or not prepared.
  """
  where = f"{name!r} (data.tfds.name) in {data_dir!r} (data.data_dir)"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"TFDS dataset {where} not found: prepare it there first (array_record format).") from e
  if not builder.is_prepared():
    raise ValueError(
      f"TFDS dataset {where} is not prepared; moejax never "
      "downloads: prepare it there first with "
      "file_format='array_record'."
    )
  return builder, where


def read_tfds_text(
  name: str, *, split: str, data_dir: str | None, length: int, text_key: str = "text", max_bytes: int = 0
) -> np.ndarray:
  """Byte sequences from a text feature of an already prepared TFDS dataset.

  Documents are read in stored order, each followed by `text_corpus.SEPARATOR`
  and cut into rows of `length` bytes, like the text corpus. Never downloads.

  Args:
    name: TFDS name, optionally with config/version ('lm1b', 'x/cfg:1.0.0').
    split: TFDS split spec, e.g. 'train' or 'test[:10%]'.
    data_dir: where the dataset is prepared (in array_record format).
    length: bytes per row.
    text_key: the text feature.
    max_bytes: stop reading documents once this many bytes are packed
      (0 = read the whole split).

  Returns:
    <uint8>[N, length].

  Raises:
    ValueError: if the dataset is not prepared there, or has no `text_key`.
  """
  builder, where = prepared_builder(name, data_dir)
  features = builder.info.features
  if text_key not in features:
    raise ValueError(f"{where} has no feature {text_key!r} (data.tfds.text_key); it has {list(features)}")
  try:
    source = builder.as_data_source(split)
  except NotImplementedError as e:
    raise ValueError(f"{where}: random access needs array_record files") from e
  documents, total = [], 0
  for lo in range(0, len(source), _READ_CHUNK):
    for text in read_records(source, text_key, lo, lo + _READ_CHUNK):
      doc = text.encode("utf-8") if isinstance(text, str) else bytes(text)
      documents.append(doc)
      total += len(doc) + 1
    if max_bytes and total >= max_bytes:
      break
  stream_rows = text_corpus.pack_bytes(documents, length)
  if max_bytes:
    stream_rows = stream_rows[: max_bytes // length]
  return stream_rows
