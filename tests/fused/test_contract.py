"""One contract on every path: ``fused_policy_loss`` (and ``FusedPolicyLoss``) accept, reject and compute the
same things on the one-pass and the recompute schedule.

A table of argument sets, valid and invalid: for each, both schedules raise the same exception type naming
the same argument, or return the same loss and gradients (fp64: to 1e-10). Out-of-range targets with the
value checks off stay in bounds on every path (torch ops, Triton kernels in the interpreter, the CUDA
kernels' host lanes): a finite log-prob of ``-LSE`` (a target logit read as 0), never an error or a crash.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fusedrl
from fusedrl import FusedPolicyLoss, PolicyLossConfig, fused_policy_loss

B, T, H, V = 2, 5, 16, 37
SCHEDULES = ("one_pass", "recompute")


def base(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g) / H**0.25).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.25).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[0, 0] = True
    old = -3 + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    ref = -3 + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return dict(hidden=hidden, weight=weight, targets=targets, old_logp=old, advantages=adv, mask=mask, ref_logp=ref)


def packed(kw):
    lens = [T, 3]
    idx = torch.cat([torch.arange(i * T, i * T + n) for i, n in enumerate(lens)])
    flat = lambda x: x.reshape(B * T, *x.shape[2:])[idx]  # noqa: E731
    kw = dict(kw)
    for k in ("hidden", "targets", "old_logp", "mask", "ref_logp"):
        kw[k] = flat(kw[k])
    kw["cu_seqlens"] = torch.tensor([0, T, T + 3], dtype=torch.int32)
    return kw


def packed_trailing(kw):
    """Packed ``[N=B*T]`` with tokens after the last sequence (``cu_seqlens = [0, T, T+3]``, N = 2T)."""
    kw = dict(kw)
    for k in ("hidden", "targets", "old_logp", "mask", "ref_logp"):
        kw[k] = kw[k].reshape(B * T, *kw[k].shape[2:])
    kw["cu_seqlens"] = torch.tensor([0, T, T + 3])
    return kw


def no_steps(kw):
    """A padded batch of B sequences with T = 0 tokens."""
    return {**kw, **{k: kw[k][:, :0] for k in ("hidden", "targets", "old_logp", "mask", "ref_logp")}}


def empty_packed(kw):
    return dict(kw, **{k: kw[k][:0, 0] for k in ("hidden", "targets", "old_logp", "mask", "ref_logp")},
                advantages=kw["advantages"][:0], cu_seqlens=torch.tensor([0]))  # fmt: skip


def kept_ids(k=4, seed=3):
    """Kept sets ``[B, T, k]`` (-1 fill), a token without one and one of a single id."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(B * T)]).reshape(B, T, k)
    ids[0, 1] = -1
    ids[1, 2, 1:] = -1
    return ids


def packed_ids(ids):
    used = ids >= 0
    return ids[used].to(torch.int32), used.sum(-1)


def _set(**changes):
    return lambda kw: {**kw, **changes}


def _with(fn):
    return lambda kw: {**kw, **fn(kw)}


def _drop(*names):
    return lambda kw: {k: v for k, v in kw.items() if k not in names}


# (id, change of the keyword arguments, None = valid, or (exception type, the argument the message names))
INVALID = [
    ("misspelled-kw", _set(temprature=0.7), (TypeError, "temprature")),
    ("unknown-kw", _set(foo=1), (TypeError, "foo")),
    ("temperature-zero", _set(temperature=0.0), (ValueError, "temperature")),
    ("temperature-negative", _set(temperature=-1.0), (ValueError, "temperature")),
    ("temperature-nan", _set(temperature=math.nan), (ValueError, "temperature")),
    ("temperature-inf", _set(temperature=math.inf), (ValueError, "temperature")),
    ("temperature-str", _set(temperature="1"), (TypeError, "temperature")),
    ("temperature-bad-shape", _set(temperature=torch.ones(3)), (ValueError, "temperature")),
    ("temperature-requires-grad", _set(temperature=torch.ones(B, T, requires_grad=True)), (ValueError, "temperature")),
    ("softcap-zero", _set(softcap=0.0), (ValueError, "softcap")),
    ("targets-float", _with(lambda kw: dict(targets=kw["targets"].double())), (TypeError, "targets")),
    ("targets-out-of-range", _with(lambda kw: dict(targets=kw["targets"] + V)), (ValueError, "targets")),
    ("old-logp-shape", _with(lambda kw: dict(old_logp=kw["old_logp"][:, :3])), (ValueError, "old_logp")),
    ("old-logp-int", _with(lambda kw: dict(old_logp=kw["old_logp"].long())), (TypeError, "old_logp")),
    ("advantages-shape", _set(advantages=torch.randn(3, dtype=torch.float64)), (ValueError, "advantages")),
    ("mask-shape", _with(lambda kw: dict(mask=kw["mask"][:, :2])), (ValueError, "mask")),
    ("mask-complex", _with(lambda kw: dict(mask=kw["mask"].to(torch.complex64))), (TypeError, "mask")),
    ("mask-fraction", _with(lambda kw: dict(mask=kw["mask"].double() * 0.5)), (ValueError, "mask")),
    ("hidden-4d", _with(lambda kw: dict(hidden=kw["hidden"][None])), (ValueError, "hidden")),
    ("hidden-weight-dtype", _with(lambda kw: dict(weight=kw["weight"].float())), (TypeError, "weight")),
    ("weight-hidden-size", _set(weight=torch.randn(V, H + 1, dtype=torch.float64)), (ValueError, "hidden size")),
    ("bias-shape", _set(bias=torch.zeros(V + 1, dtype=torch.float64)), (ValueError, "bias")),
    ("bias-int", _set(bias=torch.zeros(V, dtype=torch.long)), (TypeError, "bias")),
    ("ref-logp-shape", _with(lambda kw: dict(ref_logp=kw["ref_logp"][:1])), (ValueError, "ref_logp")),
    ("kl-without-ref", _set(ref_logp=None, config=PolicyLossConfig(kl_loss_coef=0.1)), (ValueError, "ref_logp")),
    ("rollout-logp-unused", _with(lambda kw: dict(rollout_logp=kw["old_logp"])), (ValueError, "rollout_logp")),
    (
        "cu-seqlens-float",
        _with(lambda kw: dict(packed(kw), cu_seqlens=torch.tensor([0.0, 5.0, 8.0]))),
        (TypeError, "cu_seqlens"),
    ),  # fmt: skip
    (
        "cu-seqlens-start",
        _with(lambda kw: dict(packed(kw), cu_seqlens=torch.tensor([1, 5, 8]))),
        (ValueError, "cu_seqlens"),
    ),  # fmt: skip
    ("cu-seqlens-padded", _set(cu_seqlens=torch.tensor([0, 5, 10])), (ValueError, "targets")),
    ("backend-bogus", _set(backend="bogus"), (ValueError, "backend")),
    ("schedule-bogus", None, (ValueError, "schedule")),  # the schedule itself: see test_bad_schedule_value
    ("budget-zero", _set(memory_budget_mb=0), (ValueError, "memory_budget_mb")),
    ("budget-str", _set(memory_budget_mb="512"), (ValueError, "memory_budget_mb")),
    ("budget-bool", _set(memory_budget_mb=True), (ValueError, "memory_budget_mb")),
    ("budget-nan", _set(memory_budget_mb=math.nan), (ValueError, "memory_budget_mb")),
    ("config-type", _set(config="vanilla"), (TypeError, "config")),
    ("global-num-tokens-zero", _set(global_num_tokens=0), (ValueError, "global_num_tokens")),
    ("return-entropy-str", _set(return_entropy="yes"), (TypeError, "return_entropy")),
    ("grad-filter-eps-negative", _set(grad_filter_eps=-1.0), (ValueError, "grad_filter_eps")),
    ("deterministic-str", _set(deterministic="no"), (TypeError, "deterministic")),
    ("workspace-zero", _set(workspace_mb=0), (ValueError, "workspace_mb")),
    ("check-inputs-str", _set(check_inputs="yes"), (TypeError, "check_inputs")),
    ("old-logp-other-device", _with(lambda kw: dict(old_logp=kw["old_logp"].to("meta"))), (ValueError, "old_logp")),
    ("mask-other-device", _with(lambda kw: dict(mask=kw["mask"].to("meta"))), (ValueError, "mask")),
    ("bias-other-device", _set(bias=torch.zeros(V, dtype=torch.float64, device="meta")), (ValueError, "bias")),
    ("sampling-mask-float", _set(sampling_mask=torch.zeros(B, T, 3)), (TypeError, "sampling_mask")),
    ("sampling-mask-shape", _set(sampling_mask=torch.zeros(B, 3, dtype=torch.long)), (ValueError, "sampling_mask")),
    ("sampling-mask-out-of-range", _set(sampling_mask=torch.full((B, T, 2), V)), (ValueError, "sampling_mask")),
    ("sampling-mask-repeated-id", _set(sampling_mask=torch.ones(B, T, 2, dtype=torch.long)), (ValueError,
                                                                                              "sampling_mask")),
    ("sampling-mask-counts-sum", _set(sampling_mask=(torch.arange(3), torch.ones(B, T, dtype=torch.long))),
     (ValueError, "sampling_mask")),
    ("sampling-mask-and-top-k", _set(sampling_mask=torch.zeros(B, T, 1, dtype=torch.long), top_k=5), (ValueError,
                                                                                                      "sampling_mask")),
    ("top-p-zero", _set(top_p=0.0), (ValueError, "top_p")),
    ("top-k-float", _set(top_k=2.5), (TypeError, "top_k")),
    ("min-p-above-one", _set(min_p=1.5), (ValueError, "min_p")),
    ("entropy-support-bogus", _set(entropy_support="mass"), (ValueError, "entropy_support")),
    ("replay-steer-exact", _set(top_k=5, config=PolicyLossConfig(loss_mode="steer", steer_exact=True)), (ValueError,
                                                                                                        "top_k")),
    # a tensor with no data, or on another device, never gives a silent number (nor a crash not naming it)
    ("global-num-tokens-meta", _set(global_num_tokens=torch.tensor(7.0, device="meta")), (ValueError,
                                                                                          "global_num_tokens")),
    ("global-num-seqs-meta", _set(global_num_seqs=torch.tensor(7.0, device="meta")), (ValueError, "global_num_seqs")),
    ("norm-len-meta", _set(norm_len=torch.tensor(7.0, device="meta")), (ValueError, "norm_len")),
    ("config-normaliser-meta", _set(config=PolicyLossConfig(global_num_tokens=torch.tensor(7.0, device="meta"))),
     (ValueError, "global_num_tokens")),
    ("temperature-meta-0dim", _set(temperature=torch.tensor(0.7, device="meta")), (ValueError, "temperature")),
    ("softcap-meta-0dim", _set(softcap=torch.tensor(2.5, device="meta")), (ValueError, "softcap")),
    ("temperature-per-sequence-meta", _with(lambda kw: dict(packed(kw), temperature=torch.ones(B, device="meta"))),
     (ValueError, "temperature")),
    ("top-p-per-sequence-meta", _with(lambda kw: dict(packed(kw), top_p=torch.ones(B, device="meta"))),
     (ValueError, "top_p")),
    ("cu-seqlens-meta-per-sequence-temperature",
     _with(lambda kw: dict(packed(kw), cu_seqlens=torch.tensor([0, T, T + 3], device="meta"),
                           temperature=torch.tensor([0.7, 1.3]))), (ValueError, "cu_seqlens")),
    ("cu-seqlens-2d-per-sequence-temperature",
     _with(lambda kw: dict(packed(kw), cu_seqlens=torch.tensor([[0, T], [T, T + 3]]),
                           temperature=torch.tensor([0.7, 1.3, 1.0]))), (ValueError, "cu_seqlens")),
    ("cu-seqlens-decreasing-per-sequence-temperature",
     _with(lambda kw: dict(packed(kw), cu_seqlens=torch.tensor([0, T + 3, T]), temperature=torch.tensor([0.7, 1.3]))),
     (ValueError, "cu_seqlens")),
]  # fmt: skip

VALID = [
    ("default", lambda kw: kw),
    ("numpy-temperature", _set(temperature=np.float32(0.7))),
    ("tensor-temperature-0dim", _set(temperature=torch.tensor(0.7))),
    ("per-token-temperature", _set(temperature=torch.full((B, T), 0.8, dtype=torch.float64))),
    ("per-sequence-temperature", _set(temperature=torch.tensor([0.7, 1.3]))),
    ("numpy-config", _set(config=PolicyLossConfig(clip_ratio_high=np.float64(0.28), entropy_coeff=np.float32(0.01)))),
    ("tensor-normaliser", _set(global_num_tokens=torch.tensor(7.0))),
    (
        "numpy-normaliser",
        _set(global_num_seqs=np.int64(3), config=PolicyLossConfig(loss_agg_mode="seq-mean-token-mean")),
    ),
    ("bias-fp32-with-fp64", _set(bias=torch.linspace(-1, 1, V))),
    ("bias-fp64", _set(bias=torch.linspace(-1, 1, V, dtype=torch.float64))),
    ("budget-inf", _set(memory_budget_mb=math.inf)),
    ("budget-numpy", _set(memory_budget_mb=np.float64(64.0))),
    ("packed", packed),
    ("softcap", _set(softcap=2.5)),
    ("masked-targets-minus-100", _with(lambda kw: dict(targets=kw["targets"].masked_fill(~kw["mask"], -100)))),
    ("kl-and-entropy", _set(config=PolicyLossConfig(kl_loss_coef=0.1, entropy_coeff=0.01))),
    ("kl-cov", _set(config=PolicyLossConfig(loss_mode="kl_cov", kl_cov_ratio=0.2))),
    ("gspo", _set(config=PolicyLossConfig(loss_mode="gspo", loss_agg_mode="seq-mean-token-mean"))),
    ("entropy-quantile", _set(config=PolicyLossConfig(top_entropy_quantile=0.5))),
    ("workspace", _set(workspace_mb=1.0)),
    ("return-entropy", _set(return_entropy=True)),
    ("all-masked", _with(lambda kw: dict(mask=torch.zeros_like(kw["mask"])))),
    ("replay-kept-sets", _with(lambda kw: dict(sampling_mask=kept_ids(), entropy_support="kept", return_entropy=True))),
    (
        "replay-full-entropy",
        _with(lambda kw: dict(sampling_mask=kept_ids(), config=PolicyLossConfig(entropy_coeff=0.01))),
    ),
    ("replay-packed-layout", _with(lambda kw: dict(sampling_mask=packed_ids(kept_ids())))),
    ("replay-top-p-top-k", _set(top_p=0.9, top_k=torch.tensor([5, 0]), min_p=0.01)),
    ("replay-all-masked", _with(lambda kw: dict(mask=torch.zeros_like(kw["mask"]), sampling_mask=kept_ids()))),
    ("empty-packed", empty_packed),
    ("empty-packed-geo-mean", _with(lambda kw: dict(empty_packed(kw), config=PolicyLossConfig(loss_mode="geo_mean")))),
    ("tensor-normalisers-all", _set(global_num_tokens=torch.tensor(13.0), global_num_seqs=torch.tensor(4.0),
                                    norm_len=torch.tensor(7.0))),
    ("tensor-normalisers-all-in-config", _set(config=PolicyLossConfig(
        loss_agg_mode="seq-mean-token-sum-norm", global_num_tokens=torch.tensor(13.0),
        global_num_seqs=torch.tensor(4.0), norm_len=torch.tensor(7.0)))),
    ("packed-trailing-tokens", packed_trailing),
    ("packed-trailing-geo-mean", _with(lambda kw: dict(packed_trailing(kw), config=PolicyLossConfig(
        loss_mode="geo_mean")))),
    ("packed-trailing-sequence-is", _with(lambda kw: dict(packed_trailing(kw), config=PolicyLossConfig(
        importance_sampling_level="sequence")))),
    ("packed-trailing-per-sequence-temperature", _with(lambda kw: dict(packed_trailing(kw),
                                                                       temperature=torch.tensor([0.7, 1.3])))),
    ("no-steps", no_steps),
    ("no-steps-gspo", _with(lambda kw: dict(no_steps(kw), config=PolicyLossConfig(loss_mode="gspo")))),
    ("no-steps-geo-mean", _with(lambda kw: dict(no_steps(kw), config=PolicyLossConfig(loss_mode="geo_mean")))),
    ("no-steps-vespo", _with(lambda kw: dict(no_steps(kw), config=PolicyLossConfig(loss_mode="vespo")))),
    ("no-steps-sequence-is", _with(lambda kw: dict(no_steps(kw), config=PolicyLossConfig(
        importance_sampling_level="sequence")))),
    ("no-steps-segment-is", _with(lambda kw: dict(no_steps(kw), segment_ids=torch.zeros(B, 0, dtype=torch.long),
                                                  config=PolicyLossConfig(importance_sampling_level="segment")))),
    ("workspace-inf", _set(workspace_mb=math.inf)),
    ("rollout-threshold-tensor", _with(lambda kw: dict(rollout_logp=kw["old_logp"] + 0.1, config=PolicyLossConfig(
        rollout_correction=fusedrl.RolloutCorrection(rollout_is="token", rollout_is_threshold=torch.tensor(1.5),
                                                     rollout_is_threshold_lower=np.float64(0.5)))))),
]  # fmt: skip


def _call(kw, schedule):
    kw = dict(kw)
    leaves = []
    for k in ("hidden", "weight", "bias"):
        t = kw.get(k)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
            kw[k] = t.detach().clone().requires_grad_()
            leaves.append(kw[k])
    loss, metrics = fused_policy_loss(**kw, schedule=schedule)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else ()
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads


def _outcome(kw, schedule):
    try:
        return _call(kw, schedule), None
    except Exception as e:  # noqa: BLE001 - the contract is about which exception
        return None, e


def test_table_is_large_enough():
    assert len(INVALID) + len(VALID) >= 40


@pytest.mark.parametrize("name, change, want", [c for c in INVALID if c[1] is not None], ids=lambda c: str(c)[:40])
def test_invalid_arguments_same_error_on_every_schedule(name, change, want):
    kw = change(base())
    outs = {s: _outcome(kw, s) for s in SCHEDULES}
    exc_type, argname = want
    for s, (_, err) in outs.items():
        assert err is not None, f"{name}: schedule {s} accepted it"
        assert isinstance(err, exc_type), f"{name}: schedule {s} raised {type(err).__name__}: {err}"
        assert argname in str(err), f"{name}: schedule {s}: message does not name {argname!r}: {err}"
    e1, e2 = (outs[s][1] for s in SCHEDULES)
    assert type(e1) is type(e2) and str(e1) == str(e2)


def test_bad_schedule_value():
    with pytest.raises(ValueError, match="schedule"):
        fused_policy_loss(**base(), schedule="fast")


@pytest.mark.parametrize("name, change", VALID, ids=[c[0] for c in VALID])
def test_valid_arguments_same_values_on_every_schedule(name, change):
    kw = change(base())
    out_a, err_a = _outcome(kw, "one_pass")
    assert err_a is None, f"{name}: one_pass raised {err_a!r}"
    out_b, err_b = _outcome(kw, "recompute")
    assert err_b is None, f"{name}: recompute raised {err_b!r}"
    (la, ma, ga), (lb, mb, gb) = out_a, out_b
    torch.testing.assert_close(la, lb, atol=1e-10, rtol=1e-9)
    assert list(ma) == list(mb)
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], atol=1e-7, rtol=1e-6, msg=k)
    assert len(ga) == len(gb)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    assert torch.isfinite(la)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("schedule", SCHEDULES + ("auto",))
def test_loss_value_without_autograd(mode, schedule):
    kw = base()
    want = _call(kw, "recompute")[0]
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        loss, metrics = fused_policy_loss(**kw, schedule=schedule)
    torch.testing.assert_close(loss, want, atol=1e-10, rtol=0)
    assert not loss.requires_grad


def test_fp64_per_token_temperature_stays_fp64():
    kw = base()
    temp = torch.full((B, T), 1.0 / 3.0, dtype=torch.float64)
    a = _call(dict(kw, temperature=temp), "recompute")
    b = _call(dict(kw, temperature=1.0 / 3.0), "recompute")
    torch.testing.assert_close(a[0], b[0], atol=1e-14, rtol=0)  # an fp32-rounded 1/3 would be off by ~1e-8
    for s in SCHEDULES:
        lp, _ = fusedrl.linear_logprob_entropy(kw["hidden"], kw["weight"], kw["targets"], temperature=temp)
        lq, _ = fusedrl.linear_logprob_entropy(kw["hidden"], kw["weight"], kw["targets"], temperature=1.0 / 3.0)
        torch.testing.assert_close(lp, lq, atol=1e-14, rtol=0, msg=s)


def test_module_checks_at_construction_and_call():
    with pytest.raises(TypeError, match="temprature"):
        FusedPolicyLoss(temprature=0.7)
    for bad, name in (
        (dict(memory_budget_mb=0), "memory_budget_mb"),
        (dict(schedule="fast"), "schedule"),
        (dict(backend="x"), "backend"),
        (dict(temperature=0), "temperature"),
        (dict(grad_filter_eps=-1), "grad_filter_eps"),
        (dict(config="vanilla"), "config"),
    ):
        with pytest.raises((TypeError, ValueError), match=name):
            FusedPolicyLoss(**bad)
    kw = base()
    loss_fn = FusedPolicyLoss(schedule="one_pass")
    with pytest.raises(TypeError, match="temprature"):
        loss_fn(**kw, temprature=0.7)
    a = loss_fn(**kw)[0]
    b = FusedPolicyLoss(schedule="recompute")(**kw)[0]
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_module_tensor_temperature():
    """``FusedPolicyLoss(temperature=<tensor>)`` takes what ``fused_policy_loss`` takes (per token, per
    sequence), used when a call passes none, checked against the tokens at each call."""
    kw = base()
    for temp in (torch.tensor([0.7, 1.3]), torch.full((B, T), 0.8, dtype=torch.float64)):
        for s in SCHEDULES:
            got = FusedPolicyLoss(schedule=s, temperature=temp)(**kw)[0]
            want = fused_policy_loss(**kw, temperature=temp, schedule="recompute")[0]
            torch.testing.assert_close(got, want, atol=1e-10, rtol=0, msg=s)
    with pytest.raises(TypeError, match="temperature"):
        FusedPolicyLoss(temperature=torch.ones(B, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        FusedPolicyLoss(temperature=torch.ones(B, requires_grad=True))
    for s in SCHEDULES:
        with pytest.raises(ValueError, match="temperature"):  # the shape: at the call, as fused_policy_loss
            FusedPolicyLoss(schedule=s, temperature=torch.ones(3))(**kw)
        with pytest.raises(ValueError, match="temperature"):
            FusedPolicyLoss(schedule=s, temperature=torch.tensor([0.7, -1.0]))(**kw)


EMPTY_CONFIGS = [
    PolicyLossConfig(),
    PolicyLossConfig(loss_mode="gspo"),
    PolicyLossConfig(loss_mode="geo_mean"),
    PolicyLossConfig(loss_mode="vespo"),
    PolicyLossConfig(importance_sampling_level="sequence"),
]


@pytest.mark.parametrize("layout", ["all-masked", "no-steps", "empty-packed", "trailing-masked"])
@pytest.mark.parametrize("cfg", EMPTY_CONFIGS, ids=lambda c: f"{c.loss_mode}-{c.importance_sampling_level}")
def test_nothing_to_learn_gives_zero_loss_and_zero_grads(layout, cfg):
    """No valid token (all masked, T = 0, an empty pack, valid tokens only after the last sequence): loss 0
    attached to the graph (``backward()`` works) and zero gradients, on every schedule."""
    kw = base()
    if layout == "all-masked":
        kw["mask"] = torch.zeros_like(kw["mask"])
    elif layout == "no-steps":
        kw = no_steps(kw)
    elif layout == "empty-packed":
        kw = empty_packed(kw)
    else:
        kw = packed_trailing(kw)
        kw["mask"] = torch.arange(B * T) >= T + 3
    for s in SCHEDULES + ("auto",):
        hidden = kw["hidden"].detach().clone().requires_grad_()
        weight = kw["weight"].detach().clone().requires_grad_()
        loss, _ = fused_policy_loss(**dict(kw, hidden=hidden, weight=weight), config=cfg, schedule=s)
        assert loss.requires_grad, s
        loss.backward()
        assert loss.item() == 0, s
        assert hidden.grad is not None and weight.grad is not None, s
        assert not hidden.grad.any() and not weight.grad.any(), s


def test_packed_trailing_tokens_get_no_gradient():
    kw = packed_trailing(base())
    kw["mask"] = torch.ones(B * T, dtype=torch.bool)
    for cfg in (PolicyLossConfig(loss_mode="geo_mean"), PolicyLossConfig(importance_sampling_level="sequence")):
        for s in SCHEDULES:
            hidden = kw["hidden"].detach().clone().requires_grad_()
            fused_policy_loss(**dict(kw, hidden=hidden), config=cfg, schedule=s)[0].backward()
            assert hidden.grad[: T + 3].abs().sum() > 0 and not hidden.grad[T + 3 :].any(), s


def test_normaliser_device_is_the_tokens_or_the_cpu():
    from fusedrl.loss.config import check_normaliser_devices

    cfg = PolicyLossConfig(global_num_tokens=torch.tensor(7.0), norm_len=3)
    check_normaliser_devices(cfg, torch.device("cpu"), "targets")
    check_normaliser_devices(cfg, torch.device("cuda"), "targets")  # a 0-dim host count: accepted anywhere
    for name in ("global_num_tokens", "global_num_seqs", "norm_len"):
        bad = PolicyLossConfig(**{name: torch.tensor(7.0, device="meta")})
        check_normaliser_devices(bad, torch.device("meta"), "targets")  # meta tokens: a meta loss, no number
        with pytest.raises(ValueError, match=name):
            check_normaliser_devices(bad, torch.device("cpu"), "targets")
    with pytest.raises(ValueError, match="global_num_tokens"):
        fusedrl.policy_loss(torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B), torch.ones(B, T),
                            global_num_tokens=torch.tensor(3.0, device="meta"))  # fmt: skip


def test_rollout_correction_takes_tensor_numbers():
    rc = fusedrl.RolloutCorrection(rollout_is="token", rollout_is_threshold=torch.tensor(1.5),
                                   rollout_is_threshold_lower=torch.tensor(0.5), rollout_rs="token_k1",
                                   rollout_rs_threshold=torch.tensor(2.0))  # fmt: skip
    assert rc == fusedrl.RolloutCorrection(rollout_is="token", rollout_is_threshold=1.5, rollout_is_threshold_lower=0.5,
                                           rollout_rs="token_k1", rollout_rs_threshold=2.0)  # fmt: skip
    with pytest.raises(ValueError, match="rollout_is_threshold"):
        fusedrl.RolloutCorrection(rollout_is_threshold=torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError, match="rollout_is_threshold"):
        fusedrl.RolloutCorrection(rollout_is_threshold=torch.tensor(1.5, device="meta"))


def test_config_ratios_as_verl():
    for name in ("clip_cov_ratio", "kl_cov_ratio"):
        for bad in (0, 0.0, -1e-3, 1.5, math.nan):
            with pytest.raises(ValueError, match=name):
                PolicyLossConfig(**{name: bad})


# ------------------------------------------------------------------------------------------------
# Out-of-range targets with the value checks off: in bounds on every path
# ------------------------------------------------------------------------------------------------

OOB = [V, V + 1000, -5]


def _oob_case(dtype=torch.float32):
    kw = base(dtype)
    t = kw["targets"].clone()
    t[0, 1], t[1, 2], t[1, 4] = OOB
    kw["targets"] = t
    kw["mask"] = torch.ones(B, T, dtype=torch.bool)
    return kw


def _lse(kw):
    z = kw["hidden"].double() @ kw["weight"].double().t()
    return torch.logsumexp(z, -1)


def _paths():
    out = [("torch", "one_pass"), ("torch", "recompute"), ("reference", "recompute")]
    if "triton" in fusedrl.available_backends("cpu"):
        out += [("triton", "one_pass"), ("triton", "recompute")]
    return out


@pytest.mark.parametrize("backend, schedule", _paths())
def test_out_of_range_target_stays_in_bounds(backend, schedule):
    """With checks off an out-of-range target reads a target logit of 0 (logp = -LSE): finite, no error."""
    kw = _oob_case()
    leaves = [kw["hidden"].requires_grad_(), kw["weight"].requires_grad_()]
    cfg = PolicyLossConfig(entropy_coeff=0.01)
    loss, _ = fused_policy_loss(**kw, config=cfg, backend=backend, schedule=schedule, check_inputs=False)
    grads = torch.autograd.grad(loss, leaves)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    lp, _ = fusedrl.linear_logprob_entropy(kw["hidden"].detach(), kw["weight"].detach(), kw["targets"],
                                           backend=backend, check_inputs=False)  # fmt: skip
    lse = _lse(kw)
    bad = (kw["targets"] < 0) | (kw["targets"] >= V)
    torch.testing.assert_close(lp[bad].double(), -lse[bad], atol=1e-4, rtol=1e-5)


def test_out_of_range_target_logits_op_and_epilogues():
    """The given-logits op and every one-pass epilogue (torch; Triton in the interpreter; the CUDA epilogue's
    host lane) keep an out-of-range id in bounds."""
    from fusedrl.backends import base as bb
    from fusedrl.backends import cuda, torch_backend

    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, V, generator=g)
    t = torch.tensor([V, V + 1000, -5, 3])
    for backend in ["torch", "reference"] + (["triton"] if "triton" in fusedrl.available_backends("cpu") else []):
        lp, ent = fusedrl.logprob_entropy(z, t, backend=backend, check_inputs=False)
        torch.testing.assert_close(lp[:3].double(), -torch.logsumexp(z[:3].double(), -1), atol=1e-5, rtol=1e-5)
    codes = bb.OnePassHead(mode=0, clip_lo=0.8, clip_hi=1.2, clip_c=3.0, dual=True, ent_coef=0.01, kl_coef=0.0,
                           kl_type=3, kl_st=False, old=torch.full((4,), -3.0), adv=torch.ones(4),
                           weight=torch.full((4,), 0.25), ref=None, need_ent=True)  # fmt: skip

    def grads(lp, ent):
        return torch.full_like(lp, 0.25), torch.full_like(lp, -0.0025)

    mods = [torch_backend]
    if "triton" in fusedrl.available_backends("cpu"):
        from fusedrl.backends import triton

        mods.append(triton)
    if cuda.extension() is not None:
        mods.append(cuda)
    for mod in mods:
        u = z.clone()
        head = bb.EpilogueHead(codes, grads, True)
        out = mod.onepass_epilogue(u, t, None, 1.0, None, head)
        assert torch.isfinite(out.du).all() and torch.isfinite(out.logp).all(), mod.__name__
        torch.testing.assert_close(out.logp[:3].double(), -torch.logsumexp(z[:3].double(), -1), atol=1e-5,
                                   rtol=1e-5, msg=mod.__name__)  # fmt: skip
