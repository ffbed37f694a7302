"""The kernel layer: the only code that turns tensors into pointers for ``fusedopt._C``.

The compiled core trusts what it is given, so everything is checked here
first: devices, dtypes, shapes, layouts and aliasing. Nothing in this package
writes a tensor; the kernels it calls are the only writers, and they run only
after every check of the call has passed.

- ``layout``: the row layout exported by ``_C`` (columns and flags by name);
- ``checks``: tensor checks with messages that name the tensor;
- ``rows``: ``RowTable``, the int64 rows of one call;
- ``plan``: ``prepare`` and ``StepPlan``, the checked and cached tables of a call;
- ``launch``: the optimizer entry points of ``_C``;
- ``norms``: per-tensor sums of squares, norm slots of LARS/LAMB;
- ``quant8``: 8-bit blockwise states (block scales, checkpoint conversions);
- ``lanczos``: the Lanczos vector kernels.
"""
from .checks import check_dense, check_like, check_param, shape_str
from .lanczos import lanczos_dots, lanczos_orthogonalize
from .launch import DeviceScalars, launch_elementwise, launch_norm_scaled, require_cuda
from .layout import DTYPE_CODES, DTYPE_OF_CODE, kernel_layout
from .norms import check_norm_inputs, grad_sq_norms_into, tensor_norms_into
from .plan import ABSMAX, AGE, MASTER, STATE, STEP, Column, Labels, StepPlan, prepare

__all__ = [
    "check_dense", "check_like", "check_param", "shape_str", "lanczos_dots", "lanczos_orthogonalize",
    "DeviceScalars", "launch_elementwise", "launch_norm_scaled", "require_cuda", "DTYPE_CODES", "DTYPE_OF_CODE",
    "kernel_layout", "check_norm_inputs", "grad_sq_norms_into", "tensor_norms_into", "ABSMAX", "AGE", "MASTER", "STATE", "STEP",
    "Column", "Labels", "StepPlan", "prepare",
]
