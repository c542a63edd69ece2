"""Image-classification batches for the trainer: `make_image_data(config.data, ...)`.

Same contract as `pipeline.make_lm_data`: the order of training examples is a
pure function of (seed, step) (a grain MapDataset of row indices, shuffled
with a new permutation each epoch, repeated and cut into batches, read by
index), and process p of P reads rows [p*b, (p+1)*b) of each global batch.

Splits are held in memory as they are stored (uint8 for TFDS images: MNIST's
train split is 47 MB, CIFAR-10's 154 MB) and scaled to float32 in [0, 1] per
batch.

Sources ('data.source'):
  * digits: scikit-learn's `load_digits()`, 1797 8×8 grey images with values
    0..16, shipped inside the package (no download); split into train and
    eval by a fixed permutation (`digits.eval_fraction`).
  * tfds: an already prepared TFDS dataset (array_record) with an image and a
    class-label feature, e.g. 'mnist' or 'cifar10'. moejax never downloads:
    prepare it in data.data_dir first. PNG/JPEG images are decoded with
    Pillow (or OpenCV) as TFDS reads them without TensorFlow.

Only ml_collections, numpy and `pipeline` are imported with this module; scikit-learn,
tensorflow_datasets and grain only when data is made.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ml_collections
import numpy as np

from moejax.data import pipeline

# Allowed values of `config.data.source` for image models.
SOURCES = ("digits", "tfds")
# The digits train/eval split is part of the dataset's definition, not of the run.
_DIGITS_SPLIT_SEED = 0
# TFDS records are decoded this many at a time.
_READ_CHUNK = 4096


def default_image_data_config() -> ml_collections.ConfigDict:
  """Returns the `data` section of an image-classification experiment.

  Fields:
    source: one of SOURCES.
    data_dir: where TFDS datasets are prepared; '' means $MOEJAX_DATA_DIR,
      else ~/.cache/moejax/tensorflow_datasets (`pipeline.resolve_data_dir`).
    num_eval_batches: fixed eval batches (the first eval examples, in stored
      order); 0 = every full global batch the eval split holds.
    digits.eval_fraction: share of the 1797 digits held out for eval.
    tfds: name (optionally 'name/config:version'), the train and eval split
      specs (e.g. 'test[:50%]'), and the image and label feature keys. The
      label must be a ClassLabel; the image must have a fixed shape [H, H, C]
      and dtype uint8 (scaled by 1/255) or float32 (taken as given).
  """
  cfg = ml_collections.ConfigDict()
  cfg.source = "digits"
  cfg.data_dir = ""
  cfg.num_eval_batches = 0

  cfg.digits = ml_collections.ConfigDict()
  cfg.digits.eval_fraction = 0.2

  cfg.tfds = ml_collections.ConfigDict()
  cfg.tfds.name = "mnist"
  cfg.tfds.train_split = "train"
  cfg.tfds.eval_split = "test"
  cfg.tfds.image_key = "image"
  cfg.tfds.label_key = "label"
  return cfg


@dataclasses.dataclass
class ImageData(pipeline.StepBatches):
  """Batches of one image dataset for one process.

  Batches are dicts {'images': <float32>[b, H, W, C] in [0, 1],
  'labels': <int32>[b] in [0, num_classes)} of numpy arrays,
  b = global_batch_size // process_count, this process's rows.

  Attributes:
    num_classes: K.
    image_shape: (H, W, C).
    global_batch_size: B, rows of a batch summed over processes.
    info: 'dataset' (readable name), 'num_classes', 'image_shape',
      'num_train' (training examples), 'num_eval' (examples in the eval
      batches, all processes), 'num_eval_batches', 'chance_accuracy'
      (1/K), 'majority_class_accuracy' (eval accuracy of always answering
      the most frequent training label), 'data_dir'.
  """

  num_classes: int
  image_shape: tuple[int, int, int]
  global_batch_size: int
  info: dict[str, Any]
  _train: Any = dataclasses.field(repr=False)  # grain.MapDataset of batches.
  _eval: list[dict[str, np.ndarray]] = dataclasses.field(repr=False)


@dataclasses.dataclass
class _Split:
  """One split in memory: images <uint8|float32>[N, H, W, C], labels <int32>[N]."""

  images: np.ndarray
  labels: np.ndarray
  scale: float  # images / scale is in [0, 1].

  def batch(self, index) -> dict[str, np.ndarray]:
    return {"images": self.images[index].astype(np.float32) / np.float32(self.scale), "labels": self.labels[index]}


def make_image_data(
  data_cfg, *, global_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
) -> ImageData:
  """Opens the image dataset that `data_cfg` describes.

  Args:
    data_cfg: `default_image_data_config()`-like object (attribute access).
    global_batch_size: B, divisible by process_count.
    seed: seed of the training order.
    process_index, process_count: this process and how many read the data.

  Returns:
    An ImageData; its batches hold this process's rows only, while `info` is
    about the global eval batches (identical in every process).

  Raises:
    ValueError: unknown data.source, bad batch size, too little data, or a
      TFDS dataset that is not prepared or does not fit.
  """
  if data_cfg.source not in SOURCES:
    raise ValueError(f"Unknown data.source={data_cfg.source!r}; allowed for image models: {', '.join(SOURCES)}")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}")
  data_dir = pipeline.resolve_data_dir(data_cfg.data_dir)
  if data_cfg.source == "digits":
    train, evals, num_classes, name = _digits_splits(data_cfg.digits.eval_fraction)
  else:
    train, evals, num_classes, name = _tfds_splits(data_cfg.tfds, data_dir)
  if len(train.labels) < global_batch_size:
    raise ValueError(f"{name}: {len(train.labels)} training examples, fewer than one batch of {global_batch_size}")
  num_eval_batches = _num_eval_batches(data_cfg.num_eval_batches, len(evals.labels), global_batch_size)
  num_eval = num_eval_batches * global_batch_size
  majority = np.bincount(train.labels, minlength=num_classes).argmax()
  info = {
    "dataset": name,
    "num_classes": num_classes,
    "image_shape": tuple(train.images.shape[1:]),
    "num_train": len(train.labels),
    "num_eval": num_eval,
    "num_eval_batches": num_eval_batches,
    "chance_accuracy": 1.0 / num_classes,
    "majority_class_accuracy": float(np.mean(evals.labels[:num_eval] == majority)),
    "data_dir": data_dir if data_cfg.source == "tfds" else None,
  }

  local_batch = global_batch_size // process_count
  eval_batches = [
    evals.batch(np.arange(start + process_index * local_batch, start + (process_index + 1) * local_batch))
    for start in range(0, num_eval, global_batch_size)
  ]
  logging.info("Image data %s: %s", name, info)
  return ImageData(
    num_classes=num_classes,
    image_shape=info["image_shape"],
    global_batch_size=global_batch_size,
    info=info,
    _train=_train_dataset(
      train, local_batch=local_batch, seed=seed, process_index=process_index, process_count=process_count
    ),
    _eval=eval_batches,
  )


def _digits_splits(eval_fraction: float) -> tuple[_Split, _Split, int, str]:
  """scikit-learn's 8×8 digits, split by a fixed permutation; each split in stored order."""
  if not 0 < eval_fraction < 1:
    raise ValueError(f"data.digits.eval_fraction={eval_fraction} is not in (0, 1)")
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = digits.images.astype(np.uint8)[..., None]  # [1797, 8, 8, 1], values 0..16
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(labels))
  num_eval = round(len(labels) * eval_fraction)
  eval_rows, train_rows = np.sort(order[:num_eval]), np.sort(order[num_eval:])
  split = lambda rows: _Split(images[rows], labels[rows], scale=16.0)
  return (split(train_rows), split(eval_rows), 10, f"sklearn_digits_8x8 (eval_fraction={eval_fraction})")


def _tfds_splits(t, data_dir: str) -> tuple[_Split, _Split, int, str]:
  """Reads the image and label features of both splits of a prepared TFDS dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from moejax.data import builders  # pylint: disable=g-import-not-at-top

  builder, where = builders.prepared_builder(t.name, data_dir)
  features = builder.info.features
  for key, field in ((t.image_key, "image_key"), (t.label_key, "label_key")):
    if key not in features:
      raise ValueError(f"{where} has no feature {key!r} (data.tfds.{field}); it has {list(features)}")
  image, label = features[t.image_key], features[t.label_key]
  shape, dtype = tuple(image.shape), np.dtype(image.np_dtype)
  if len(shape) != 3 or None in shape or shape[0] != shape[1]:
    raise ValueError(
      f"{where}: images of shape {shape}; the ViT needs a fixed square [H, H, C] (resize when preparing the dataset)"
    )
  if dtype not in (np.uint8, np.float32):
    raise ValueError(f"{where}: images of dtype {dtype}; need uint8 or float32")
  if not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(
      f"{where}: feature {t.label_key!r} (data.tfds.label_key) is a {type(label).__name__}, not a ClassLabel"
    )

  def read(split: str) -> _Split:
    try:
      source = tfds.data_source(t.name, split=split, data_dir=data_dir, download=False)
    except NotImplementedError as e:
      raise ValueError(f"{where}: random access needs array_record files") from e
    images, labels = [], []
    for lo in range(0, len(source), _READ_CHUNK):
      for record in source.__getitems__(list(range(lo, min(lo + _READ_CHUNK, len(source))))):
        images.append(record[t.image_key])
        labels.append(record[t.label_key])
    if not labels:
      raise ValueError(f"{where}: split {split!r} is empty")
    return _Split(
      np.stack(images).astype(dtype), np.asarray(labels, np.int32), scale=255.0 if dtype == np.uint8 else 1.0
    )

  name = f"tfds:{t.name}[{t.train_split}|{t.eval_split}]"
  return read(t.train_split), read(t.eval_split), label.num_classes, name


def _num_eval_batches(requested: int, num_examples: int, global_batch_size: int) -> int:
  """Requested eval batches (0: all), or as many full ones as the split holds."""
  available = num_examples // global_batch_size
  if available < 1:
    raise ValueError(
      f"The eval split has {num_examples} examples, fewer than one global "
      f"batch of {global_batch_size}; raise data.digits.eval_fraction or "
      "use a larger data.tfds.eval_split, or lower the batch size."
    )
  if requested > available:
    logging.warning("Only %d eval batches available (asked for %d).", available, requested)
  return min(available, requested) if requested else available


def _train_dataset(train: _Split, *, local_batch: int, seed: int, process_index: int, process_count: int):
  """grain.MapDataset whose item s is this process's part of global batch s.

  The same index arithmetic as `pipeline._train_dataset`, with image rows.
  """
  import grain  # pylint: disable=g-import-not-at-top

  rows = grain.MapDataset.range(len(train.labels))
  rows = rows.shuffle(seed=seed % 2**32).repeat()  # New permutation per epoch.
  rows = rows.batch(local_batch, drop_remainder=True)  # <int64>[b] chunks.
  # Global batch s = chunks s*P .. s*P + P-1; this process takes chunk s*P + p.
  rows = rows[process_index::process_count]
  return rows.map(train.batch)
