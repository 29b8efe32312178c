"""Shared test utilities: the CCE tolerance idiom.

A kernel's error against an fp64 computation on the same (upcast) inputs must not exceed the error
of eager PyTorch computing in the input dtype, plus a small absolute tolerance.
"""

from __future__ import annotations

from typing import Optional

import torch

from fusedrl import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# small extra tolerance on top of torch's own low-precision error, per dtype
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}
GRAD_ATOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 5e-2, torch.float64: 1e-9}


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def make_case(n, h, v, dtype, device="cpu", bias=False, scale=1.0, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(n, h, generator=g) * scale / h**0.25).to(dtype).to(device)
    w = (torch.randn(v, h, generator=g) / h**0.25).to(dtype).to(device)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).to(device) if bias else None
    t = torch.randint(0, v, (n,), generator=g).to(device)
    return x, w, b, t


def eager_lowprec(x, w, t, b, temperature, softcap, return_entropy=True):
    """What eager PyTorch computes in the input dtype (logits in that dtype)."""
    u = x @ w.t()
    if b is not None:
        u = u + b
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    u = u / temperature
    lsm = torch.log_softmax(u, -1)
    lp = lsm.gather(-1, t[..., None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1) if return_entropy else None
    return lp, ent


def err(a: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> float:
    if a is None or ref is None or a.numel() == 0:
        return 0.0
    return (a.double() - ref.double()).abs().max().item()


def assert_cce(name, out, ref64, lowprec, dtype, atol=None):
    """|out - ref64| <= |lowprec - ref64| + atol (max norms)."""
    atol = ATOL[dtype] if atol is None else atol
    e_out, e_low = err(out, ref64), err(lowprec, ref64) if lowprec is not None else 0.0
    bound = e_low + atol
    assert e_out <= bound, f"{name}: error {e_out:.3e} > bound {bound:.3e} (torch low-precision error {e_low:.3e})"


def ref64(x, w, t, b, temperature, softcap, return_entropy=True):
    return reference.linear_logprob_entropy(
        x.double(), w.double(), t, None if b is None else b.double(), temperature, softcap, return_entropy
    )
