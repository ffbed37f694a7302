"""fusedopt's functional API: one function per optimizer over lists of tensors.

``sgd``, ``adam``, ``adamw`` and ``muon`` take the arguments of torch.optim's functional
forms (torch.optim.sgd.sgd, torch.optim.adam.adam, torch.optim.adamw.adamw,
torch.optim._muon.muon) and
give their numbers; ``lars`` and ``lamb`` have signatures of the same shape.
Every call checks all its tensors and hyperparameters before it writes
anything, then runs one fused kernel call per (device, dtype) batch. Extra
fusedopt options are keyword arguments (``master_params``, ``state_dtype``,
``eps_inside_sqrt``, ``stochastic_rounding`` with ``rounding_seed``);
``plan=StepPlan()`` kept across calls makes repeated steps cheap; ``launch=False`` returns a ``PreparedStep`` to launch later. Under
torch.compile each call is one ``fusedopt::optimizer_step`` custom op.
The optimizer classes (fusedopt.SGD, ...) are thin layers over these functions.
"""
from .._kernels import StepPlan
from ._step import PreparedStep, stochastic_rounding_seed, stochastic_rounding_state
from .elementwise import adam, adamw, sgd
from .muon import muon
from .norm_scaled import lamb, lamb_clip_sums, lars
from .norms import grad_sq_norms, tensor_norms

__all__ = ["sgd", "adam", "adamw", "muon", "lars", "lamb", "lamb_clip_sums", "tensor_norms", "grad_sq_norms",
           "StepPlan", "PreparedStep", "stochastic_rounding_seed",
           "stochastic_rounding_state"]
