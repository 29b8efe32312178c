"""Sampling replay, part by part: the two mask layouts, vLLM's keep rule against a plain transcription of
vLLM's reference, and the kept-set log-probs against materialised fp64 logits."""

from __future__ import annotations

import math

import pytest
import torch
from _replay_oracle import plain_kept, vllm_reference

from fusedrl.replay import ReplayLogprob, Truncation, as_kept_sets, check_truncation, keep_mask, make_replay

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------


def test_packed_and_padded_layouts_agree():
    rows = [[3, 7, 9], [], [0], [5, 6]]
    flat = torch.tensor([i for r in rows for i in r], dtype=torch.int32)
    counts = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    padded = torch.full((4, 3), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = torch.tensor(r)
    a = as_kept_sets((flat, counts), (4,), 10, CPU, True)
    b = as_kept_sets(padded, (4,), 10, CPU, True)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.counts, b.counts)
    assert a.replay.tolist() == [True, False, True, True]
    c = as_kept_sets((flat, counts.reshape(2, 2)), (2, 2), 10, CPU, True)  # counts in the tokens' shape
    assert torch.equal(c.ids, a.ids)


@pytest.mark.parametrize(
    "mask, match",
    [
        ((torch.tensor([1, 1]), torch.tensor([2, 0])), "twice"),
        ((torch.tensor([1, 12]), torch.tensor([2, 0])), r"\[0, 10\)"),
        ((torch.tensor([1, 2, 3]), torch.tensor([2, 0])), "sum\\(counts\\)"),
        ((torch.tensor([1]), torch.tensor([1, 0, 0])), "counts"),
        ((torch.tensor([1.0]), torch.tensor([1, 0])), "integer"),
        (torch.tensor([[1, 2], [3, -2]]), ">= 0"),
        (torch.tensor([[1, 2, 3]]), "shape"),
        ((torch.tensor([1]),), "pair"),
    ],
)
def test_bad_masks_name_sampling_mask(mask, match):
    with pytest.raises((ValueError, TypeError), match=match) as err:
        as_kept_sets(mask, (2,), 10, CPU, True)
    assert "sampling_mask" in str(err.value)


def test_checks_off_stay_in_bounds():
    k = as_kept_sets(torch.tensor([[1, 99, -1], [4, 4, 2]]), (2,), 10, CPU, False)
    assert k.ids.max() < 10 and k.counts.tolist() == [1, 3]


@pytest.mark.parametrize("support,entropy", [("kept", False), ("kept", True), ("full", True)])
@pytest.mark.parametrize("layout", ["slots", "gather"])
def test_out_of_range_targets_with_checks_off(support, entropy, layout, monkeypatch):
    """Checks off: a target outside the vocabulary reads no weight row; its log-prob is ``-LSE_S`` (the target
    logit read as 0), as the core op's without replay."""
    import fusedrl

    if layout == "gather":
        monkeypatch.setattr(fusedrl.ops, "slot_layout_for", lambda w: False)
    g = torch.Generator().manual_seed(0)
    n, h, v = 4, 8, 37
    x, w = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 40, 3, -2])
    ids = torch.tensor([[1, 2, -1], [3, 4, 5], [3, 6, -1], [7, 8, 9]])
    lp, _ = fusedrl.linear_logprob_entropy(x, w, t, sampling_mask=ids, return_entropy=entropy,
                                           entropy_support=support, check_inputs=False)  # fmt: skip
    member = torch.zeros(n, v, dtype=torch.bool)
    for r in range(n):
        for i in ids[r].tolist() + [int(t[r])]:
            if 0 <= i < v:
                member[r, i] = True
    z = x @ w.t()
    inside = (t >= 0) & (t < v)
    zt = torch.where(inside, z.gather(1, t.clamp(0, v - 1)[:, None]).squeeze(1), torch.zeros(n, dtype=z.dtype))
    want = zt - torch.logsumexp(z.masked_fill(~member, -math.inf), -1)
    torch.testing.assert_close(lp, want, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# vLLM's keep rule
# ------------------------------------------------------------------------------------------------


def _logits(kind, r=6, v=257, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(r, v, generator=g)
    if kind == "peaked":
        z = z * 6
    if kind == "ties":
        z = torch.round(z * 2) / 2  # many equal logits, ties at every boundary
    return z


@pytest.mark.parametrize("kind", ["random", "peaked", "ties"])
@pytest.mark.parametrize(
    "top_k, top_p, min_p",
    [(20, None, None), (None, 0.9, None), (None, None, 0.05), (50, 0.8, None), (40, 0.95, 0.01), (1, None, None),
     (0, 1.0, 0.0), (300, 0.5, 0.2), ([3, 0, 7, 257, 10, 1], [0.5, 1.0, 0.9, 0.7, 0.99, 0.3], None)],
)  # fmt: skip
def test_keep_mask_equals_vllm_reference(kind, top_k, top_p, min_p):
    z = _logits(kind)
    n = z.shape[0]
    k = torch.tensor(top_k) if isinstance(top_k, list) else top_k
    p = torch.tensor(top_p) if isinstance(top_p, list) else top_p
    tr = check_truncation(k, p, min_p, (n,), CPU, True)
    got = keep_mask(z, tr)
    want = vllm_reference(
        z,
        None if tr.min_p is None else tr.min_p.tolist(),
        None if tr.top_k is None else tr.top_k.tolist(),
        None if tr.top_p is None else tr.top_p.tolist(),
    )
    assert torch.equal(got, want)
    assert got.any(-1).all()  # the largest logit always stays


def test_truncation_arguments_checked():
    for kw, match in (
        (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(min_p=-0.1), "min_p"),
        (dict(top_k=2.5), "top_k"), (dict(top_k=torch.ones(5, dtype=torch.long)), "top_k"),
        (dict(top_p="0.9"), "top_p"), (dict(min_p=torch.tensor([0.1, 2.0, 0.1])), "min_p"),
    ):  # fmt: skip
        args = dict(top_k=None, top_p=None, min_p=None)
        args.update(kw)
        with pytest.raises((TypeError, ValueError), match=match):
            check_truncation(args["top_k"], args["top_p"], args["min_p"], (3,), CPU, True)
    assert check_truncation(None, None, None, (3,), CPU, True) is None
    tr = check_truncation(torch.tensor([5, 6]), None, None, (2, 4), CPU, True)  # per sequence of [B, T]
    assert tr.top_k.tolist() == [5, 5, 5, 5, 6, 6, 6, 6]


# ------------------------------------------------------------------------------------------------
# kept-set log-probs against materialised fp64 logits
# ------------------------------------------------------------------------------------------------


def _case(n=13, h=24, v=507, k=6, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=torch.float64) / h**0.25
    w = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.25 * 2
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    ids[0, :] = -1
    ids[0, 0] = t[0]  # K = 1: only the target
    ids[1, : k - 2] = torch.randperm(v, generator=g)[: k - 2]  # target outside the kept set
    ids[1][ids[1] == t[1]] = (t[1] + 1) % v
    ids[2, 0] = t[2]
    return x, w, b, t, ids


def _run(fn, leaves, n, need_ent, seed=7):
    """(outputs, grads of a random linear function of them w.r.t. ``leaves``)."""
    g = torch.Generator().manual_seed(seed)
    g1, g2 = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    lp, ent = fn(*leaves)
    out = (lp * g1).sum() + ((ent * g2).sum() if need_ent else 0)
    return (lp, ent), torch.autograd.grad(out, [a for a in leaves if a is not None])


@pytest.mark.parametrize("support", ["kept", "full"])
@pytest.mark.parametrize("temp", ["scalar", "per-token"])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("need_ent", [False, True])
@pytest.mark.parametrize("no_replay_row", [False, True])
def test_kept_logprob_matches_materialised(support, temp, softcap, need_ent, no_replay_row):
    """Explicit kept sets, on the union path (kept entropy or none, every token replayed) and the full path
    (full entropy, or a token without a kept set): values and dx, dW, db."""
    x, w, b, t, ids = _case()
    n, v = x.shape[0], w.shape[0]
    if no_replay_row:
        ids[5] = -1
    temperature = 0.7 if temp == "scalar" else torch.linspace(0.5, 1.5, n, dtype=torch.float64)
    member = torch.zeros(n, v, dtype=torch.bool)
    for i in range(n):
        member[i, ids[i][ids[i] >= 0]] = True
    member[~member.any(-1)] = True  # no kept set: the full vocabulary
    kept = as_kept_sets(ids, (n,), v, CPU, True)
    replay = make_replay(kept, None, support, need_ent, v)
    assert replay.full == (no_replay_row or (need_ent and support == "full"))
    leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    full_lp = []

    def ours(xs, ws, bs):
        lp, ent, lpf = ReplayLogprob.apply(xs, ws, bs, t, replay, temperature, softcap, need_ent)
        full_lp.append(lpf)
        return lp, ent

    def ref(xr, wr, br):
        lp, ent_k, ent_f, _ = plain_kept(xr, wr, br, t, member, temperature, softcap)
        return lp, ent_f if support == "full" else ent_k

    (lp, ent), ga = _run(ours, leaves, n, need_ent)
    (lp_r, ent_r), gb = _run(ref, [a.clone().requires_grad_() for a in (x, w, b)], n, need_ent)
    torch.testing.assert_close(lp, lp_r, atol=1e-12, rtol=0)
    assert lp[0].abs() < 1e-12  # K = 1: log-prob 0 exactly
    if need_ent:
        torch.testing.assert_close(ent, ent_r, atol=1e-12, rtol=0)
    for a, r in zip(ga, gb):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=0)
    if replay.full:  # the full row's log-prob, for the kept mass
        torch.testing.assert_close(full_lp[0], plain_kept(x, w, b, t, member, temperature, softcap)[3])
    if not need_ent or support == "kept":  # gradients reach the kept logits only
        touched = member.any(0)
        touched[t] = True
        assert (ga[1][~touched] == 0).all() and (ga[2][~touched] == 0).all()


@pytest.mark.parametrize("support", ["kept", "full"])
@pytest.mark.parametrize("need_ent", [False, True])
def test_truncated_logprob_matches_materialised(support, need_ent):
    x, w, b, t, _ = _case(n=11, seed=3)
    n, v = x.shape[0], w.shape[0]
    temperature = torch.linspace(0.6, 1.2, n, dtype=torch.float64)
    tr = check_truncation(torch.tensor([3, 0, 20, 507, 1, 8, 50, 2, 9, 30, 4]), 0.9, 0.02, (n,), CPU, True)
    with torch.no_grad():
        z = ((x @ w.t() + b) / temperature[:, None]).float()
    member = keep_mask(z.double(), tr)
    replay = make_replay(None, tr, support, need_ent, v)
    assert replay.full

    def ours(xs, ws, bs):
        return ReplayLogprob.apply(xs, ws, bs, t, replay, temperature, None, need_ent)[:2]

    def ref(xr, wr, br):
        lp, ent_k, ent_f, _ = plain_kept(xr, wr, br, t, member, temperature, None)
        return lp, ent_f if support == "full" else ent_k

    (lp, ent), ga = _run(ours, [a.clone().requires_grad_() for a in (x, w, b)], n, need_ent)
    (lp_r, ent_r), gb = _run(ref, [a.clone().requires_grad_() for a in (x, w, b)], n, need_ent)
    torch.testing.assert_close(lp, lp_r, atol=1e-12, rtol=0)
    if need_ent:
        torch.testing.assert_close(ent, ent_r, atol=1e-12, rtol=0)
    for a, r in zip(ga, gb):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=0)


def test_truncation_off_everywhere_is_no_replay():
    n, v = 4, 50
    off = check_truncation(0, 1.0, 0.0, (n,), CPU, True)
    assert make_replay(None, off, "full", True, v) is None
    assert make_replay(None, check_truncation(v + 3, None, None, (n,), CPU, True), "full", True, v) is None
    with pytest.raises(ValueError, match="sampling_mask and top_k"):
        make_replay(as_kept_sets(torch.zeros(n, 1, dtype=torch.long), (n,), v, CPU, True), off, "full", True, v)


def test_truncation_object_rows():
    tr = Truncation(torch.arange(5), None, torch.zeros(5))
    assert tr.rows(1, 3).top_k.tolist() == [1, 2] and tr.rows(1, 3).top_p is None
