"""The optimizer classes: thin torch.optim.Optimizer subclasses over fusedopt.functional.

- ``base``: the step protocol (prepare every group, commit new state, launch);
- ``state``: ``TrackedState`` and checkpoint loading;
- ``sgd``, ``adam``, ``lars``, ``lamb``: hyperparameters, state and docs per optimizer.
"""
from .adam import Adam, AdamW
from .lamb import LAMB
from .lars import LARS
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "LARS", "LAMB"]
