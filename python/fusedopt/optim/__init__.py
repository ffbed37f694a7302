"""The optimizer classes: thin torch.optim.Optimizer subclasses over fusedopt.functional.

- ``base``: the step protocol (prepare every group, commit new state, launch);
- ``state``: ``TrackedState`` and checkpoint loading;
- ``sgd``, ``adam``, ``lars``, ``lamb``, ``muon``: hyperparameters, state and docs per optimizer.
"""
from .adam import Adam, AdamW
from .lamb import LAMB
from .lars import LARS
from .muon import Muon, muon_param_groups
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "LARS", "LAMB", "Muon", "muon_param_groups"]
