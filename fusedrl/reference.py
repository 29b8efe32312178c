"""Eager PyTorch oracle for the fused core (the core math of docs/design.md).

It materialises the full ``[N, V]`` logits in fp32 (or fp64 when the inputs are fp64) and lets
torch autograd do the backward. It is what every backend is tested against; it is never the default
backend because it is exactly the memory problem fusedrl exists to solve.

``return_entropy_change=True`` adds the entropy change ``dH`` of each token (docs/backends.md, "The
entropy change dH") in its closed form over the materialised probabilities, without autograd:
``dH = sum_v p_v^2 (log p_v + H) - p_a (log p_a + H)``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["linear_logits", "logprob_entropy", "linear_logprob_entropy"]


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _transform(u: torch.Tensor, temperature: Union[float, torch.Tensor], softcap: Optional[float]) -> torch.Tensor:
    """``softcap(u) / T``; a temperature tensor holds one value per row of ``u`` (shape ``u.shape[:-1]``,
    or flat ``[N]`` for ``u`` of shape ``[N, V]``)."""
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    if isinstance(temperature, torch.Tensor):
        return u / temperature.to(u.dtype).reshape(u.shape[:-1]).unsqueeze(-1)
    return u / temperature


def linear_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: Union[float, torch.Tensor] = 1.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """``z = softcap(hidden @ weight.T + bias) / temperature`` in fp32 (fp64 for fp64 inputs).

    hidden: [..., H]; weight: [V, H]; bias: [V]; temperature: float or per row ([...]) -> [..., V]
    """
    dt = _compute_dtype(hidden, weight, bias)
    u = hidden.to(dt) @ weight.to(dt).t()
    if bias is not None:
        u = u + bias.to(dt)
    return _transform(u, temperature, softcap)


def _from_z(z: torch.Tensor, targets: torch.Tensor, return_entropy: bool, return_entropy_change: bool = False):
    logprobs = torch.log_softmax(z, dim=-1)
    # an out-of-range id (value checks off) reads a target logit of 0, as every backend: logp = -LSE
    v = z.shape[-1]
    t = targets.long()
    inside = (t >= 0) & (t < v)
    logp = logprobs.gather(-1, t.clamp(0, v - 1).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(inside, logp, -torch.logsumexp(z, dim=-1))
    if not (return_entropy or return_entropy_change):
        return logp, None
    p = logprobs.exp()
    # H = -sum p log p; 0 * (-inf) for masked-out probabilities is defined as 0.
    safe = torch.where(p > 0, logprobs, torch.zeros_like(logprobs))
    ent = -(p * safe).sum(-1)
    if not return_entropy_change:
        return logp, ent
    with torch.no_grad():  # a statistic, not differentiated
        h = ent.detach()
        sq = (p * p * (safe + h.unsqueeze(-1))).sum(-1)
        pa = logp.detach().exp()
        own = torch.where(pa > 0, pa * (logp.detach() + h), torch.zeros_like(pa))
        dh = sq - own
    return logp, (ent if return_entropy else None), dh


def logprob_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: Union[float, torch.Tensor] = 1.0,
    softcap: Optional[float] = None,
    return_entropy: bool = True,
    return_entropy_change: bool = False,
):
    """Per-token log-prob of ``targets`` and entropy of ``softmax(softcap(logits) / T)``.

    logits: [..., V]; targets: [...] int -> (logp [...], entropy [...] or None), fp32 (fp64 for fp64);
    with ``return_entropy_change`` also ``dH [...]`` (no gradient).
    """
    z = _transform(logits.to(_compute_dtype(logits)), temperature, softcap)
    return _from_z(z, targets, return_entropy, return_entropy_change)


def linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: Union[float, torch.Tensor] = 1.0,
    softcap: Optional[float] = None,
    return_entropy: bool = True,
    return_entropy_change: bool = False,
):
    """Reference of :func:`fusedrl.linear_logprob_entropy` (materialises the logits).

    hidden: [..., H]; weight: [V, H]; targets: [...]; bias: [V] -> (logp [...], entropy [...] or None),
    with ``return_entropy_change`` also ``dH [...]`` (no gradient).
    """
    z = linear_logits(hidden, weight, bias, temperature, softcap)
    return _from_z(z, targets, return_entropy, return_entropy_change)
