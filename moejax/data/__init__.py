"""Datasets for language-model training.

Modules:
  config: `default_data_config()`, the `config.data` section.
  markov: a synthetic mixture of Markov sources with an exact Bayes loss floor.
  text_corpus: byte-level corpus of local text files, with a manifest.
  builders: TFDS builders (array_record) for both, and reading prepared TFDS
    text datasets. Imports tensorflow_datasets.
  pipeline: `make_lm_data(config.data, ...)`, deterministic grain batches.

Importing this package is cheap: tensorflow_datasets and grain are imported
only by `builders` and when `pipeline.make_lm_data` runs.
"""

from moejax.data.config import default_data_config
from moejax.data.pipeline import LMData, make_lm_data
