"""Hand-written kernels (Pallas) with plain-XLA fallbacks: the bottom layer of moejax.

Nothing here knows about routers or layers; dispatchers (`moejax.dispatch`) call these.
"""

from moejax.kernels.permute import BACKENDS, inverse_map, permute, unpermute

__all__ = ["BACKENDS", "inverse_map", "permute", "unpermute"]
