"""moejax: Mixture-of-Experts research in JAX and Flax NNX.

Layering (imports point one way): dispatch <- routing <- layers <- models <- train/main.
`moejax.data` is imported lazily by the trainer so that models import without TFDS/grain.
"""

__version__ = "0.1.0"
