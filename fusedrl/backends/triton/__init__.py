"""The ``triton`` backend: fused vocabulary projection + log-softmax statistics in Triton kernels, the
one-pass row epilogue, and the per-token loss-head kernel (the backend contract,
:class:`fusedrl.backends.base.Backend`).

Modules, each a stage: ``runtime`` (is triton here; interpreter mode), ``row_math`` (the shared jit math),
``kernels`` (core kernels), ``config`` (block configs, budgets, autotuning), ``core`` (their launchers),
``onepass`` (the one-pass epilogue kernel and launcher), ``head`` (the loss-head kernel, launcher, op).
On CPU the kernels run in the Triton interpreter (``TRITON_INTERPRET=1`` before triton is imported).
"""

from .core import backward, forward, logits_backward, logits_forward
from .onepass import onepass_epilogue, onepass_supports
from .runtime import is_available

__all__ = [
    "is_available",
    "forward",
    "backward",
    "logits_forward",
    "logits_backward",
    "onepass_epilogue",
    "onepass_supports",
]
