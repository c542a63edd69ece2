"""Tests of moejax.data: text corpus, TFDS builders, pipeline.

Hand-checked cases first, then the builders and the pipeline end to end
(prepared in tmp dirs; nothing is downloaded). The Markov mixture itself is
tested in test_data_markov.py.
"""

import hashlib
import importlib.util
import json
import math
import os
import sys

import ml_collections
import numpy as np
import pytest

from moejax.data import config as config_lib
from moejax.data import markov
from moejax.data import text_corpus

# ---------------------------------------------------------------------------
# Text corpus.
# ---------------------------------------------------------------------------


def test_pack_bytes_hand_checked():
  # Stream: a b \0 c d e \0  -> rows of 2: [a b] [\0 c] [d e], tail '\0' dropped.
  rows = text_corpus.pack_bytes([b"ab", b"cde"], 2)
  np.testing.assert_array_equal(rows, [[97, 98], [0, 99], [100, 101]])
  assert rows.dtype == np.uint8


def _write_tree(root):
  files = {
    "a.txt": b"alpha\n" * 10,
    "sub/b.py": b"print(1)\n" * 30,
    "sub/deeper/c.md": b"# c\n" * 7,
    "d.txt": b"d" * 300,
    ".hidden": b"secret",
    "sub/.cache/e.txt": b"skip me",
  }
  for rel, content in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
  return files


def test_manifest_is_deterministic_and_hashes_files(tmp_path):
  corpus_dir = tmp_path / "corp"
  files = _write_tree(corpus_dir)
  manifest = text_corpus.collect_files([str(corpus_dir)], max_bytes=10**6)
  again = text_corpus.collect_files([str(corpus_dir)], max_bytes=10**6)
  assert manifest.files == again.files and manifest.digest == again.digest
  # Hidden files and directories are skipped; paths start with the root name.
  assert [f["path"] for f in manifest.files] == ["corp/a.txt", "corp/d.txt", "corp/sub/b.py", "corp/sub/deeper/c.md"]
  for info in manifest.files:
    content = files[info["path"].removeprefix("corp/")]
    assert info["sha256"] == hashlib.sha256(content).hexdigest()
    assert info["bytes"] == len(content)
  # Both splits are non-empty (the fallback puts one file in validation).
  assert {f["split"] for f in manifest.files} == {"train", "validation"}
  digest = hashlib.sha256(
    json.dumps([(f["path"], f["bytes"], f["sha256"]) for f in manifest.files]).encode()
  ).hexdigest()
  assert manifest.digest == digest
  # Changing one byte of one file changes the digest.
  (corpus_dir / "a.txt").write_bytes(b"alpha\n" * 9 + b"alphA\n")
  assert text_corpus.collect_files([str(corpus_dir)], max_bytes=10**6).digest != manifest.digest


def test_max_bytes_caps_the_selection(tmp_path):
  _write_tree(tmp_path / "corp")
  # 300 (d.txt) + 270 (b.py) + 60 (a.txt) + 28 (c.md) bytes; 320 keeps some.
  manifest = text_corpus.collect_files([str(tmp_path / "corp")], max_bytes=320)
  total = sum(f["bytes"] for f in manifest.files)
  assert 0 < total <= 320 and len(manifest.files) < 4


def test_split_shorter_than_a_sequence_is_refused(tmp_path):
  _write_tree(tmp_path / "corp")
  with pytest.raises(ValueError, match="validation split.*max_bytes"):
    text_corpus.load_text_corpus([str(tmp_path / "corp")], length=100)


def test_glob_and_file_paths(tmp_path):
  _write_tree(tmp_path / "corp")
  manifest = text_corpus.collect_files([str(tmp_path / "corp" / "**" / "*.py"), str(tmp_path / "corp" / "a.txt")])
  assert [f["path"] for f in manifest.files] == ["a.txt", "corp/sub/b.py"]
  with pytest.raises(ValueError, match="No files"):
    text_corpus.collect_files([str(tmp_path / "nothing*.xyz")])


def test_default_corpus_is_stdlib_without_tests():
  manifest = text_corpus.collect_files(None, max_bytes=300_000)
  paths = [f["path"] for f in manifest.files]
  assert paths == sorted(paths) and len(paths) > 5
  assert all(p.endswith(".py") for p in paths)
  assert not any({"test", "tests", "site-packages"} & set(p.split("/")) for p in paths)
  assert 0 < sum(f["bytes"] for f in manifest.files) <= 300_000
  assert manifest.roots == [text_corpus.STDLIB]
  info, local = manifest.files[0], manifest.local_paths[0]
  with open(local, "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == info["sha256"]


def test_corpus_splits_are_the_split_files_concatenated(tmp_path):
  _write_tree(tmp_path / "corp")
  corpus = text_corpus.load_text_corpus([str(tmp_path / "corp")], length=16)
  for split, rows in (("train", corpus.train), ("validation", corpus.validation)):
    stream = b"".join(
      open(local, "rb").read() + b"\0"
      for info, local in zip(corpus.manifest.files, corpus.manifest.local_paths)
      if info["split"] == split
    )
    assert rows.shape == (len(stream) // 16, 16)
    assert rows.tobytes() == stream[: rows.size]


# ---------------------------------------------------------------------------
# TFDS builders (prepared without TensorFlow, in tmp dirs).
# ---------------------------------------------------------------------------

_MARKOV = dict(vocab_size=12, num_sources=3, branching=3, seed=5, num_train=80, num_validation=24)


def test_markov_builder_round_trips_samples(data_dir):
  from moejax.data import builders

  builder = builders.markov_builder(data_dir, length=9, **_MARKOV)
  sources = builders.prepare(builder)
  assert importlib.util.find_spec("tensorflow") is None
  assert "tensorflow" not in sys.modules
  mixture = markov.MarkovMixture(vocab_size=12, num_sources=3, branching=3, seed=5)
  for split, stream, num in (("train", 1, 80), ("validation", 2, 24)):
    tokens, source = mixture.sample(num, 9, seed=[5, stream])
    records = sources[split].__getitems__(list(range(num)))
    assert len(sources[split]) == num
    np.testing.assert_array_equal(np.stack([r["tokens"] for r in records]), tokens)
    np.testing.assert_array_equal([r["source"] for r in records], source)
  init_probs, transitions = builders.read_mixture_params(builder)
  np.testing.assert_array_equal(transitions, mixture.transitions)
  np.testing.assert_array_equal(init_probs, mixture.init_probs)
  # Preparing again reuses the files; other parameters get other files.
  files = sorted(os.listdir(builder.data_dir))
  mtimes = [os.path.getmtime(os.path.join(builder.data_dir, f)) for f in files]
  builders.prepare(builders.markov_builder(data_dir, length=9, **_MARKOV))
  assert mtimes == [os.path.getmtime(os.path.join(builder.data_dir, f)) for f in files]
  other = builders.markov_builder(data_dir, length=9, **{**_MARKOV, "branching": 2})
  assert other.data_dir != builder.data_dir and not other.is_prepared()


def test_prepare_survives_a_concurrent_preparation(tmp_path):
  from moejax.data import builders

  params = dict(_MARKOV, num_train=16, num_validation=8)
  mine = builders.markov_builder(str(tmp_path), length=5, **params)
  theirs = builders.markov_builder(str(tmp_path), length=5, **params)
  stale = builders.markov_builder(str(tmp_path), length=5, **params)

  def lose_the_race(**kwargs):
    # Another process finishes first; our rename onto its directory fails.
    builders.prepare(theirs)
    raise OSError("Directory not empty")

  mine.download_and_prepare = lose_the_race
  sources = builders.prepare(mine)
  assert len(sources["train"]) == 16 and len(sources["validation"]) == 8
  # Made before the files existed, a builder still reads them once prepared.
  assert len(builders.prepare(stale)["validation"]) == 8


def test_mixture_params_that_disagree_are_refused(tmp_path):
  from moejax.data import builders

  builder = builders.markov_builder(str(tmp_path), length=5, **_MARKOV)
  builders.prepare(builder)
  # As if another numpy had sampled the files from other parameters.
  path = os.path.join(builder.data_dir, builders.MIXTURE_FILE)
  stored = dict(np.load(path))
  stored["init_probs"] = stored["init_probs"][:, ::-1]
  np.savez(path, **stored)
  with pytest.raises(ValueError, match="other mixture parameters"):
    builders.read_mixture_params(builder)


def test_text_builder_round_trips_corpus_and_writes_manifest(data_dir, tmp_path):
  from moejax.data import builders

  _write_tree(tmp_path / "corp")
  paths = [str(tmp_path / "corp")]
  builder = builders.text_builder(data_dir, paths=paths, max_bytes=10**6, length=16)
  sources = builders.prepare(builder)
  corpus = text_corpus.load_text_corpus(paths, length=16)
  for split in ("train", "validation"):
    rows = np.stack(builders.read_records(sources[split], "tokens"))
    assert rows.dtype == np.int32
    np.testing.assert_array_equal(rows, getattr(corpus, split))
  manifest = builders.read_manifest(builder)
  assert manifest == json.loads(json.dumps(corpus.manifest.to_json_dict()))
  # Edited files are a different dataset.
  (tmp_path / "corp" / "a.txt").write_bytes(b"changed\n")
  assert builders.text_builder(data_dir, paths=paths, max_bytes=10**6, length=16).data_dir != builder.data_dir


def _tiny_text_builder_class():
  """A test-only TFDS dataset with a 'text' feature, like lm1b."""
  import tensorflow_datasets as tfds

  class MoejaxTestTinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    DOCS = {"train": ["héllo wörld", "second document", "x" * 40] * 10, "test": ["eval one", "eval two"] * 20}

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
      )

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(docs) for split, docs in self.DOCS.items()}

    def _generate_examples(self, docs):
      for i, doc in enumerate(docs):
        yield i, {"text": doc}

  return MoejaxTestTinyText


@pytest.fixture(scope="module")
def tiny_text(data_dir):
  cls = _tiny_text_builder_class()
  cls(data_dir=data_dir, file_format="array_record").download_and_prepare(file_format="array_record")
  return cls


def test_read_tfds_text_by_name(data_dir, tiny_text):
  from moejax.data import builders

  rows = builders.read_tfds_text("moejax_test_tiny_text", split="train", data_dir=data_dir, length=8)
  expected = text_corpus.pack_bytes([d.encode() for d in tiny_text.DOCS["train"]], 8)
  np.testing.assert_array_equal(rows, expected)
  capped = builders.read_tfds_text("moejax_test_tiny_text", split="train", data_dir=data_dir, length=8, max_bytes=40)
  np.testing.assert_array_equal(capped, expected[:5])


def test_read_tfds_text_refuses_to_download(data_dir, tiny_text, tmp_path):
  from moejax.data import builders

  # lm1b is a registered TFDS dataset, not prepared in an empty dir.
  with pytest.raises(ValueError, match=r"lm1b.*data\.tfds\.name.*data\.data_dir.*not prepared"):
    builders.read_tfds_text("lm1b", split="train", data_dir=str(tmp_path), length=8)
  with pytest.raises(ValueError, match="not found"):
    builders.read_tfds_text("no_such_dataset_xyz", split="train", data_dir=str(tmp_path), length=8)
  with pytest.raises(ValueError, match="no feature 'body'"):
    builders.read_tfds_text("moejax_test_tiny_text", split="train", data_dir=data_dir, length=8, text_key="body")


# ---------------------------------------------------------------------------
# Pipeline.
# ---------------------------------------------------------------------------


def _markov_cfg(data_dir):
  cfg = config_lib.default_data_config()
  cfg.data_dir = data_dir
  cfg.num_eval_batches = 2
  cfg.markov.update(_MARKOV)
  return cfg


def test_default_config_has_documented_defaults():
  cfg = config_lib.default_data_config()
  assert cfg.source == "markov_mixture" and cfg.source in config_lib.SOURCES
  assert (
    cfg.markov.vocab_size,
    cfg.markov.num_sources,
    cfg.markov.branching,
    cfg.markov.num_train,
    cfg.markov.num_validation,
  ) == (64, 8, 4, 20000, 512)


def test_unigram_loss_hand_checked():
  from moejax.data import pipeline

  # Counts of 0, 1, 2 in the training tokens: 2, 1, 0. Add-one: q = (3, 2, 1)/6.
  loss = pipeline.unigram_loss(np.array([[0, 0, 1]]), np.array([[0, 2]]), 3)
  assert loss == pytest.approx(-(math.log(3 / 6) + math.log(1 / 6)) / 2)


def test_train_batches_are_a_function_of_the_step(data_dir):
  from moejax.data import pipeline

  data = pipeline.make_lm_data(_markov_cfg(data_dir), seq_len=8, global_batch_size=8, seed=3)
  assert data.vocab_size == 12 and data.seq_len == 8
  stream = data.train_batches(0)
  first = [next(stream) for _ in range(25)]  # 10 batches per epoch of 80.
  for batch in first:
    assert batch["inputs"].shape == (8, 8) and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  resumed = data.train_batches(13)
  for step in range(13, 25):
    np.testing.assert_array_equal(next(resumed)["inputs"], first[step]["inputs"])
  np.testing.assert_array_equal(data.train_batch(21)["targets"], first[21]["targets"])
  # Each epoch is a permutation of the 80 training sequences, reshuffled.
  from moejax.data import builders

  train = np.stack(
    builders.read_records(builders.prepare(builders.markov_builder(data_dir, length=9, **_MARKOV))["train"], "tokens")
  )

  def epoch(e):  # The 80 sequences of batches 10e .. 10e+9.
    return np.concatenate([np.concatenate([b["inputs"][:, :1], b["targets"]], 1) for b in first[10 * e : 10 * e + 10]])

  as_multiset = lambda rows: sorted(r.tobytes() for r in rows.astype(np.int32))
  assert as_multiset(epoch(0)) == as_multiset(epoch(1)) == as_multiset(train)
  assert not np.array_equal(epoch(0), epoch(1))
  # Another seed, another order.
  other = pipeline.make_lm_data(_markov_cfg(data_dir), seq_len=8, global_batch_size=8, seed=4)
  assert not np.array_equal(other.train_batch(0)["inputs"], first[0]["inputs"])


def test_process_shards_concatenate_to_the_global_batch(data_dir):
  from moejax.data import pipeline

  cfg = _markov_cfg(data_dir)
  whole = pipeline.make_lm_data(cfg, seq_len=8, global_batch_size=8, seed=3)
  parts = [
    pipeline.make_lm_data(cfg, seq_len=8, global_batch_size=8, seed=3, process_index=p, process_count=2)
    for p in range(2)
  ]
  streams = [part.train_batches(4) for part in parts]
  for step in range(4, 16):
    local = [next(s) for s in streams]
    assert local[0]["inputs"].shape == (4, 8)
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), whole.train_batch(step)[key])
  for i, batch in enumerate(whole.eval_batches()):
    np.testing.assert_array_equal(np.concatenate([p.eval_batches()[i]["inputs"] for p in parts]), batch["inputs"])
  assert parts[1].info["bayes_floor"] == whole.info["bayes_floor"]


def test_info_floors_match_direct_computation(data_dir):
  from moejax.data import builders, pipeline

  data = pipeline.make_lm_data(_markov_cfg(data_dir), seq_len=8, global_batch_size=8, seed=0)
  evals = data.eval_batches()
  assert len(evals) == 2 and data.info["num_eval_batches"] == 2
  assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(evals, data.eval_batches()))
  tokens = np.concatenate([np.concatenate([b["inputs"][:, :1], b["targets"]], 1) for b in evals])
  # The eval batches are the first validation sequences, in stored order.
  mixture = markov.MarkovMixture(vocab_size=12, num_sources=3, branching=3, seed=5)
  np.testing.assert_array_equal(tokens, mixture.sample(24, 9, seed=[5, 2])[0][:16])
  assert data.info["bayes_floor"] == pytest.approx(mixture.bayes_floor(tokens), rel=1e-12)
  train = np.stack(
    builders.read_records(builders.prepare(builders.markov_builder(data_dir, length=9, **_MARKOV))["train"], "tokens")
  )
  counts = np.array([(train == v).sum() for v in range(12)])
  q = (counts + 1) / (counts.sum() + 12)
  targets = np.concatenate([b["targets"] for b in evals])
  assert data.info["unigram_loss"] == pytest.approx(-np.mean(np.log(q[targets])), rel=1e-12)
  assert data.info["bayes_floor"] < data.info["unigram_loss"]
  assert data.info["num_train_sequences"] == 80
  assert data.info["manifest"] is None
  assert data.info["dataset"].startswith("moejax_markov_mixture/v12_k3_b3_s5")


def test_text_bytes_source(data_dir, tmp_path):
  from moejax.data import pipeline

  _write_tree(tmp_path / "corp")
  cfg = config_lib.default_data_config()
  cfg.source = "text_bytes"
  cfg.data_dir = data_dir
  cfg.num_eval_batches = 1
  cfg.text.paths = f" {tmp_path / 'corp'} ,"
  data = pipeline.make_lm_data(cfg, seq_len=7, global_batch_size=2, seed=0)
  assert data.vocab_size == 256 and data.info["bayes_floor"] is None
  manifest = text_corpus.collect_files([str(tmp_path / "corp")])
  assert data.info["manifest"]["digest"] == manifest.digest
  corpus = text_corpus.load_text_corpus([str(tmp_path / "corp")], length=8)
  np.testing.assert_array_equal(data.eval_batches()[0]["inputs"], corpus.validation[:2, :-1])
  assert next(data.train_batches(0))["inputs"].shape == (2, 7)


def test_tfds_source(data_dir, tiny_text):
  from moejax.data import pipeline

  cfg = config_lib.default_data_config()
  cfg.source = "tfds"
  cfg.data_dir = data_dir
  cfg.num_eval_batches = 2
  cfg.tfds.name = "moejax_test_tiny_text"
  data = pipeline.make_lm_data(cfg, seq_len=7, global_batch_size=4, seed=0)
  assert data.vocab_size == 256 and data.info["num_eval_batches"] == 2
  eval_stream = text_corpus.pack_bytes([d.encode() for d in tiny_text.DOCS["test"]], 8)
  np.testing.assert_array_equal(data.eval_batches()[1]["targets"], eval_stream[4:8, 1:])
  cfg.tfds.name = "lm1b"
  cfg.data_dir = data_dir + "/empty"
  with pytest.raises(ValueError, match="not prepared"):
    pipeline.make_lm_data(cfg, seq_len=7, global_batch_size=4, seed=0)


def test_unknown_source_is_refused():
  from moejax.data import pipeline

  cfg = ml_collections.ConfigDict({"source": "imagenet", "data_dir": ""})
  with pytest.raises(ValueError, match="data.source='imagenet'.*markov_mixture"):
    pipeline.make_lm_data(cfg, seq_len=8, global_batch_size=8, seed=0)


@pytest.mark.parametrize("module", ["moejax.data", "moejax.data.markov", "moejax.data.text_corpus"])
def test_importing_is_cheap(module):
  # Models and configs import moejax.data without TFDS, grain or JAX.
  import subprocess

  code = (
    f"import sys, {module}; "
    'print(sorted({m.split(".")[0] for m in sys.modules} & '
    '{"tensorflow_datasets", "tensorflow", "grain", "jax"}))'
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    check=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert out.stdout.strip() == "[]"
