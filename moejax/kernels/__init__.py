"""Hand-written kernels (Pallas) with plain-XLA fallbacks: the bottom layer of moejax.

Nothing here knows about routers or layers; dispatchers (`moejax.dispatch`) and the dropless
path (`moejax.dropless`) call these.
"""

from moejax.kernels.permute import BACKENDS, RowMap, permute, unpermute

__all__ = ["BACKENDS", "RowMap", "permute", "unpermute"]
