from .adam import Adam, AdamW
from .lamb import LAMB
from .lars import LARS
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "LARS", "LAMB"]
