"""Sampling replay under vocab parallelism: 2 spawned Gloo ranks, uneven shards.

Each rank keeps the kept ids of its shard (and the target where it holds it), computes its part of the kept
LSE / entropy and the full row's, and one ``all_gather`` merges them (``fusedrl.distributed.merge_shard_stats``,
the core op's merge). Checked inside each child against the single-process result on the whole vocabulary:
log-probs, entropy (kept and full support), the kept mass, dx, each rank's dW / db shard, both layouts of
``sampling_mask``, a token without a set and a shard holding none of a token's kept ids, the union path with a
shard holding none of a chunk's ids; then the fused loss
(recompute: vocab parallel never takes the one-pass schedule). The recomputed truncation raises there.
"""

import pytest
import torch
import torch.distributed as dist
from _dist import finish, init, launch

import fusedrl

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

V, H, N, K = 29, 8, 12, 4
SIZES = [13, 16]


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.25
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, V, (N,), generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    ids[0] = -1  # no set: the full vocabulary there
    ids[1] = torch.tensor([0, 1, 2, -1])  # every kept id in rank 0's shard
    t[1] = 20  # the target in rank 1's (always counted)
    ids[2, :2] = -1
    return x, w, b, t, ids


def _packed(ids):
    used = ids >= 0
    return ids[used].to(torch.int32), used.sum(-1).to(torch.int32)


def _one(x, w, b, t, mask, support, group=None, start=0, end=V):
    xs, ws, bs = (p.clone().requires_grad_() for p in (x, w[start:end], b[start:end]))
    lp, ent = fusedrl.linear_logprob_entropy(xs, ws, t, bs, 0.8, 3.0, True, "torch", group, sampling_mask=mask,
                                             entropy_support=support)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    g_lp, g_h = torch.randn(2, N, generator=g, dtype=torch.float64)
    (lp * g_lp + ent * g_h).sum().backward()
    return lp.detach(), ent.detach(), xs.grad, ws.grad, bs.grad


def _worker(rank, world, init_method, _):
    init(rank, world, init_method)
    group = dist.group.WORLD
    start = sum(SIZES[:rank])
    end = start + SIZES[rank]
    x, w, b, t, ids = _data(0)
    for layout in ("padded", "packed"):
        mask = ids if layout == "padded" else _packed(ids)
        for support in ("kept", "full"):
            tag = f"[{layout} {support} rank={rank}]"
            want = _one(x, w, b, t, mask, support)
            got = _one(x, w, b, t, mask, support, group, start, end)
            for name, a, c in zip(("logp", "entropy", "dx"), got[:3], want[:3]):
                torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-10, msg=lambda m, n=name, s=tag: f"{s} {n}: {m}")
            torch.testing.assert_close(got[3], want[3][start:end], atol=1e-10, rtol=1e-10, msg=f"{tag} dW shard")
            torch.testing.assert_close(got[4], want[4][start:end], atol=1e-10, rtol=1e-10, msg=f"{tag} db shard")
    # the union path (every token has a set, kept entropy): sets across both shards, then sets that rank 1
    # holds none of (its union is empty: no columns, it still joins the merge)
    g = torch.Generator().manual_seed(3)
    spread = ids.clone()
    spread[0] = torch.tensor([3, 14, 27, -1])
    only0 = torch.stack([torch.randperm(SIZES[0], generator=g)[:K] for _ in range(N)])
    slot_rule = fusedrl.ops.slot_layout_for
    for name, sets, tg, gather in (("spread", spread, t, False), ("rank-0 only", only0, only0[:, 1], False),
                                   ("spread, gathered", spread, t, True),
                                   ("rank-0 only, gathered", only0, only0[:, 1], True)):  # fmt: skip
        fusedrl.ops.slot_layout_for = (lambda w: False) if gather else slot_rule
        want = _one(x, w, b, tg, sets, "kept")
        got = _one(x, w, b, tg, sets, "kept", group, start, end)
        fusedrl.ops.slot_layout_for = slot_rule
        for what, a, c in zip(("logp", "entropy", "dx"), got[:3], want[:3]):
            torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-10, msg=lambda m, n=what, s=name: f"{s} {n}: {m}")
        torch.testing.assert_close(got[3], want[3][start:end], atol=1e-10, rtol=1e-10, msg=f"{name} dW shard")
    # the fused loss: loss, metrics (kept mass included) and gradients
    B, T = 3, 4
    old = -torch.rand(B, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 1.0
    adv = torch.randn(B, T, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[2, 3] = False
    cfg = fusedrl.PolicyLossConfig(entropy_coeff=0.01)
    outs = []
    for grp, lo, hi in ((None, 0, V), (group, start, end)):
        xs, ws = x.clone().reshape(B, T, H).requires_grad_(), w[lo:hi].clone().requires_grad_()
        loss, m = fusedrl.fused_policy_loss(xs, ws, t.reshape(B, T), old, adv, valid, bias=b[lo:hi], config=cfg,
                                            process_group=grp, sampling_mask=ids.reshape(B, T, K))  # fmt: skip
        loss.backward()
        outs.append((loss.detach(), m, xs.grad, ws.grad))
    (l0, m0, dx0, dw0), (l1, m1, dx1, dw1) = outs
    torch.testing.assert_close(l1, l0, atol=1e-12, rtol=1e-12)
    for k in ("replay_frac", "kept_mass", "entropy"):
        torch.testing.assert_close(m1[k], m0[k], atol=1e-6, rtol=1e-6, msg=k)
    torch.testing.assert_close(dx1, dx0, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(dw1, dw0[start:end], atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="sampling_mask="):
        fusedrl.linear_logprob_entropy(x, w[start:end], t, None, 1.0, None, True, "torch", group, top_k=5)
    finish()


def test_replay_vocab_parallel_2_ranks():
    launch(_worker, 2, None)
