"""Default `config.data` for language-model training.

Kept free of tfds/grain imports so that configs load anywhere.
"""

import ml_collections

# Allowed values of `config.data.source`.
SOURCES = ("markov_mixture", "text_bytes", "tfds")


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the `data` section of an experiment config.

  Fields:
    source: one of SOURCES.
    data_dir: where TFDS datasets are prepared and read; '' means
      $MOEJAX_DATA_DIR, else ~/.cache/moejax/tensorflow_datasets.
    num_eval_batches: fixed validation batches evaluated each time (fewer if
      the validation split does not hold that many full global batches).
    markov: the synthetic mixture of Markov sources (`markov.MarkovMixture`)
      and how many sequences each split holds.
    text: byte-level corpus of local files; paths is comma-separated files,
      directories or globs ('' = this machine's Python standard library).
    tfds: any prepared TFDS dataset with a text feature, byte-tokenized and
      packed; max_bytes caps how much of each split is read (0 = no cap).
  """
  cfg = ml_collections.ConfigDict()
  cfg.source = "markov_mixture"
  cfg.data_dir = ""
  cfg.num_eval_batches = 4

  cfg.markov = ml_collections.ConfigDict()
  cfg.markov.vocab_size = 64
  cfg.markov.num_sources = 8
  cfg.markov.branching = 4
  cfg.markov.seed = 0
  cfg.markov.num_train = 20_000
  cfg.markov.num_validation = 512

  cfg.text = ml_collections.ConfigDict()
  cfg.text.paths = ""
  cfg.text.max_bytes = 8 * 2**20

  cfg.tfds = ml_collections.ConfigDict()
  cfg.tfds.name = "lm1b"
  cfg.tfds.train_split = "train"
  cfg.tfds.eval_split = "test"
  cfg.tfds.text_key = "text"
  cfg.tfds.max_bytes = 64 * 2**20
  return cfg
