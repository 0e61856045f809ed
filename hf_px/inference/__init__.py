"""CPU inference with sparse kernels where they pay: :func:`choose_kernels` and the CSR layer it swaps in.

* :mod:`.kernels`: :class:`CSRLinear`, :func:`densify`, :func:`densified` (swap out and back, e.g. to save);
* :mod:`.timing`: the interleaved median timer every decision goes through (injectable);
* :mod:`.choose`: :func:`choose_kernels` and its :class:`KernelReport`.

``hf_px.load(path, kernels="auto", batch_shape=(1, 128))`` loads a checkpoint and runs :func:`choose_kernels`.
"""

from .choose import KernelReport, LayerKernel, choose_kernels, dense_report, example_inputs
from .kernels import CSRLinear, densified, densify, to_csr
from .timing import Timer, interleaved_median_ms

__all__ = [
    "CSRLinear",
    "KernelReport",
    "LayerKernel",
    "Timer",
    "choose_kernels",
    "dense_report",
    "densified",
    "densify",
    "example_inputs",
    "interleaved_median_ms",
    "to_csr",
]
