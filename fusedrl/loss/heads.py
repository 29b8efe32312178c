"""The one dispatch point of the loss head: torch formulas or a backend's per-token kernels.

``backend=`` picks the implementation of every layer at once; here it decides whether the loss's
per-token terms come from ``fusedrl.loss.modes`` (torch ops, every device, every dtype) or from the
backend's head kernels (``fusedrl.backends.triton.head`` / ``cuda.head``: the vanilla clipped surrogate
in one launch; the covariance statistic of Clip-Cov / KL-Cov). The kernels compute in fp32, so fp64
inputs always take the torch formulas; a config they do not express takes them too.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from ..backends import ALL_NAMES, HEADS, BackendUnavailable, head_module, resolve
from .config import PolicyLossConfig
from .inputs import Tokens
from .selection import CovKernel
from .terms import PGTerms

Tensor = torch.Tensor


class Kernels(NamedTuple):
    """The kernel implementations of the loss head's per-token terms in force (None: torch formulas)."""

    name: str
    vanilla: Optional[Callable[[Tokens, PolicyLossConfig], PGTerms]] = None
    covariance: Optional[CovKernel] = None


TORCH = Kernels("torch")


def _vanilla(mod) -> Callable[[Tokens, PolicyLossConfig], PGTerms]:
    def run(tok: Tokens, cfg: PolicyLossConfig) -> PGTerms:
        loss, clipped, lower, neg_d = mod.vanilla_token_terms(
            tok.logp, tok.old_logp, tok.adv, tok.valid, cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c
        )
        clipfrac_lower = tok.zero_metric() if cfg.clip_ratio_c is None else tok.masked_mean(lower)
        return PGTerms(loss, tok.masked_mean(clipped), clipfrac_lower, tok.masked_mean(neg_d))

    return run


def _covariance(mod) -> CovKernel:
    def run(tok: Tokens, mean_a: Tensor, mean_lp: Tensor, clip) -> tuple[Tensor, Optional[Tensor]]:
        return mod.cov_terms(tok.logp.detach(), tok.old_logp, tok.adv, tok.valid, mean_a, mean_lp, clip)

    return run


def kernels_for(backend: str, device: torch.device, dtype: torch.dtype) -> Kernels:
    """The head kernels ``backend`` provides for tensors of ``dtype`` (the compute dtype) on ``device``.

    ``"torch"`` / ``"reference"``: none. ``"auto"``: those of the backend ``auto`` resolves to, when
    they can run here. ``"triton"`` / ``"cuda"``: their kernels (the cuda head runs as a host loop on CPU
    tensors when the extension is built); unavailable raises :class:`fusedrl.BackendUnavailable` naming
    why. fp64 and meta tensors always take the torch formulas.
    """
    if not isinstance(backend, str) or backend not in ALL_NAMES:
        raise ValueError(f"backend must be one of {ALL_NAMES}, got {backend!r}")
    device = torch.device(device)
    explicit = backend in tuple(HEADS)
    name = backend
    if backend == "auto":
        name = resolve("auto", device) if device.type != "meta" else "torch"
    if name not in tuple(HEADS) or dtype != torch.float32 or device.type == "meta":
        return TORCH  # the kernels compute in fp32; meta tensors only trace shapes
    mod = head_module(name)
    ok, why = mod.is_available(device)
    if not ok:
        if explicit:
            raise BackendUnavailable(f"backend {name!r} has no loss-head kernels on {device}: {why}")
        return TORCH
    return Kernels(name, _vanilla(mod), _covariance(mod) if hasattr(mod, "cov_terms") else None)


def vanilla_kernel_ok(cfg: PolicyLossConfig) -> bool:
    """The vanilla kernels compute verl's PPO clip + dual clip per token, without the TRL extensions."""
    return cfg.loss_mode == "vanilla" and cfg.delta is None and cfg.importance_sampling_level == "token"
