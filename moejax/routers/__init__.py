"""Router families, one module each, registered in one table (`registry`).

  top_k          softmax over E, each token takes its K best (Switch K=1, GShard K=2), noisy top-k,
                 jitter, GShard's random 2nd expert
  expert_choice  each expert takes its C best tokens (Zhou et al. 2022); not causal
  soft_moe       every slot a softmax mix of the group's tokens (Puigcerver et al.); not causal
  hash           expert = fixed hash of the token id (Roller et al. 2021)
  dense          every token uses all experts, softmax weights
  deepseek       sigmoid or softmax affinities, aux-loss-free balancing bias, group-limited routing

A new family is a module with a `RouterFamily` subclass decorated with `@register`
(README "Adding a router"). Importing this package does not import JAX (see moejax/lazy.py).
"""

from moejax.routers.base import Option, RouterFamily
from moejax.routers.registry import get, names, options, owners, register

# Registration order is the order of moe.router's allowed values in messages.
from moejax.routers import top_k, expert_choice, soft_moe, hash, dense, deepseek  # noqa: E402,F401

__all__ = ["Option", "RouterFamily", "get", "names", "options", "owners", "register"]
