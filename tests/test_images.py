"""Tests of moejax.data.images: digits, determinism by step, process shards, TFDS by name.

The TFDS dataset is a test-only builder prepared as array_record in a tmp dir; nothing is
downloaded.
"""

import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from moejax.data import images


def _digits_cfg(**overrides):
  cfg = images.default_image_data_config()
  cfg.update(overrides)
  return cfg


def _rows(batches):
  """Each (image, label) row as bytes, sorted: a multiset to compare splits and epochs."""
  return sorted(b["images"][i].tobytes() + bytes([b["labels"][i]]) for b in batches for i in range(len(b["labels"])))


@pytest.fixture(scope="module")
def all_digits():
  from sklearn.datasets import load_digits

  digits = load_digits()
  return {"images": (digits.images / 16).astype(np.float32)[..., None], "labels": digits.target.astype(np.int32)}


def test_default_config():
  cfg = images.default_image_data_config()
  assert cfg.source == "digits" and cfg.source in images.SOURCES
  assert cfg.digits.eval_fraction == 0.2 and cfg.num_eval_batches == 0
  assert (cfg.tfds.image_key, cfg.tfds.label_key) == ("image", "label")


def test_digits_values_shapes_and_split(all_digits):
  data = images.make_image_data(_digits_cfg(), global_batch_size=64, seed=0)
  info = data.info
  # 0.2 · 1797 = 359.4 -> 359 held out; num_eval_batches=0 takes every full batch: 5 · 64.
  assert info["num_train"] == 1797 - 359 == 1438
  assert (info["num_eval_batches"], info["num_eval"]) == (5, 320)
  assert info["num_classes"] == data.num_classes == 10
  assert info["image_shape"] == data.image_shape == (8, 8, 1)
  assert info["chance_accuracy"] == 0.1
  batch = data.train_batch(0)
  assert batch["images"].shape == (64, 8, 8, 1) and batch["images"].dtype == np.float32
  assert batch["labels"].shape == (64,) and batch["labels"].dtype == np.int32
  evals = data.eval_batches()
  assert len(evals) == 5
  for b in [batch] + evals:
    # Pixel values 0..16 scaled by 1/16: exactly representable, in [0, 1].
    np.testing.assert_array_equal(b["images"] * 16, np.round(b["images"] * 16))
    assert b["images"].min() == 0 and b["images"].max() == 1
    assert set(b["labels"]) <= set(range(10))
  # Majority baseline, by hand: always answer the most frequent training label. With batches
  # of 1, the eval batches are the whole held-out split, and train = all digits minus it.
  held_out = np.concatenate(
    [b["labels"] for b in images.make_image_data(_digits_cfg(), global_batch_size=1, seed=0).eval_batches()]
  )
  assert len(held_out) == 359
  labels = np.concatenate([b["labels"] for b in evals])
  np.testing.assert_array_equal(labels, held_out[:320])
  train_counts = np.bincount(all_digits["labels"], minlength=10) - np.bincount(held_out, minlength=10)
  majority = train_counts.argmax()
  assert info["majority_class_accuracy"] == pytest.approx(np.mean(labels == majority))


def test_digits_split_is_a_fixed_partition(all_digits):
  # 1797 = 3 · 599: a third held out, so one batch of 599 is the whole eval split
  # and two batches are one epoch of the train split.
  cfg = _digits_cfg(digits=ml_collections.ConfigDict({"eval_fraction": 1 / 3}))
  data = images.make_image_data(cfg, global_batch_size=599, seed=0)
  assert (data.info["num_train"], data.info["num_eval"]) == (1198, 599)
  everything = _rows([all_digits])
  evals = data.eval_batches()
  epoch = [data.train_batch(0), data.train_batch(1)]
  assert sorted(_rows(evals) + _rows(epoch)) == everything
  # The split does not depend on the training seed.
  other = images.make_image_data(cfg, global_batch_size=599, seed=7)
  np.testing.assert_array_equal(other.eval_batches()[0]["images"], evals[0]["images"])
  # Each epoch is a new permutation of the same 1198 examples.
  next_epoch = [data.train_batch(2), data.train_batch(3)]
  assert _rows(next_epoch) == _rows(epoch)
  assert not np.array_equal(next_epoch[0]["labels"], epoch[0]["labels"])


def test_train_batches_are_a_function_of_the_step():
  data = images.make_image_data(_digits_cfg(), global_batch_size=16, seed=3)
  again = images.make_image_data(_digits_cfg(), global_batch_size=16, seed=3)
  stream = data.train_batches(0)
  first = [next(stream) for _ in range(12)]
  resumed = again.train_batches(5)
  for step in range(5, 12):
    b = next(resumed)
    for key in ("images", "labels"):
      np.testing.assert_array_equal(b[key], first[step][key])
      np.testing.assert_array_equal(data.train_batch(step)[key], first[step][key])
  other = images.make_image_data(_digits_cfg(), global_batch_size=16, seed=4)
  assert not np.array_equal(other.train_batch(0)["labels"], first[0]["labels"])


def test_process_rows_concatenate_to_the_global_batch():
  whole = images.make_image_data(_digits_cfg(num_eval_batches=3), global_batch_size=8, seed=3)
  parts = [
    images.make_image_data(
      _digits_cfg(num_eval_batches=3), global_batch_size=8, seed=3, process_index=p, process_count=2
    )
    for p in range(2)
  ]
  streams = [part.train_batches(4) for part in parts]
  for step in range(4, 10):
    local = [next(s) for s in streams]
    assert local[0]["images"].shape == (4, 8, 8, 1)
    for key in ("images", "labels"):
      np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), whole.train_batch(step)[key])
  assert len(whole.eval_batches()) == 3
  for i, batch in enumerate(whole.eval_batches()):
    for key in ("images", "labels"):
      np.testing.assert_array_equal(np.concatenate([p.eval_batches()[i][key] for p in parts]), batch[key])
  assert parts[1].info == whole.info
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    images.make_image_data(_digits_cfg(), global_batch_size=8, seed=0, process_count=3)


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match=r"data\.source='imagenet'.*digits, tfds"):
    images.make_image_data(
      ml_collections.ConfigDict({"source": "imagenet", "data_dir": ""}), global_batch_size=8, seed=0
    )
  with pytest.raises(ValueError, match="eval split has 359 examples, fewer than one global batch"):
    images.make_image_data(_digits_cfg(), global_batch_size=512, seed=0)
  with pytest.raises(ValueError, match=r"data\.digits\.eval_fraction=1\.0"):
    images.make_image_data(
      _digits_cfg(digits=ml_collections.ConfigDict({"eval_fraction": 1.0})), global_batch_size=8, seed=0
    )


# ---------------------------------------------------------------------------
# TFDS (a test-only dataset prepared in a tmp dir).
# ---------------------------------------------------------------------------


def _tiny_image(split_index, i):
  """<uint8>[4, 4, 3] image i of a split, every pixel identifying it."""
  return np.full((4, 4, 3), 100 * split_index + 7 * i, np.uint8) + np.arange(3, dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
  """Prepares 'moejax_test_tiny_images': 12 train and 8 test 4×4 RGB PNGs, labels i mod 3."""
  import PIL.Image
  import tensorflow_datasets as tfds

  class MoejaxTestTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    SIZES = {"train": 12, "test": 8}

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        disable_shuffling=True,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(4, 4, 3)),
            "label": tfds.features.ClassLabel(num_classes=3),
            "caption": tfds.features.Text(),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(s, n) for s, (split, n) in enumerate(self.SIZES.items())}

    def _generate_examples(self, split_index, num):
      for i in range(num):
        # Handed over as PIL images: TFDS encodes numpy arrays with TensorFlow only.
        yield i, {"image": PIL.Image.fromarray(_tiny_image(split_index, i)), "label": i % 3, "caption": f"image {i}"}

  data_dir = str(tmp_path_factory.mktemp("tfds_images"))
  MoejaxTestTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare(file_format="array_record")
  return data_dir


def _tfds_cfg(data_dir, **tfds_overrides):
  cfg = images.default_image_data_config()
  cfg.source = "tfds"
  cfg.data_dir = data_dir
  cfg.num_eval_batches = 2
  cfg.tfds.name = "moejax_test_tiny_images"
  cfg.tfds.update(tfds_overrides)
  return cfg


def test_tfds_by_name(tiny_images):
  data = images.make_image_data(_tfds_cfg(tiny_images), global_batch_size=4, seed=0)
  assert data.info["num_classes"] == 3 and data.image_shape == (4, 4, 3)
  assert (data.info["num_train"], data.info["num_eval"]) == (12, 8)
  assert data.info["dataset"] == "tfds:moejax_test_tiny_images[train|test]"
  assert data.info["data_dir"] == tiny_images
  # Eval batches: the test split in stored order, uint8 scaled by 1/255.
  evals = data.eval_batches()
  for i in range(8):
    np.testing.assert_allclose(evals[i // 4]["images"][i % 4], _tiny_image(1, i) / 255, rtol=1e-6)
    assert evals[i // 4]["labels"][i % 4] == i % 3
  # Labels 0, 1, 2 are equally frequent in train: the majority answer is 0 (the first argmax),
  # right on test images 0, 3, 6.
  assert data.info["majority_class_accuracy"] == 3 / 8
  epoch = [data.train_batch(s) for s in range(3)]
  expected = [
    {
      "images": np.stack([_tiny_image(0, i) / 255 for i in range(12)]).astype(np.float32),
      "labels": np.arange(12, dtype=np.int32) % 3,
    }
  ]
  assert _rows(epoch) == _rows(expected)
  # Split specs are TFDS's: half the test split is one eval batch.
  half = images.make_image_data(_tfds_cfg(tiny_images, eval_split="test[:50%]"), global_batch_size=4, seed=0)
  assert half.info["num_eval_batches"] == 1
  np.testing.assert_array_equal(half.eval_batches()[0]["images"], evals[0]["images"])


def test_tfds_refuses_unprepared_or_unfit_datasets(tiny_images, tmp_path):
  # mnist is a registered TFDS dataset, not prepared in an empty dir: refused, not downloaded.
  with pytest.raises(ValueError, match=r"'mnist' \(data\.tfds\.name\) in .* \(data\.data_dir\) is not prepared"):
    images.make_image_data(_tfds_cfg(str(tmp_path), name="mnist"), global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="not found"):
    images.make_image_data(_tfds_cfg(str(tmp_path), name="no_such_dataset_xyz"), global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match=r"no feature 'img' \(data\.tfds\.image_key\)"):
    images.make_image_data(_tfds_cfg(tiny_images, image_key="img"), global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match=r"'caption' \(data\.tfds\.label_key\) is a Text, not a ClassLabel"):
    images.make_image_data(_tfds_cfg(tiny_images, label_key="caption"), global_batch_size=4, seed=0)


def test_importing_is_cheap():
  # Configs import this module without scikit-learn, TFDS, grain or JAX.
  code = (
    "import sys, moejax.data.images; "
    'print(sorted({m.split(".")[0] for m in sys.modules} & '
    '{"tensorflow_datasets", "tensorflow", "grain", "jax", "sklearn"}))'
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    check=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert out.stdout.strip() == "[]"
