"""vimarl: cooperative multi-agent reinforcement learning as probabilistic inference.

Public API (DESIGN §3): `make_env`, `make_algo`, `train`.
"""

from vimarl.algos import make_algo
from vimarl.envs.registry import make_env
from vimarl.errors import VimarlError
from vimarl.train import evaluate, train

__version__ = "0.1.0"
__all__ = ["VimarlError", "evaluate", "make_algo", "make_env", "train", "__version__"]
