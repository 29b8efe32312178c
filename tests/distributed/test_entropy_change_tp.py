"""The entropy change ``dH`` under vocab parallelism: 2 spawned Gloo ranks, uneven shards.

Each shard's backend returns its own softmax's two sums (``Backend.forward(return_entropy_change=True)``),
one all_gather carries them with LSE / z_t / H, and ``fusedrl.distributed.merge_shard_stats`` forms the
global ``dH``. Checked inside each child against the fp64 autograd oracle of tests/backends/
test_entropy_change.py over the whole vocabulary, bitwise equal on both ranks, still one all_gather per
call, logp / entropy / gradients bitwise those of the call without ``dH``, and ``dH`` without gradient.
"""

import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (children inherit the env)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _dist import finish, init, launch  # noqa: E402

import fusedrl  # noqa: E402
from fusedrl import distributed as fdist  # noqa: E402
from fusedrl import reference  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

V, H = 29, 8
SIZES = [13, 16]  # uneven shards (rank order)
CASES = [
    # kind, dtype, temperature ("vec": per token), softcap, return_entropy
    ("random", torch.float32, 0.7, None, True),
    ("peaked", torch.float32, "vec", 3.0, True),
    ("masked", torch.float32, 1.3, None, False),
    ("masked", torch.float64, "vec", 2.5, True),
    ("peaked", torch.float64, 0.9, None, True),
]
TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-10, 1e-9)}


def oracle_dh(z, t):
    """d/deta H(softmax(z + eta (e_a - p))) at 0 by autograd in fp64 (as tests/backends/test_entropy_change.py)."""
    z = z.detach().double()
    p = torch.softmax(z, -1)
    eta = torch.zeros(z.shape[0], 1, dtype=torch.float64, requires_grad=True)
    logq = torch.log_softmax(z + eta * (torch.nn.functional.one_hot(t, z.shape[-1]).double() - p), -1)
    q = logq.exp()
    (g,) = torch.autograd.grad((-(q * torch.where(q > 0, logq, torch.zeros_like(logq))).sum()), eta)
    return g[:, 0]


def _data(kind, dtype, temp, seed):
    g = torch.Generator().manual_seed(seed)
    n = 11
    x = (torch.randn(n, H, generator=g) * (8.0 if kind == "peaked" else 1.0) / H**0.25).to(dtype)
    w = (torch.randn(V, H, generator=g) / H**0.25).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype)
    t = torch.randint(0, V, (n,), generator=g)
    t[:4] = torch.tensor([0, SIZES[0] - 1, SIZES[0], V - 1])  # both shards' edges
    if kind == "masked":  # -inf columns in both shards (never a target)
        b[[2, 5, 14, 20, 27]] = -float("inf")
        t = torch.where((t == 2) | (t == 5) | (t == 14) | (t == 20) | (t == 27), t + 1, t)
    temperature = (torch.rand(n, generator=g) + 0.5).to(dtype) if temp == "vec" else temp
    return x, w, b, t, temperature


def _worker(rank, world, init_method, backends):
    init(rank, world, init_method)
    group = dist.group.WORLD
    start = sum(SIZES[:rank])
    end = start + SIZES[rank]
    assert fdist.global_vocab_size(torch.empty(SIZES[rank], H), group) == V  # the layout, cached
    for backend in backends:
        for i, (kind, dtype, temp, cap, ret_ent) in enumerate(CASES):
            if backend == "triton" and dtype == torch.float64:
                continue
            tag = f"[{backend} case={i} {kind} {dtype} rank={rank}]"
            atol, rtol = TOL[dtype]
            x, w, b, t, temperature = _data(kind, dtype, temp, seed=10 + i)
            z = reference.linear_logits(x.double(), w.double(), b.double(), temperature, cap)
            want = oracle_dh(z, t)
            xs, ws, bs = (p.clone().requires_grad_() for p in (x, w[start:end], b[start:end]))
            calls = fdist._all_gather = _Count(fdist._all_gather)
            try:
                lp, ent, dh = fusedrl.linear_logprob_entropy(xs, ws, t, bs, temperature, cap, ret_ent, backend, group,
                                                             return_entropy_change=True)  # fmt: skip
            finally:
                fdist._all_gather = calls.fn
            assert calls.n == 1, f"{tag} {calls.n} all_gathers (expected 1)"
            assert dh.shape == t.shape and dh.dtype == lp.dtype and not dh.requires_grad, tag
            assert (ent is not None) == ret_ent, tag
            torch.testing.assert_close(dh.double(), want, atol=atol, rtol=rtol, msg=lambda m, tag=tag: f"{tag}: {m}")
            outs = [torch.empty_like(dh) for _ in range(world)]
            dist.all_gather(outs, dh)
            assert all(torch.equal(o, dh) for o in outs), f"{tag} dH differs between ranks"
            # the same call without dH: logp, entropy and every gradient bitwise
            xo, wo, bo = (p.clone().requires_grad_() for p in (x, w[start:end], b[start:end]))
            old = fusedrl.linear_logprob_entropy(xo, wo, t, bo, temperature, cap, ret_ent, backend, group)
            assert len(old) == 2
            assert torch.equal(old[0], lp) and (not ret_ent or torch.equal(old[1], ent)), tag
            for out in ((lp, ent), old):
                loss = out[0].double().sum() + (0.5 * out[1].double().sum() if ret_ent else 0.0)
                loss.backward()
            for a, c in zip((xs, ws, bs), (xo, wo, bo)):
                assert torch.equal(a.grad, c.grad), f"{tag} gradients changed by return_entropy_change"
            # scoring (no grad): the same dH
            with torch.no_grad():
                ws_, bs_ = w[start:end], b[start:end]
                _, _, dh2 = fusedrl.linear_logprob_entropy(x, ws_, t, bs_, temperature, cap, ret_ent, backend, group,
                                                           return_entropy_change=True)  # fmt: skip
            assert torch.equal(dh2, dh), tag
    finish()


class _Count:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *a, **k):
        self.n += 1
        return self.fn(*a, **k)


def test_merge_shard_stats_single_shard():
    """One shard: the merge returns the shard's own dH (no gather needed to check the formula)."""
    from fusedrl.backends import torch_backend
    from fusedrl.backends.base import entropy_change

    x, w, b, t, temperature = _data("masked", torch.float64, "vec", seed=3)
    lse, zt, ent, sq = torch_backend.forward(x, w, t, b, temperature, None, True, return_entropy_change=True)
    LSE, logp, H_, dH = fdist.merge_shard_stats(lse[None], zt[None], ent[None], sq[None])
    torch.testing.assert_close(dH, entropy_change(zt - lse, ent, sq), atol=1e-12, rtol=0)
    assert len(fdist.merge_shard_stats(lse[None], zt[None], ent[None])) == 3


def test_entropy_change_vocab_parallel_2_ranks():
    launch(_worker, 2, ("torch", "reference", "triton"))
