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
    mask = torch.rand(B, T, generator=g) > 0.15
    mask[0, :2] = True
    mask[1, 0] = True
    old = -2 + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = -2 + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    temp = 0.6 + torch.rand(B, T, generator=g, dtype=torch.float64)
    return dict(x=x, w=w, b=b, t=t, ids=ids, mask=mask, old=old, adv=adv, ref=ref, temp=temp)


def members(ids, t, v=V):
    """``[..., V]`` bool: the kept set, target added; a token without ids keeps everything."""
    m = torch.zeros(*ids.shape[:-1], v, dtype=torch.bool).scatter_(-1, ids.clamp_min(0), ids >= 0)
    m |= ~(ids >= 0).any(-1, keepdim=True)
    return m.scatter_(-1, t[..., None], True)


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", ["one_pass", "recompute"])
@pytest.mark.parametrize("support", ["kept", "full"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fused_loss_matches_oracle(config, support, schedule, backend):
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
def test_packed_layouts_and_sequences(schedule):
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


def test_core_op_and_union_path_equal_full_path():
    """linear_logprob_entropy on kept sets; the union path (every token with a set, kept entropy) equals the
    full path over the same sets."""
    d = case(seed=5)
    ids = d["ids"].clone()
    ids[0, 0] = torch.arange(K)
    x, w, b, t = d["x"].reshape(-1, H), d["w"], d["b"], d["t"].reshape(-1)
    kept = as_kept_sets(ids, (B, T), V, CPU, True)
    union = make_replay(kept, None, "kept", True, V)
    assert not union.full
    outs = []
    for rp in (union, union._replace(full=True)):
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
