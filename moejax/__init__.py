"""moejax: Mixture-of-Experts research in JAX and Flax NNX.

Layering (imports point one way): kernels <- routing <- dispatch <- layers (with parallel beside
them) <- models <- tasks / train / main; errors <- routers <- config <- layers, models.
`moejax.config`, `moejax.routers` and `moejax.errors` load without JAX; `moejax.data` is imported
lazily so that models import without TFDS/grain. README "Architecture" has the module map.
"""

__version__ = "0.1.0"
