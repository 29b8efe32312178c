"""verl's fused log-prob / entropy kernels served by fusedrl: drop-ins with verl's signatures and the patch that
installs them."""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Optional

import torch
from torch import nn

from ...ops import linear_logprob_entropy
from .losses import register_verl_policy_losses

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------------
# fused log-prob / entropy for verl's actor
# --------------------------------------------------------------------------------------------------
_REPLAY: contextvars.ContextVar[Optional[dict[str, Any]]] = contextvars.ContextVar("fusedrl_verl_replay", default=None)


@contextlib.contextmanager
def sampling_replay(sampling_mask=None, *, top_k=None, top_p=None, min_p=None, entropy_support: str = "full"):
    """Within this context, verl's fused log-prob kernels served by fusedrl (:func:`fused_linear_for_ppo`,
    :class:`FusedLinearForPPO`, :func:`linear_cross_entropy`, so ``use_fused_kernels=True`` after
    :func:`patch_verl`) normalise over the sampler's kept sets (docs/replay.md): ``sampling_mask`` aligned with
    the labels the kernel receives (verl's rolled ``input_ids``, remove-padding layout included: padded
    ``[..., K]`` with -1 fill or packed ``(ids, counts)``), or the truncation ``top_k`` / ``top_p`` / ``min_p``
    recomputed with vLLM's rule. A custom actor wraps its forward of each micro-batch::

        with sampling_replay(micro_batch["sampling_mask"]):
            entropy, log_prob = self._forward_micro_batch(micro_batch, temperature)

    Old log-probs (``compute_log_prob``) must be computed inside the same context, so that the policy ratio and
    verl's rollout correction (``rollout_log_probs`` from vLLM's processed log-probs) all share one support."""
    token = _REPLAY.set(dict(sampling_mask=sampling_mask, top_k=top_k, top_p=top_p, min_p=min_p,
                             entropy_support=entropy_support))  # fmt: skip
    try:
        yield
    finally:
        _REPLAY.reset(token)


def _replay_kwargs(shape: Optional[tuple[int, ...]] = None) -> dict[str, Any]:
    """The context's replay arguments; ``shape``: the labels' shape as the core op receives them (the mask's
    per-token shape and per-token parameters reshaped to it when they hold as many tokens, e.g. a packed
    ``[nnz, K]`` mask for verl's ``[1, nnz]`` remove-padding labels)."""
    cur = _REPLAY.get()
    if cur is None:
        return {}
    kw = {k: v for k, v in cur.items() if v is not None}
    if shape is not None:
        n = math.prod(shape)
        for k, v in kw.items():
            if isinstance(v, Tensor) and k == "sampling_mask" and v.dim() > 1 and v.shape[:-1].numel() == n:
                kw[k] = v.reshape(*shape, v.shape[-1])
            elif isinstance(v, Tensor) and k != "sampling_mask" and v.numel() == n and v.dim() > 0:
                kw[k] = v.reshape(shape)
            elif k == "sampling_mask" and isinstance(v, (tuple, list)) and len(v) == 2 and v[1].numel() == n:
                kw[k] = (v[0], v[1].reshape(shape))
    return kw


def fused_linear_for_ppo(
    hidden_states: Tensor,
    vocab_weights: Tensor,
    input_ids: Tensor,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
    process_group=None,
    **core_kwargs,
) -> tuple[Tensor, Tensor]:
    """verl's ``FusedLinearForPPO.forward`` contract on fusedrl: ``(log_probs, entropy)`` fp32, shaped like
    ``input_ids`` (labels, already rolled by verl). Labels < 0 (ignore index) give log-prob 0. Inside
    :func:`sampling_replay` (or with its arguments in ``core_kwargs``) the log-probs are the kept sets'."""
    labels = input_ids.long()
    ignore = labels < 0
    targets = torch.where(ignore, torch.zeros_like(labels), labels)
    h = hidden_states if hidden_states.dtype == vocab_weights.dtype else hidden_states.to(vocab_weights.dtype)
    logp, ent = linear_logprob_entropy(
        h,
        vocab_weights,
        targets,
        temperature=float(temperature),
        backend=backend,
        process_group=process_group,
        **{**_replay_kwargs(tuple(labels.shape)), **core_kwargs},
    )
    logp = torch.where(ignore, torch.zeros_like(logp), logp)
    return logp, ent


class FusedLinearForPPO(nn.Module):
    """Drop-in for ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (``chunk_size`` and
    ``impl_backend`` are accepted and ignored; ``backend`` picks the fusedrl backend)."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch", *, backend: str = "auto"):
        super().__init__()
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend
        self.backend = backend

    def forward(
        self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor, temperature: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        return fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature, backend=self.backend)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group=None,
    *,
    backend: str = "auto",
):
    """Drop-in for ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``: ``(log_probs, entropy)``.

    As verl's kernel, ``hidden`` (``[..., H]``) and ``labels`` are flattened to ``N`` tokens (their leading
    shapes may differ, e.g. Megatron's ``[S, 1, H]`` hidden with ``[1, S]`` labels) and ``reduction="none"``
    returns fp32 ``[N]`` tensors; ``"sum"`` / ``"mean"`` reduce both. ``dist_process_group``: vocab-parallel group.
    """
    red = reduction.lower()
    if red not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    if hidden.shape[:-1].numel() != labels.numel():
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} hold different numbers of tokens"
        )
    logp, ent = fused_linear_for_ppo(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        temperature,
        backend=backend,
        process_group=dist_process_group,
        **_replay_kwargs((labels.numel(),)),
    )
    if red == "none":
        return logp, ent
    if red == "sum":
        return logp.sum(), ent.sum()
    return logp.mean(), ent.mean()


_ORIGINALS: dict[str, Any] = {}
#: verl modules that bind ``linear_cross_entropy`` by name at import (``from ... import linear_cross_entropy``):
#: Megatron's fused forwards. Those already imported get the name replaced; later imports bind fusedrl's.
_LCE_MODULE = "verl.utils.kernel.linear_cross_entropy"
_LCE_IMPORTERS = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")


def _import_optional(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except Exception:  # verl's triton kernel module does not import everywhere
        return None


def patch_verl(backend: str = "auto", losses: bool = True, kernels: bool = True) -> dict[str, Any]:
    """Route verl through fusedrl: its fused-kernel forward (``use_fused_kernels=True``, both the torch
    and triton ``impl_backend``, FSDP and Megatron) and, with ``losses``, register the ``fusedrl_*`` policy
    losses. Besides ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` itself, the names that
    Megatron's ``model_forward_fused`` / ``model_forward_1f1b_overlap`` bound at import are replaced too.
    Returns what was patched. Idempotent; :func:`unpatch_verl` restores verl's functions."""
    import functools
    import importlib
    import sys

    done: dict[str, Any] = {}
    if kernels:
        tf = importlib.import_module("verl.utils.experimental.torch_functional")
        _ORIGINALS.setdefault("FusedLinearForPPO", tf.FusedLinearForPPO)

        class _Patched(FusedLinearForPPO):
            def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
                super().__init__(chunk_size, impl_backend, backend=backend)

        _Patched.__name__ = _Patched.__qualname__ = "FusedLinearForPPO"
        tf.FusedLinearForPPO = _Patched
        done["verl.utils.experimental.torch_functional.FusedLinearForPPO"] = _Patched
        fused_lce = functools.partial(linear_cross_entropy, backend=backend)
        fused_lce._fusedrl = True
        kernel = _import_optional(_LCE_MODULE)
        if kernel is not None:
            if not getattr(kernel.linear_cross_entropy, "_fusedrl", False):
                _ORIGINALS["linear_cross_entropy"] = kernel.linear_cross_entropy
            kernel.linear_cross_entropy = fused_lce  # modules imported from now on bind this
            done[f"{_LCE_MODULE}.linear_cross_entropy"] = fused_lce
        for name in _LCE_IMPORTERS:  # imported before: replace the name they bound (later imports bind ours)
            mod = sys.modules.get(name)
            if mod is not None and hasattr(mod, "linear_cross_entropy"):
                mod.linear_cross_entropy = fused_lce
                done[f"{name}.linear_cross_entropy"] = fused_lce
    if losses:
        done["policy_losses"] = register_verl_policy_losses()
    return done


def unpatch_verl() -> None:
    """Undo :func:`patch_verl`'s kernel patches (registered losses stay registered)."""
    import importlib
    import sys

    if "FusedLinearForPPO" in _ORIGINALS:
        importlib.import_module("verl.utils.experimental.torch_functional").FusedLinearForPPO = _ORIGINALS.pop(
            "FusedLinearForPPO"
        )
    original = _ORIGINALS.pop("linear_cross_entropy", None)
    if original is not None:
        for name in (_LCE_MODULE,) + _LCE_IMPORTERS:
            mod = sys.modules.get(name)
            if mod is not None and getattr(getattr(mod, "linear_cross_entropy", None), "_fusedrl", False):
                mod.linear_cross_entropy = original
