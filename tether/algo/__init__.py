"""tether.algo: the math of RLHF-PPO as pure functions on tensors.

Imports torch only (no transformers, no I/O, no distributed). Mask convention everywhere:
``mask`` is bool or 0/1 with **True = a real token that counts**; values at masked
positions never change a result, and per-token outputs are 0 there.
"""

# Each module's __all__ is the package's API (one list per module, kept beside its code).
from . import advantages, estimators, kl, logprobs, losses, masked, rewards
from .advantages import *  # noqa: F401,F403
from .estimators import *  # noqa: F401,F403
from .kl import *  # noqa: F401,F403
from .logprobs import *  # noqa: F401,F403
from .losses import *  # noqa: F401,F403
from .masked import *  # noqa: F401,F403
from .rewards import *  # noqa: F401,F403

__all__ = [*masked.__all__, *logprobs.__all__, *kl.__all__, *rewards.__all__, *advantages.__all__,
           *estimators.__all__, *losses.__all__]
