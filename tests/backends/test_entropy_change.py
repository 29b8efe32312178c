"""The entropy change ``dH`` (``return_entropy_change=True``) on every row-statistics implementation.

``dH = d/deta H(softmax(z + eta (e_a - p)))`` at ``eta = 0``: the first-order change of a token's
full-vocabulary entropy when its logits move along the gradient of its own log-prob. The oracle below
writes exactly that down in fp64 and lets autograd differentiate it w.r.t. ``eta``; every path is held
against it: the public ops on the torch / triton (interpreter) / reference backends, over hidden states and
over given logits; the CUDA kernels' code through its host lanes (``row_stats_host`` in the forward's chunk
loop, ``onepass_epilogue_host``); the one-pass epilogues (torch, triton, cuda host lane). Random, peaked
(scale 8) and ``-inf``-masked logits (``-inf`` bias entries), scalar and per-token temperature, softcap.
Also: ``return_entropy_change=False`` leaves every old output bitwise as it was, ``dH`` carries no
gradient, shapes ``[...]`` are kept, ``N = 0``, and a non-bool flag is a TypeError naming it. The
vocab-parallel merge is tests/distributed/test_entropy_change_tp.py.
"""

from __future__ import annotations

import pytest
import torch

import fusedrl
from fusedrl import ops, reference
from fusedrl.backends import cuda as cb
from fusedrl.backends import torch_backend
from fusedrl.backends.base import EpilogueHead, OnePassHead, entropy_change

try:
    from fusedrl.backends import triton as tb
    from fusedrl.backends.triton.runtime import triton as _triton
except ImportError:  # pragma: no cover - triton absent
    tb, _triton = None, None

C = cb.extension()
needs_triton = pytest.mark.skipif(_triton is None, reason="triton not installed")
needs_ext = pytest.mark.skipif(C is None, reason="CUDA extension not built (test_cuda_backend.py reports why)")

N, H, V = 13, 24, 507
TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-10, 1e-9)}
CASES = ["random", "peaked", "masked", "masked_block"]


# --------------------------------------------------------------------------------------------------
# the oracle and the data
# --------------------------------------------------------------------------------------------------
def oracle_dh(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d/deta H(softmax(z + eta (e_a - p))) at eta = 0 per row, by autograd in fp64 (z: processed logits)."""
    z = z.detach().double().reshape(-1, z.shape[-1])
    t = targets.reshape(-1)
    p = torch.softmax(z, -1)
    onehot = torch.nn.functional.one_hot(t, z.shape[-1]).double()
    eta = torch.zeros(z.shape[0], 1, dtype=torch.float64, requires_grad=True)
    logq = torch.log_softmax(z + eta * (onehot - p), -1)
    q = logq.exp()
    ent = -(q * torch.where(q > 0, logq, torch.zeros_like(logq))).sum(-1)
    (g,) = torch.autograd.grad(ent.sum(), eta)
    return g[:, 0].reshape(targets.shape)


def make(kind: str, dtype=torch.float32, n=N, seed=0, per_token=False, lead=None):
    """(x, w, b, t, T): ``kind`` random (scale 1), peaked (scale 8), masked (-inf bias entries, targets
    never on them) or masked_block (the first 300 columns -inf: whole vocabulary tiles / splits / chunks of
    -inf); T a float or per-token fp32 temperatures."""
    g = torch.Generator().manual_seed(seed)
    scale = 8.0 if kind == "peaked" else 1.0
    x = (torch.randn(n, H, generator=g) * scale / H**0.25).to(dtype)
    w = (torch.randn(V, H, generator=g) / H**0.25).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype)
    t = torch.randint(0, V, (n,), generator=g)
    if kind == "masked":
        b[::5] = -float("inf")
        t = torch.where(t % 5 == 0, t + 1, t)
    if kind == "masked_block":
        b[:300] = -float("inf")
        t = 300 + t % (V - 300)
    temp = (torch.rand(n, generator=g) + 0.5) if per_token else 0.7
    if lead is not None:
        x, t = x.reshape(*lead, H), t.reshape(lead)
        temp = temp.reshape(lead) if per_token else temp
    return x, w, b, t, temp


def z64(x, w, b, temp, cap):
    """The processed logits softcap(x w^T + b) / T in fp64 (rows flattened)."""
    tt = temp.reshape(-1) if isinstance(temp, torch.Tensor) else temp
    return reference.linear_logits(x.reshape(-1, H).double(), w.double(), b.double(), tt, cap)


def _close(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), f"{what}: dtype {got.dtype}"
    assert torch.isfinite(got).all(), f"{what}: non-finite dH"
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------------
# the paths: (dH of rows [N], as each path computes it)
# --------------------------------------------------------------------------------------------------
def _op(backend):
    def run(x, w, b, t, temp, cap):
        return fusedrl.linear_logprob_entropy(
            x, w, t, b, temp, cap, backend=backend, return_entropy_change=True, workspace_mb=0.003
        )[2]  # torch: vocab tiles of 262 columns (the first all -inf in masked_block), token tiles of 1

    return run


def _logits_op(backend):
    def run(x, w, b, t, temp, cap):
        u = x @ w.t() + b  # raw logits; the op applies softcap and T
        return fusedrl.logprob_entropy(u, t, temp, cap, backend=backend, return_entropy_change=True)[2]

    return run


def cuda_host_forward(x, w, t, b, temp, cap, nc=5, vc=100, dh=True):
    """The cuda backend's forward chunk loop (driver.cpp linear_forward) with torch GEMMs and the row_stats
    host lane; ``(lse, zt, ent, sq)`` (``sq`` None without ``dh``)."""
    n, v = x.shape[0], w.shape[0]
    lse, zt, ent = (torch.empty(n) for _ in range(3))
    sq = torch.empty(2, n) if dh else None
    run = torch.empty((5 if dh else 3) * nc)
    b32 = b.float().contiguous()
    for n0 in range(0, n, nc):
        m = min(nc, n - n0)
        tg = t[n0 : n0 + m].contiguous()
        tr = (1.0, temp[n0:].data_ptr()) if isinstance(temp, torch.Tensor) else (float(temp), 0)
        for v0 in range(0, v, vc):
            k = min(vc, v - v0)
            L = (x[n0 : n0 + m].float() @ w[v0 : v0 + k].float().t()).contiguous()
            C.row_stats_host(L.data_ptr(), k, m, k, b32[v0:].data_ptr(), tg.data_ptr(), v0, 0, v, *tr,
                             0.0 if cap is None else float(cap), run.data_ptr(), nc, v0 == 0, v0 + k >= v,
                             lse[n0:].data_ptr(), zt[n0:].data_ptr(), ent[n0:].data_ptr(),
                             **(dict(p2=sq[0, n0:].data_ptr(), p2h=sq[1, n0:].data_ptr()) if dh else {}))  # fmt: skip
    return lse, zt, ent, sq


def _cuda_host(x, w, b, t, temp, cap):
    lse, zt, ent, sq = cuda_host_forward(x, w, t, b, temp, cap)
    return entropy_change(zt - lse, ent, sq)


def _head(n, dtype=torch.float32):
    """A kernel head (clipped surrogate, entropy bonus off) over n rows: the epilogues need one."""
    g = torch.Generator().manual_seed(3)
    old = torch.randn(n, generator=g).to(dtype) - 3.0
    adv = torch.randn(n, generator=g).to(dtype)
    weight = torch.ones(n, dtype=dtype) / max(n, 1)
    return OnePassHead(mode=0, clip_lo=0.8, clip_hi=1.28, clip_c=None, dual=False, ent_coef=0.0, kl_coef=0.0,
                       kl_type=0, kl_st=False, old=old, adv=adv, weight=weight, ref=None, need_ent=False)  # fmt: skip


def _grads(lp, ent):
    return torch.ones_like(lp) * 0.1, None


def _epilogue(mod):
    def run(x, w, b, t, temp, cap):
        u = (x @ w.t()).contiguous()
        tt = temp.to(torch.float32) if isinstance(temp, torch.Tensor) else temp
        head = EpilogueHead(None if mod is torch_backend else _head(x.shape[0]), _grads, False, True)
        return mod.onepass_epilogue(u, t, b, tt, cap, head).dh

    return run


PATHS = {
    "torch": _op("torch"),
    "triton": _op("triton"),
    "reference": _op("reference"),
    "torch_logits": _logits_op("torch"),
    "triton_logits": _logits_op("triton"),
    "reference_logits": _logits_op("reference"),
    "cuda_host_lane": _cuda_host,
    "torch_epilogue": _epilogue(torch_backend),
    "triton_epilogue": _epilogue(tb),
    "cuda_epilogue_host_lane": _epilogue(cb),
}
FP64_PATHS = ["torch", "reference", "torch_logits", "reference_logits", "torch_epilogue"]


def _marks(path):
    if "triton" in path:
        return [needs_triton]
    if "cuda" in path:
        return [needs_ext]
    return []


@pytest.mark.parametrize("path", [pytest.param(p, marks=_marks(p)) for p in PATHS])
@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("per_token", [False, True], ids=["T", "T_vec"])
@pytest.mark.parametrize("cap", [None, 3.0], ids=["nocap", "cap"])
def test_dh_against_autograd_oracle(path, kind, per_token, cap):
    x, w, b, t, temp = make(kind, per_token=per_token, seed=hash((kind, per_token)) % 1000)
    want = oracle_dh(z64(x, w, b, temp, cap), t)
    _close(PATHS[path](x, w, b, t, temp, cap), want, torch.float32, f"{path} {kind} T_vec={per_token} cap={cap}")


@pytest.mark.parametrize("path", FP64_PATHS)
@pytest.mark.parametrize("kind", CASES)
def test_dh_fp64(path, kind):
    x, w, b, t, temp = make(kind, torch.float64, per_token=kind == "peaked")
    for cap in (None, 4.0):
        _close(PATHS[path](x, w, b, t, temp, cap), oracle_dh(z64(x, w, b, temp, cap), t), torch.float64, path)


def test_dh_closed_form_is_the_derivative():
    """The closed form of the docstrings (reference.py, backends/base.py) against a central difference."""
    x, w, b, t, temp = make("random", torch.float64)
    z = z64(x, w, b, temp, None)
    p = torch.softmax(z, -1)
    step = (torch.nn.functional.one_hot(t, V).double() - p) * 1e-5

    def ent(zz):
        q = torch.softmax(zz, -1)
        return -(q * torch.log(q)).sum(-1)

    fd = (ent(z + step) - ent(z - step)) / 2e-5
    got = reference.logprob_entropy(z, t, return_entropy_change=True)[2]
    torch.testing.assert_close(got, fd, atol=1e-8, rtol=1e-6)


@needs_triton
@pytest.mark.parametrize("splits", [1, 2])
def test_triton_vocab_splits(splits):
    """The fwd kernel's own finish (one split) and the merge kernel (several) give the same dH."""
    x, w, b, t, temp = make("masked", per_token=True)
    lse, zt, ent, sq = tb.forward(x, w, t, b, temp, 3.0, False, return_entropy_change=True, vocab_splits=splits)
    _close(entropy_change(zt - lse, ent, sq), oracle_dh(z64(x, w, b, temp, 3.0), t), torch.float32, "triton")


# --------------------------------------------------------------------------------------------------
# off by default: the old outputs, bitwise
# --------------------------------------------------------------------------------------------------
def _bitwise(a, b, what):
    for i, (u, v) in enumerate(zip(a, b)):
        if u is None or v is None:
            assert u is None and v is None, f"{what}[{i}]: {u} vs {v}"
        else:
            assert u.dtype == v.dtype and torch.equal(u, v), f"{what}[{i}] differs"


BACKENDS = ["torch", "reference", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("return_entropy", [True, False])
def test_off_is_bitwise_the_old_op(backend, return_entropy):
    x, w, b, t, temp = make("masked", per_token=True)
    kw = dict(backend=backend, return_entropy=return_entropy)
    old = fusedrl.linear_logprob_entropy(x, w, t, b, temp, 3.0, **kw)
    off = fusedrl.linear_logprob_entropy(x, w, t, b, temp, 3.0, return_entropy_change=False, **kw)
    on = fusedrl.linear_logprob_entropy(x, w, t, b, temp, 3.0, return_entropy_change=True, **kw)
    assert len(old) == len(off) == 2 and len(on) == 3
    _bitwise(off, old, f"{backend} off")
    _bitwise(on[:2], old, f"{backend} on")  # the two more sums perturb nothing else
    u = x @ w.t() + b
    old = fusedrl.logprob_entropy(u, t, temp, 3.0, return_entropy, backend)
    off = fusedrl.logprob_entropy(u, t, temp, 3.0, return_entropy, backend, return_entropy_change=False)
    on = fusedrl.logprob_entropy(u, t, temp, 3.0, return_entropy, backend, return_entropy_change=True)
    assert len(off) == 2 and len(on) == 3
    _bitwise(off, old, f"{backend} logits off")
    _bitwise(on[:2], old, f"{backend} logits on")


@pytest.mark.parametrize("mod", ["torch", pytest.param("triton", marks=needs_triton)])
def test_backend_forward_contract(mod):
    """Backend.forward / logits_forward: the 3-tuple unless asked; asked, the same three plus sq [2, N]."""
    m = torch_backend if mod == "torch" else tb
    x, w, b, t, temp = make("random")
    u = (x @ w.t() + b).contiguous()
    for fwd, args in ((m.forward, (x, w, t, b, temp, None)), (m.logits_forward, (u, t, temp, None))):
        for ent in (True, False):
            old = fwd(*args, ent)
            on = fwd(*args, ent, return_entropy_change=True)
            assert len(old) == 3 and len(on) == 4 and on[3].shape == (2, N)
            _bitwise(on[:2], old[:2], f"{mod} {fwd.__name__}")
            if ent:
                _bitwise(on[2:3], old[2:3], f"{mod} {fwd.__name__} entropy")
            else:
                assert old[2] is None and on[2] is not None  # dH needs H: computed


@needs_ext
def test_cuda_host_lane_off_is_bitwise_old():
    x, w, b, t, temp = make("masked", per_token=True)
    on = cuda_host_forward(x, w, t, b, temp, 3.0, dh=True)
    off = cuda_host_forward(x, w, t, b, temp, 3.0, dh=False)
    _bitwise(on[:3], off[:3], "row_stats_host")
    # the forward's workspace has room for the two more running sums only when asked
    assert C.fwd_workspace_bytes(64, 4096, 0, False, True) > C.fwd_workspace_bytes(64, 4096, 0, False)
    with pytest.raises(ValueError, match="p2"):  # both sums or neither
        z = torch.zeros(4, 8)
        C.row_stats_host(z.data_ptr(), 8, 4, 8, 0, torch.zeros(4, dtype=torch.int64).data_ptr(), 0, 0, 8, 1.0, 0,
                         0.0, torch.empty(20).data_ptr(), 4, True, True, *(torch.empty(4).data_ptr() for _ in
                         range(3)), p2=torch.empty(4).data_ptr())  # fmt: skip


@pytest.mark.parametrize(
    "mod",
    ["torch", pytest.param("triton", marks=needs_triton), pytest.param("cuda", marks=needs_ext)],
)
def test_epilogue_need_dh_changes_nothing_else(mod):
    """need_dh adds EpilogueOut.dh (the entropy too) and leaves every other output and du bitwise."""
    m = {"torch": torch_backend, "triton": tb, "cuda": cb}[mod]
    x, w, b, t, temp = make("masked", per_token=True)
    outs = []
    for need_dh in (False, True):
        u = (x @ w.t()).contiguous()
        codes = None if mod == "torch" else _head(N)
        outs.append(m.onepass_epilogue(u, t, b, temp, 3.0, EpilogueHead(codes, _grads, False, need_dh)))
    off, on = outs
    assert off.dh is None and on.dh is not None and on.dh.shape == (N,) and on.ent is not None
    _bitwise((off.logp, off.lse, off.g_lp, off.g_H, off.du), (on.logp, on.lse, on.g_lp, on.g_H, on.du), mod)
    # a bare OnePassHead (kernels) or an EpilogueHead without need_dh: no dH
    if mod != "torch":
        out = m.onepass_epilogue((x @ w.t()).contiguous(), t, b, temp, 3.0, _head(N))
        assert out.dh is None
    # an empty chunk
    u0 = torch.empty(0, V)
    e0 = m.onepass_epilogue(u0, t[:0], b, 0.7, None, EpilogueHead(None if mod == "torch" else _head(0), _grads,
                                                                 False, True))  # fmt: skip
    assert e0.dh is not None and e0.dh.shape == (0,)


# --------------------------------------------------------------------------------------------------
# gradients, shapes, empty inputs, bad values
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_dh_has_no_grad_and_grads_unchanged(backend):
    x, w, b, t, temp = make("random", lead=(3, 4), n=12)
    grads = []
    for dh in (False, True):
        xx, ww, bb = (p.clone().requires_grad_() for p in (x, w, b))
        out = fusedrl.linear_logprob_entropy(xx, ww, t, bb, temp, backend=backend, return_entropy_change=dh)
        if dh:
            assert not out[2].requires_grad and out[2].grad_fn is None
            assert out[2].shape == (3, 4) and out[0].requires_grad
        (out[0].double().sum() + 0.3 * out[1].double().sum()).backward()
        grads.append((xx.grad, ww.grad, bb.grad))
    _bitwise(grads[1], grads[0], f"{backend} grads")
    u = (x @ w.t() + b).requires_grad_()
    lp, ent, d = fusedrl.logprob_entropy(u, t, temp, backend=backend, return_entropy_change=True)
    assert not d.requires_grad and lp.requires_grad and d.shape == (3, 4)


def test_inplace_backward_logits():
    x, w, b, t, temp = make("random")
    u = (x @ w.t() + b).detach()
    ref = fusedrl.logprob_entropy(u.clone().requires_grad_(), t, temp, backend="torch", return_entropy_change=True)
    leaf = u.clone().requires_grad_()
    buf = leaf * 1.0  # the buffer overwritten by the backward
    lp, ent, d = fusedrl.logprob_entropy(buf, t, temp, backend="torch", inplace_backward=True,
                                         return_entropy_change=True)  # fmt: skip
    _bitwise((lp.detach(), ent.detach(), d), (ref[0].detach(), ref[1].detach(), ref[2]), "inplace")
    assert not d.requires_grad
    lp.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(2, 3), (0,), (5,)])
def test_shapes_and_empty(backend, lead):
    n = 1
    for d in lead:
        n *= d
    x, w, b, t, temp = make("random", n=n, lead=lead)
    lp, ent, d = fusedrl.linear_logprob_entropy(x, w, t, b, temp, backend=backend, return_entropy_change=True)
    assert lp.shape == ent.shape == d.shape == lead and d.dtype == torch.float32
    lp, ent, d = fusedrl.linear_logprob_entropy(x, w, t, b, temp, return_entropy=False, backend=backend,
                                                return_entropy_change=True)  # fmt: skip
    assert ent is None and d.shape == lead
    if n:
        _close(d.reshape(-1), oracle_dh(z64(x, w, b, temp, None), t.reshape(-1)), torch.float32, "shape")
    lp, ent, d = fusedrl.logprob_entropy(x @ w.t() + b, t, temp, backend=backend, return_entropy_change=True)
    assert d.shape == lead


@pytest.mark.parametrize("bad", [1, 0, None, "yes", 1.0, torch.tensor(True)])
def test_bad_flag_is_a_type_error(bad):
    x, w, b, t, _ = make("random")
    with pytest.raises(TypeError, match="return_entropy_change"):
        fusedrl.linear_logprob_entropy(x, w, t, return_entropy_change=bad)
    with pytest.raises(TypeError, match="return_entropy_change"):
        fusedrl.logprob_entropy(x @ w.t(), t, return_entropy_change=bad)
    with pytest.raises(TypeError, match="return_entropy_change"):
        fusedrl.linear_logprob_entropy(x, w, t, backend="reference", return_entropy_change=bad)


def test_custom_ops_opcheck():
    """The forward custom ops' schema, fake impl and autograd registration with the dH output."""
    x, w, b, t, _ = make("random", n=5)
    xx = x.clone().requires_grad_()
    lle = (xx, w, t, b, 0.7, None, True, "torch", 0.0, True, 0.0, None, True)
    torch.library.opcheck(
        ops._lle_fwd, lle, test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
    )
    u = (x @ w.t()).requires_grad_()
    le = (u, t, 0.7, None, False, "torch", None, True)
    torch.library.opcheck(ops._le_fwd, le, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# --------------------------------------------------------------------------------------------------
# GPU: the kernels themselves
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernels(backend, dtype):  # pragma: no cover - needs a GPU
    x, w, b, t, temp = make("masked", per_token=True, n=300)
    x, w, b, t, temp = (v.to(dtype).cuda() if v.is_floating_point() and v is not temp else v.cuda()
                        for v in (x, w, b, t, temp))  # fmt: skip
    want = oracle_dh(z64(x.cpu(), w.cpu(), b.cpu(), temp.cpu(), 3.0), t.cpu())
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for got in (
        fusedrl.linear_logprob_entropy(x, w, t, b, temp, 3.0, backend=backend, return_entropy_change=True)[2],
        fusedrl.logprob_entropy(x @ w.t() + b, t, temp, 3.0, backend=backend, return_entropy_change=True)[2],
    ):
        torch.testing.assert_close(got.double().cpu(), want, atol=tol, rtol=1e-3)
    u = (x.float() @ w.float().t()).contiguous()
    mod = cb if backend == "cuda" else tb
    head = OnePassHead(*[v.cuda() if isinstance(v, torch.Tensor) else v for v in _head(300)])
    out = mod.onepass_epilogue(u, t, b.float(), temp, 3.0, EpilogueHead(head, None, False, True))
    torch.testing.assert_close(out.dh.double().cpu(), want, atol=tol, rtol=1e-3)
