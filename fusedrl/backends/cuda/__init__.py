"""The ``cuda`` backend: the compiled extension ``fusedrl._C`` (csrc/), cuBLAS GEMMs on bounded token x
vocabulary chunks plus fused CUDA epilogues, the one-pass row epilogue kernel and the per-token loss-head
kernels (the backend contract, :class:`fusedrl.backends.base.Backend`).

Modules: ``extension`` (the compiled module, cuBLAS, device checks, shared launch helpers), ``core``
(forward / backward launchers and their chunk planning), ``onepass`` (the one-pass epilogue), ``head``
(the loss-head kernels). Without nvcc at install time the package is pure Python and this backend
reports itself unavailable with the reason.
"""

from .core import backward, forward, logits_backward, logits_forward
from .extension import build_info, extension, is_available
from .onepass import onepass_epilogue, onepass_supports

__all__ = [
    "is_available",
    "build_info",
    "extension",
    "forward",
    "backward",
    "logits_forward",
    "logits_backward",
    "onepass_epilogue",
    "onepass_supports",
]
