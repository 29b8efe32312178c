"""Sampling replay through the public entry points (``fused_policy_loss`` on both schedules and every CPU
backend, ``linear_logprob_entropy``) against a plain fp64 oracle: materialised logits, the kept set (target
added; no set: the full vocabulary), log_softmax over it, the entropy over its support, then
:func:`fusedrl.policy_loss`. Values, dx, dW, db under a random upstream gradient; both layouts of
``sampling_mask``, padded and packed sequences, count 0, K = 1, a target outside its set, per-token
temperature, softcap, bias, 16-bit inputs; the recomputed truncation against vLLM's rule; the union path
against the full path."""

from __future__ import annotations

import math

import pytest
import torch
from _replay_oracle import vllm_reference

import fusedrl
from fusedrl import PolicyLossConfig
from fusedrl.replay import ReplayLogprob, as_kept_sets, make_replay

B, T, H, V, K = 3, 6, 16, 67, 5
CPU = torch.device("cpu")
BACKENDS = ("torch", "reference", "auto")
CONFIGS = {
    "ppo": PolicyLossConfig(),
    "entropy-bonus": PolicyLossConfig(entropy_coeff=0.02, kl_loss_coef=0.05),
    "gspo": PolicyLossConfig(loss_mode="gspo", loss_agg_mode="seq-mean-token-mean"),
    "kl-cov": PolicyLossConfig(loss_mode="kl_cov", kl_cov_ratio=0.2),
    "entropy-quantile": PolicyLossConfig(top_entropy_quantile=0.5),
}


def case(seed=0, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, H, generator=g, dtype=torch.float64) / H**0.25 * 2).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.25).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
    t = torch.randint(0, V, (B, T), generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).reshape(B, T, K)
    ids[0, 0] = -1  # count 0: the full vocabulary
    ids[0, 1, 1:] = -1
    ids[0, 1, 0] = t[0, 1]  # K = 1: log-prob 0
    ids[1, 0][ids[1, 0] == t[1, 0]] = (t[1, 0] + 1) % V  # the target outside its set (counted in S)
    ids[2, 3] = torch.tensor([0, 5, -1, -1, -1])  # a short set (padding after its ids), id 0 among them
    t[2, 3] = 9
    ids[2, 4] = torch.tensor([-1, 3, -1, 7, -1])  # padding anywhere in the row
    t[2, 4] = 3
    mask = torch.rand(B, T, generator=g) > 0.15
    mask[0, :2] = True
    mask[1, 0] = True
    old = -2 + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = -2 + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    temp = 0.6 + torch.rand(B, T, generator=g, dtype=torch.float64)
    return dict(x=x, w=w, b=b, t=t, ids=ids, mask=mask, old=old, adv=adv, ref=ref, temp=temp)


def members(ids, t, v=V):
    """``[..., V]`` bool: the kept set, target added; a token without ids keeps everything (plain loops)."""
    flat_ids, flat_t = ids.reshape(-1, ids.shape[-1]).tolist(), t.reshape(-1).tolist()
    m = torch.zeros(len(flat_t), v, dtype=torch.bool)
    for n, (row, target) in enumerate(zip(flat_ids, flat_t)):
        kept = [i for i in row if i >= 0]
        if not kept:
            m[n] = True
        for i in kept + [target]:
            m[n, i] = True
    return m.reshape(*t.shape, v)


def oracle_logp_ent(x, w, b, t, member, temperature, softcap, support):
    u = x @ w.t() + (0 if b is None else b)
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    z = u / (temperature[..., None] if isinstance(temperature, torch.Tensor) else temperature)
    lsm = torch.where(member, torch.log_softmax(z.masked_fill(~member, -math.inf), -1), torch.zeros_like(z))
    logp = lsm.gather(-1, t[..., None]).squeeze(-1)
    if support == "kept":
        ent = -(torch.where(member, lsm.exp(), torch.zeros_like(z)) * lsm).sum(-1)
    else:
        full = torch.log_softmax(z, -1)
        ent = -(full.exp() * full).sum(-1)
    return logp, ent, z


def oracle_loss(d, member, cfg, support, temperature, softcap, g, cu_seqlens=None):
    leaves = [d[k].double().clone().requires_grad_() for k in ("x", "w", "b")]
    logp, ent, _ = oracle_logp_ent(*leaves, d["t"], member, temperature, softcap, support)
    loss, metrics = fusedrl.policy_loss(logp, d["old"], d["adv"], d["mask"], entropy=ent, ref_logp=d["ref"],
                                        cu_seqlens=cu_seqlens, config=cfg)  # fmt: skip
    return loss.detach(), metrics, torch.autograd.grad(loss * g, leaves)


def ours(d, cfg, schedule, backend, g, **kw):
    leaves = [d[k].clone().requires_grad_() for k in ("x", "w", "b")]
    loss, metrics = fusedrl.fused_policy_loss(leaves[0], leaves[1], d["t"], d["old"], d["adv"], d["mask"],
                                              ref_logp=d["ref"], bias=leaves[2], config=cfg, schedule=schedule,
                                              backend=backend, **kw)  # fmt: skip
    return loss.detach(), metrics, torch.autograd.grad(loss * g, leaves)


def close(got, want, atol=1e-10, rtol=1e-9, what=""):
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.fixture(params=["slots", "gather"])
def layout(request, monkeypatch):
    """The union path's two layouts on CPU: each row's own slots (sparse products, the fp32 / fp64 default)
    and the gathered union ``W[U]`` (16-bit, CUDA)."""
    if request.param == "gather":
        monkeypatch.setattr(fusedrl.ops, "slot_layout_for", lambda w: False)
    return request.param


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", ["one_pass", "recompute"])
@pytest.mark.parametrize("support", ["kept", "full"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fused_loss_matches_oracle(config, support, schedule, backend, layout):
    if backend == "reference" and schedule == "one_pass":
        pytest.skip("the reference backend is eager autograd: it refuses the one-pass schedule on every call")
    d = case(seed=list(CONFIGS).index(config))
    cfg = CONFIGS[config]
    g = 0.7
    want = oracle_loss(d, members(d["ids"], d["t"]), cfg, support, d["temp"], 2.5, g)
    got = ours(d, cfg, schedule, backend, g, sampling_mask=d["ids"], entropy_support=support, temperature=d["temp"],
               softcap=2.5, return_entropy=True)  # fmt: skip
    close(got[0], want[0], what="loss")
    for name, a, c in zip(("dx", "dW", "db"), got[2], want[2]):
        close(a, c, what=name)
    for k in want[1]:
        close(got[1][k], want[1][k], atol=1e-6, rtol=1e-5, what=k)
    valid = d["mask"]
    replayed = (d["ids"] >= 0).any(-1) & valid
    close(got[1]["replay_frac"], replayed.sum() / valid.sum(), what="replay_frac")
    # the kept mass: a token without a set forces the full rows here, so it is always reported
    _, _, z = oracle_logp_ent(d["x"], d["w"], d["b"], d["t"], members(d["ids"], d["t"]), d["temp"], 2.5, support)
    mass = (torch.softmax(z, -1) * members(d["ids"], d["t"])).sum(-1)
    close(got[1]["kept_mass"], mass[replayed].mean(), atol=1e-6, rtol=1e-6, what="kept_mass")


@pytest.mark.parametrize("schedule", ["one_pass", "recompute"])
def test_packed_layouts_and_sequences(schedule, layout):
    """Packed sequences (cu_seqlens) with packed (ids, counts) kept sets equal the padded call."""
    d = case(seed=7)
    lens = [T, 4, 2]
    idx = torch.cat([torch.arange(i * T, i * T + n) for i, n in enumerate(lens)])
    cu = torch.tensor([0, T, T + 4, T + 6])
    flat = {
        k: d[k].reshape(B * T, *d[k].shape[2:])[idx] for k in ("x", "t", "ids", "mask", "old", "adv", "ref", "temp")
    }
    used = flat["ids"] >= 0
    packed_mask = (flat["ids"][used].to(torch.int32), used.sum(-1).to(torch.int32))
    cfg = PolicyLossConfig(loss_mode="gspo", loss_agg_mode="seq-mean-token-mean", entropy_coeff=0.01)
    want = oracle_loss(dict(d, **flat), members(flat["ids"], flat["t"]), cfg, "kept", flat["temp"], None, 1.3, cu)
    leaves = [flat["x"].clone().requires_grad_(), d["w"].clone().requires_grad_(), d["b"].clone().requires_grad_()]
    loss, _ = fusedrl.fused_policy_loss(leaves[0], leaves[1], flat["t"], flat["old"], flat["adv"], flat["mask"],
                                        ref_logp=flat["ref"], bias=leaves[2], cu_seqlens=cu, temperature=flat["temp"],
                                        config=cfg, schedule=schedule, sampling_mask=packed_mask,
                                        entropy_support="kept")  # fmt: skip
    close(loss.detach(), want[0], what="loss")
    for name, a, c in zip(("dx", "dW", "db"), torch.autograd.grad(loss * 1.3, leaves), want[2]):
        close(a, c, what=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("schedule", ["one_pass", "recompute"])
def test_low_precision_within_torch_error(dtype, schedule):
    """16-bit / fp32 inputs: the error to the fp64 oracle is within a small multiple of eager torch's own
    error at that precision (the logits in the input dtype, log_softmax in fp32)."""
    d = case(seed=3, dtype=dtype)
    cfg = PolicyLossConfig(entropy_coeff=0.01)
    member = members(d["ids"], d["t"])
    want = oracle_loss(d, member, cfg, "full", 1.0, None, 1.0)
    got = ours(d, cfg, schedule, "torch", 1.0, sampling_mask=d["ids"])
    z = (d["x"] @ d["w"].t() + d["b"]).float()  # eager torch in the input dtype
    lp = torch.where(member, torch.log_softmax(z.masked_fill(~member, -math.inf), -1), 0.0).gather(
        -1, d["t"][..., None]
    )
    eager_err = (lp.squeeze(-1).double() - oracle_logp_ent(*(d[k].double() for k in ("x", "w", "b")), d["t"], member,
                                                           1.0, None, "full")[0]).abs().max()  # fmt: skip
    bound = max(4 * float(eager_err), 1e-5)
    close(got[0], want[0], atol=bound, rtol=0, what="loss")
    for name, a, c in zip(("dx", "dW"), got[2], want[2]):
        close(a, c, atol=bound * (1 + float(c.abs().max())), rtol=0, what=name)


TRUNCATIONS = [
    dict(top_k=7),
    dict(top_p=0.8),
    dict(min_p=0.05),
    dict(top_k=10, top_p=0.9, min_p=0.01),
    dict(top_k=torch.tensor([3, 0, 67]), top_p=torch.tensor([0.5, 0.95, 1.0])),  # per sequence
]


@pytest.mark.parametrize("schedule", ["one_pass", "recompute"])
@pytest.mark.parametrize("params", TRUNCATIONS)
def test_recomputed_truncation_matches_vllm_rule(schedule, params):
    d = case(seed=11)
    temp = 0.8
    with torch.no_grad():
        z = (d["x"] @ d["w"].t() + d["b"]) / temp
    per = {k: (v[:, None].expand(B, T).reshape(-1).tolist() if isinstance(v, torch.Tensor) else [v] * (B * T))
           for k, v in params.items()}  # fmt: skip
    keep = vllm_reference(z.reshape(B * T, V), per.get("min_p"), per.get("top_k"), per.get("top_p")).reshape(B, T, V)
    cfg = PolicyLossConfig(entropy_coeff=0.01)
    want = oracle_loss(d, keep.clone().scatter_(-1, d["t"][..., None], True), cfg, "full", temp, None, 0.9)
    got = ours(d, cfg, schedule, "torch", 0.9, temperature=temp, **params)
    close(got[0], want[0], what="loss")
    for name, a, c in zip(("dx", "dW", "db"), got[2], want[2]):
        close(a, c, what=name)
    assert float(got[1]["kept_mass"]) <= 1.0


def test_core_op_and_union_path_equal_full_path(layout):
    """linear_logprob_entropy on kept sets; the union path (every token with a set, kept entropy), on either
    layout, equals the full path over the same sets."""
    d = case(seed=5)
    ids = d["ids"].clone()
    ids[0, 0] = torch.arange(K)
    x, w, b, t = d["x"].reshape(-1, H), d["w"], d["b"], d["t"].reshape(-1)
    kept = as_kept_sets(ids, (B, T), V, CPU, True)
    union = make_replay(kept, None, "kept", True, V, slots=layout == "slots")
    assert not union.full and union.slots == (layout == "slots")
    outs = []
    for rp in (union, union._replace(full=True, slots=False)):
        leaves = [a.clone().requires_grad_() for a in (x, w, b)]
        lp, ent, _ = ReplayLogprob.apply(*leaves, t, rp, d["temp"].reshape(-1), 3.0, True)
        grads = torch.autograd.grad((lp * torch.arange(B * T) + ent).sum(), leaves)
        outs.append((lp, ent, *grads))
    for a, c in zip(*outs):
        close(a, c, atol=1e-12, rtol=1e-12)
    leaves = [a.clone().requires_grad_() for a in (d["x"], w, b)]
    lp, ent = fusedrl.linear_logprob_entropy(leaves[0], leaves[1], d["t"], leaves[2], d["temp"], 3.0,
                                             sampling_mask=ids, entropy_support="kept")  # fmt: skip
    want_lp, want_ent, _ = oracle_logp_ent(d["x"], w, b, d["t"], members(ids, d["t"]), d["temp"], 3.0, "kept")
    close(lp, want_lp)
    close(ent, want_ent)


@pytest.mark.parametrize("schedule", ["one_pass", "recompute"])
def test_all_masked_batch_zero_loss_zero_grads(schedule):
    d = case(seed=2)
    d["mask"] = torch.zeros_like(d["mask"])
    loss, _, grads = ours(d, PolicyLossConfig(entropy_coeff=0.01), schedule, "torch", 1.0, sampling_mask=d["ids"],
                          return_entropy=True)  # fmt: skip
    assert float(loss) == 0.0 and all(float(gr.abs().max()) == 0.0 for gr in grads)


def test_return_entropy_change_refused_under_replay():
    d = case()
    with pytest.raises(ValueError, match="return_entropy_change"):
        fusedrl.linear_logprob_entropy(d["x"], d["w"], d["t"], top_k=5, return_entropy_change=True)


def test_empty_batch_keeps_the_graph():
    """No token: the kept-set log-prob still carries a gradient (zero), on both schedules."""
    x = torch.randn(0, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    lp, _ = fusedrl.linear_logprob_entropy(x, w, torch.zeros(0, dtype=torch.long), sampling_mask=torch.zeros(0, 2,
                                           dtype=torch.long))  # fmt: skip
    assert lp.requires_grad
    for schedule in ("one_pass", "recompute"):
        xb = torch.randn(2, 0, H, dtype=torch.float64, requires_grad=True)
        z = torch.zeros(2, 0)
        loss, _ = fusedrl.fused_policy_loss(xb, w, z.long(), z.double(), z.double(), z.bool(), schedule=schedule,
                                            sampling_mask=torch.zeros(2, 0, 3, dtype=torch.long))  # fmt: skip
        loss.backward()
        assert float(loss.detach()) == 0.0 and float(xb.grad.abs().sum()) == 0.0


def test_packed_ids_must_be_non_negative():
    d = case()
    with pytest.raises(ValueError, match="sampling_mask"):
        fusedrl.linear_logprob_entropy(d["x"], d["w"], d["t"], sampling_mask=(torch.tensor([-1] + [1] * (B * T - 1)),
                                       torch.ones(B, T, dtype=torch.long)))  # fmt: skip


@pytest.mark.parametrize("schedule", ["one_pass", "recompute"])
def test_per_sequence_truncation_with_packed_sequences(schedule):
    """top_k / top_p per sequence with cu_seqlens: as per token, like temperature."""
    d = case(seed=4)
    cu = torch.tensor([0, 5, 11, B * T])
    flat = {k: d[k].reshape(B * T, *d[k].shape[2:]) for k in ("x", "t", "mask", "old", "adv")}
    k_seq, p_seq = torch.tensor([3, 0, 9]), torch.tensor([0.7, 0.9, 1.0])
    lens = (cu[1:] - cu[:-1]).tolist()
    per_tok = dict(top_k=k_seq.repeat_interleave(torch.tensor(lens)), top_p=p_seq.repeat_interleave(torch.tensor(lens)))
    out = []
    for trunc in (dict(top_k=k_seq, top_p=p_seq), per_tok):
        loss, metrics = fusedrl.fused_policy_loss(flat["x"], d["w"], flat["t"], flat["old"], flat["adv"],
                                                  flat["mask"], cu_seqlens=cu, schedule=schedule, **trunc)  # fmt: skip
        out.append((loss, metrics["replay_frac"]))
    close(out[0][0], out[1][0], atol=0, rtol=0)
    close(out[0][1], out[1][1], atol=0, rtol=0)


@pytest.mark.parametrize("schedule", ["one_pass", "recompute"])
def test_replay_metrics_present_when_every_truncation_is_off(schedule):
    d = case()
    base = ours(d, PolicyLossConfig(), schedule, "torch", 1.0)
    off = ours(d, PolicyLossConfig(), schedule, "torch", 1.0, top_p=torch.ones(B))
    close(off[0], base[0], atol=0, rtol=0)
    assert float(off[1]["replay_frac"]) == 0.0 and float(off[1]["kept_mass"]) == 1.0


def test_module_truncation_gives_way_to_a_call_mask():
    """FusedPolicyLoss(top_p=...) recomputes; a sampling_mask given to one call replaces it for that call."""
    d = case(seed=6)
    mod = fusedrl.FusedPolicyLoss(top_p=0.9)
    args = (d["x"], d["w"], d["t"], d["old"], d["adv"], d["mask"])
    with_mask, _ = mod(*args, sampling_mask=d["ids"])
    want, _ = fusedrl.fused_policy_loss(*args, sampling_mask=d["ids"])
    close(with_mask, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="exclude each other"):
        mod(*args, sampling_mask=d["ids"], top_k=3)
