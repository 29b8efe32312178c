"""Hardening: bad inputs, extreme values, strided inputs, and the large-N / memcheck GPU checks.

Policy under test (README "Validation, extreme values and strided inputs"):

* every public entry point raises ValueError / TypeError naming the offending argument;
* checks that need a host sync (target range, cu_seqlens order, 0/1 mask values) run only when
  ``check_inputs`` is on: the default is on for CPU tensors and off elsewhere (FUSEDRL_CHECK_INPUTS=1
  turns them on); the meta device stands in for an accelerator here (any sync raises on it);
* non-finite values propagate per token: a token whose hidden row (or logits row) holds NaN/inf gets
  NaN logp and entropy, the other tokens are untouched; weight/bias gradients sum over every token and
  so become NaN, as in eager PyTorch;
* strided / transposed / expanded / offset views are accepted and read correctly, and gradients flow
  back to the strided leaf.

The triton backend runs in the interpreter on CPU (tiny shapes); cuda-device cases are marked gpu.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from _factory import ATOL, GRAD_ATOL, assert_cce, eager_lowprec, err, make_case, ref64

import fusedrl
from fusedrl import FusedPolicyLoss, PolicyLossConfig, fused_policy_loss, policy_loss, reference
from fusedrl._validate import want_checks

CPU_BACKENDS = [b for b in fusedrl.available_backends("cpu") if b in ("torch", "triton")]

# NaN / inf inputs are fed on purpose: numpy (the triton interpreter) warns about them
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")


def backend_params(with_reference=True):
    """(device, backend) pairs: CPU backends here, every backend on CUDA (gpu-marked)."""
    names = (["reference"] if with_reference else []) + CPU_BACKENDS
    out = [pytest.param("cpu", b, id=f"cpu-{b}") for b in names]
    for b in (["reference"] if with_reference else []) + ["torch", "triton", "cuda"]:
        out.append(pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.gpu))
    return out


def need(device, backend):
    if backend != "reference" and backend not in fusedrl.available_backends(device):
        pytest.skip(f"backend {backend} not available on {device}")


def fwd_bwd(fn, leaves, g_lp=None, g_H=None):
    """Run fn(*leaves) -> (logp, ent); return outputs and grads of sum(g_lp*logp + g_H*ent)."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    lp, ent = fn(*leaves)
    g_lp = torch.ones_like(lp) if g_lp is None else g_lp.to(lp)
    g_H = torch.full_like(lp, 0.5) if g_H is None else g_H.to(lp)
    grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_H).sum(), leaves)
    return lp.detach(), ent.detach(), [g.detach() for g in grads]


# ==================================================================================================
# 1. bad-input matrix
# ==================================================================================================
V0, H0, N0 = 50, 24, 6


def core_args():
    x, w, b, t = make_case(N0, H0, V0, torch.float32, bias=True)
    return dict(hidden=x, weight=w, targets=t, bias=b)


CORE_BAD = [
    # ranks
    ("hidden-0d", lambda a: a.update(hidden=torch.tensor(1.0)), ValueError, "hidden"),
    ("weight-1d", lambda a: a.update(weight=torch.randn(H0)), ValueError, "weight"),
    ("weight-3d", lambda a: a.update(weight=torch.randn(2, V0, H0)), ValueError, "weight"),
    ("bias-2d", lambda a: a.update(bias=torch.randn(1, V0)), ValueError, "bias"),
    ("targets-rank", lambda a: a.update(targets=a["targets"][:, None]), ValueError, "targets"),
    # sizes
    ("H-mismatch", lambda a: a.update(hidden=torch.randn(N0, H0 + 1)), ValueError, "hidden"),
    ("H-zero", lambda a: a.update(hidden=torch.randn(N0, 0), weight=torch.randn(V0, 0)), ValueError, "hidden"),
    ("V-zero", lambda a: a.update(weight=torch.randn(0, H0), bias=None), ValueError, "weight"),
    ("V-bias-mismatch", lambda a: a.update(bias=torch.randn(V0 - 1)), ValueError, "bias"),
    ("N-mismatch", lambda a: a.update(targets=a["targets"][:-1]), ValueError, "targets"),
    # dtypes
    ("hidden-int", lambda a: a.update(hidden=a["hidden"].long()), TypeError, "hidden"),
    ("weight-int", lambda a: a.update(weight=a["weight"].int()), TypeError, "weight"),
    ("hidden-complex", lambda a: a.update(hidden=a["hidden"].cfloat()), TypeError, "hidden"),
    ("dtype-mix", lambda a: a.update(weight=a["weight"].half()), TypeError, "weight"),
    ("targets-float", lambda a: a.update(targets=a["targets"].float()), TypeError, "targets"),
    (
        "targets-float-requires-grad",
        lambda a: a.update(targets=a["targets"].float().requires_grad_()),
        TypeError,
        "targets",
    ),
    ("targets-bool", lambda a: a.update(targets=a["targets"] > 3), TypeError, "targets"),
    ("bias-int", lambda a: a.update(bias=a["bias"].long()), TypeError, "bias"),
    ("hidden-list", lambda a: a.update(hidden=a["hidden"].tolist()), TypeError, "hidden"),
    # values (target range: a host-syncing check, on by default for CPU tensors)
    ("targets-high", lambda a: a["targets"].__setitem__(2, V0), ValueError, "targets"),
    ("targets-negative", lambda a: a["targets"].__setitem__(0, -100), ValueError, "targets"),
    ("temperature-0", lambda a: a.update(temperature=0.0), ValueError, "temperature"),
    ("temperature-neg", lambda a: a.update(temperature=-0.5), ValueError, "temperature"),
    ("temperature-nan", lambda a: a.update(temperature=float("nan")), ValueError, "temperature"),
    ("temperature-inf", lambda a: a.update(temperature=float("inf")), ValueError, "temperature"),
    ("temperature-None", lambda a: a.update(temperature=None), ValueError, "temperature"),
    ("temperature-str", lambda a: a.update(temperature="1.0"), TypeError, "temperature"),
    ("temperature-bool", lambda a: a.update(temperature=True), TypeError, "temperature"),
    ("softcap-0", lambda a: a.update(softcap=0.0), ValueError, "softcap"),
    ("softcap-neg", lambda a: a.update(softcap=-30.0), ValueError, "softcap"),
    ("softcap-nan", lambda a: a.update(softcap=float("nan")), ValueError, "softcap"),
    ("grad_filter_eps-neg", lambda a: a.update(grad_filter_eps=-1e-3), ValueError, "grad_filter_eps"),
    ("backend-unknown", lambda a: a.update(backend="nope"), ValueError, "backend"),
    # devices (meta stands in for "another device")
    ("hidden-meta", lambda a: a.update(hidden=a["hidden"].to("meta")), ValueError, "hidden is on meta"),
    ("weight-meta", lambda a: a.update(weight=a["weight"].to("meta")), ValueError, "weight is on meta"),
    ("targets-meta", lambda a: a.update(targets=a["targets"].to("meta")), ValueError, "targets is on meta"),
    ("bias-meta", lambda a: a.update(bias=a["bias"].to("meta")), ValueError, "bias is on meta"),
]


@pytest.mark.parametrize("change, exc, match", [c[1:] for c in CORE_BAD], ids=[c[0] for c in CORE_BAD])
def test_bad_inputs_linear_logprob_entropy(change, exc, match):
    args = dict(core_args(), backend="torch")
    change(args)
    with pytest.raises(exc, match=match):
        fusedrl.linear_logprob_entropy(**args)


def logits_args():
    return dict(logits=torch.randn(N0, V0), targets=torch.randint(0, V0, (N0,)))


LOGITS_BAD = [
    ("logits-0d", lambda a: a.update(logits=torch.tensor(1.0), targets=torch.tensor(0)), ValueError, "logits"),
    ("logits-V0", lambda a: a.update(logits=torch.randn(N0, 0)), ValueError, "logits"),
    ("logits-int", lambda a: a.update(logits=a["logits"].long()), TypeError, "logits"),
    ("logits-list", lambda a: a.update(logits=a["logits"].tolist()), TypeError, "logits"),
    ("targets-shape", lambda a: a.update(targets=a["targets"][:-1]), ValueError, "targets"),
    ("targets-float", lambda a: a.update(targets=a["targets"].double()), TypeError, "targets"),
    ("targets-high", lambda a: a["targets"].__setitem__(1, V0), ValueError, "targets"),
    ("targets-negative", lambda a: a["targets"].__setitem__(1, -1), ValueError, "targets"),
    ("temperature-0", lambda a: a.update(temperature=0), ValueError, "temperature"),
    ("softcap-neg", lambda a: a.update(softcap=-1.0), ValueError, "softcap"),
    ("logits-meta", lambda a: a.update(logits=a["logits"].to("meta")), ValueError, "logits is on meta"),
    ("targets-meta", lambda a: a.update(targets=a["targets"].to("meta")), ValueError, "targets is on meta"),
    (
        "inplace-noncontiguous",
        lambda a: a.update(logits=torch.randn(V0, N0).t(), inplace_backward=True),
        ValueError,
        "inplace_backward",
    ),
]


@pytest.mark.parametrize("change, exc, match", [c[1:] for c in LOGITS_BAD], ids=[c[0] for c in LOGITS_BAD])
def test_bad_inputs_logprob_entropy(change, exc, match):
    args = dict(logits_args(), backend="torch")
    change(args)
    with pytest.raises(exc, match=match):
        fusedrl.logprob_entropy(**args)


B0, T0 = 3, 5


def loss_args(packed=False):
    g = torch.Generator().manual_seed(0)
    shape = (B0 * T0,) if packed else (B0, T0)
    lp = -torch.rand(shape, generator=g)
    out = dict(
        logp=lp,
        old_logp=lp + 0.1 * torch.randn(shape, generator=g),
        advantages=torch.randn(shape, generator=g),
        mask=torch.rand(shape, generator=g) > 0.2,
        entropy=torch.rand(shape, generator=g),
        ref_logp=lp - 0.1,
    )
    if packed:
        out["cu_seqlens"] = torch.tensor([0, 4, 9, 15], dtype=torch.int32)
    return out


LOSS_BAD = [
    # ranks / shapes
    (
        "logp-0d",
        False,
        lambda a: a.update(
            logp=torch.tensor(-1.0),
            old_logp=torch.tensor(-1.0),
            advantages=torch.tensor(1.0),
            mask=torch.tensor(True),
            entropy=None,
            ref_logp=None,
        ),
        ValueError,
        "logp",
    ),
    ("logp-3d", False, lambda a: a.update(**{k: v[None] for k, v in a.items()}), ValueError, "logp"),
    ("old_logp-shape", False, lambda a: a.update(old_logp=a["old_logp"][:, :-1]), ValueError, "old_logp"),
    ("mask-shape", False, lambda a: a.update(mask=a["mask"].t()), ValueError, "mask"),
    ("entropy-shape", False, lambda a: a.update(entropy=a["entropy"][:1]), ValueError, "entropy"),
    ("ref_logp-shape", False, lambda a: a.update(ref_logp=a["ref_logp"].reshape(-1)), ValueError, "ref_logp"),
    ("advantages-B+1", False, lambda a: a.update(advantages=torch.zeros(B0 + 1)), ValueError, "advantages"),
    ("advantages-3d", False, lambda a: a.update(advantages=torch.zeros(B0, T0, 1)), ValueError, "advantages"),
    ("advantages-T", False, lambda a: a.update(advantages=torch.zeros(T0)), ValueError, "advantages"),
    ("packed-advantages", True, lambda a: a.update(advantages=torch.zeros(7)), ValueError, "advantages"),
    # dtypes
    ("logp-int", False, lambda a: a.update(logp=a["logp"].long()), TypeError, "logp"),
    ("old_logp-int", False, lambda a: a.update(old_logp=a["old_logp"].long()), TypeError, "old_logp"),
    ("advantages-int", False, lambda a: a.update(advantages=a["advantages"].long()), TypeError, "advantages"),
    ("entropy-int", False, lambda a: a.update(entropy=a["entropy"].long()), TypeError, "entropy"),
    ("ref_logp-int", False, lambda a: a.update(ref_logp=a["ref_logp"].int()), TypeError, "ref_logp"),
    ("mask-complex", False, lambda a: a.update(mask=a["mask"].cfloat()), TypeError, "mask"),
    ("mask-list", False, lambda a: a.update(mask=a["mask"].tolist()), TypeError, "mask"),
    ("entropy-list", False, lambda a: a.update(entropy=a["entropy"].tolist()), TypeError, "entropy"),
    ("ref_logp-list", False, lambda a: a.update(ref_logp=a["ref_logp"].tolist()), TypeError, "ref_logp"),
    ("cu_seqlens-float", True, lambda a: a.update(cu_seqlens=a["cu_seqlens"].float()), TypeError, "cu_seqlens"),
    ("cu_seqlens-list", True, lambda a: a.update(cu_seqlens=a["cu_seqlens"].tolist()), TypeError, "cu_seqlens"),
    # mask values (host-syncing, behind check_inputs)
    ("mask-fraction", False, lambda a: a.update(mask=a["mask"].float() * 0.5), ValueError, "mask"),
    (
        "mask-nan",
        False,
        lambda a: a.update(mask=a["mask"].float().masked_fill(a["mask"], float("nan"))),
        ValueError,
        "mask",
    ),
    ("mask-int-2", False, lambda a: a.update(mask=a["mask"].long() * 2), ValueError, "mask"),
    # cu_seqlens (rank, values)
    ("cu_seqlens-2d", True, lambda a: a.update(cu_seqlens=a["cu_seqlens"][None]), ValueError, "cu_seqlens"),
    ("cu_seqlens-empty", True, lambda a: a.update(cu_seqlens=a["cu_seqlens"][:0]), ValueError, "cu_seqlens"),
    (
        "cu_seqlens-start",
        True,
        lambda a: a.update(cu_seqlens=torch.tensor([1, 4, 9, 15])),
        ValueError,
        "cu_seqlens must start at 0",
    ),
    (
        "cu_seqlens-decreasing",
        True,
        lambda a: a.update(cu_seqlens=torch.tensor([0, 9, 4, 15])),
        ValueError,
        "cu_seqlens must be non-decreasing",
    ),
    (
        "cu_seqlens-beyond-N",
        True,
        lambda a: a.update(cu_seqlens=torch.tensor([0, 4, 9, 16])),
        ValueError,
        "cu_seqlens must end at <= N",
    ),
    (
        "cu_seqlens-with-2d-logp",
        False,
        lambda a: a.update(cu_seqlens=torch.tensor([0, 5, 15])),
        ValueError,
        "cu_seqlens",
    ),
    # devices
    *[
        (
            f"{k}-meta",
            k == "cu_seqlens",
            (lambda k: lambda a: a.update({k: a[k].to("meta")}))(k),  # noqa: B023
            ValueError,
            f"{k} is on meta",
        )
        for k in ("old_logp", "advantages", "mask", "entropy", "ref_logp", "cu_seqlens")
    ],
    # config-dependent requirements
    (
        "entropy-missing",
        False,
        lambda a: a.update(entropy=None, config=PolicyLossConfig(entropy_coeff=0.01)),
        ValueError,
        "entropy",
    ),
    (
        "ref_logp-missing",
        False,
        lambda a: a.update(ref_logp=None, config=PolicyLossConfig(kl_loss_coef=0.1)),
        ValueError,
        "ref_logp",
    ),
    ("config-dict", False, lambda a: a.update(config={"loss_mode": "vanilla"}), TypeError, "config"),
    ("global_num_tokens-0", False, lambda a: a.update(global_num_tokens=0), ValueError, "global_num_tokens"),
    ("norm_len-neg", False, lambda a: a.update(norm_len=-3), ValueError, "norm_len"),
]


@pytest.mark.parametrize("packed, change, exc, match", [c[1:] for c in LOSS_BAD], ids=[c[0] for c in LOSS_BAD])
def test_bad_inputs_policy_loss(packed, change, exc, match):
    args = loss_args(packed)
    change(args)
    with pytest.raises(exc, match=match):
        policy_loss(**args)


def test_policy_loss_accepted_masks_and_trailing_padding():
    """bool, integer and 0/1 floating masks give the same loss; packed tokens after cu_seqlens[-1]
    are ignored (cu_seqlens may end before N)."""
    args = loss_args()
    want, _ = policy_loss(**args)
    for m in (args["mask"].long(), args["mask"].to(torch.uint8), args["mask"].float(), args["mask"].half()):
        got, _ = policy_loss(**dict(args, mask=m))
        assert torch.equal(got, want)
    p = loss_args(packed=True)
    full, _ = policy_loss(**p)
    extra = {k: torch.cat([v, v[:2]]) if k not in ("cu_seqlens",) else v for k, v in p.items()}
    tail, _ = policy_loss(**extra)
    torch.testing.assert_close(tail, full)


def fused_args(packed=False):
    g = torch.Generator().manual_seed(1)
    x, w, b, _ = make_case(B0 * T0, 16, 37, torch.float32, bias=True)
    t = torch.randint(0, 37, (B0 * T0,), generator=g)
    la = loss_args(packed)
    if not packed:
        x, t = x.reshape(B0, T0, 16), t.reshape(B0, T0)
    t = t.masked_fill(~la["mask"], -100)  # padding ids at masked positions are allowed
    out = dict(
        hidden=x,
        weight=w,
        targets=t,
        old_logp=la["old_logp"],
        advantages=la["advantages"][..., 0] if not packed else la["advantages"],
        mask=la["mask"],
        ref_logp=la["ref_logp"],
        bias=b,
        backend="torch",
    )
    if packed:
        out["cu_seqlens"] = la["cu_seqlens"]
    return out


FUSED_BAD = [
    ("hidden-rank", False, lambda a: a.update(hidden=a["hidden"].reshape(-1, 16)), ValueError, "targets"),
    ("H-mismatch", False, lambda a: a.update(weight=torch.randn(37, 15)), ValueError, "hidden"),
    ("V-bias", False, lambda a: a.update(bias=torch.randn(36)), ValueError, "bias"),
    ("old_logp-shape", False, lambda a: a.update(old_logp=a["old_logp"][:, 1:]), ValueError, "old_logp"),
    ("mask-shape", False, lambda a: a.update(mask=a["mask"][:, 1:]), ValueError, "mask"),
    ("advantages-shape", False, lambda a: a.update(advantages=torch.zeros(B0 + 2)), ValueError, "advantages"),
    ("targets-float", False, lambda a: a.update(targets=a["targets"].float()), TypeError, "targets"),
    ("targets-list", False, lambda a: a.update(targets=a["targets"].tolist()), TypeError, "targets"),
    ("mask-list", False, lambda a: a.update(mask=a["mask"].tolist()), TypeError, "mask"),
    ("dtype-mix", False, lambda a: a.update(hidden=a["hidden"].half()), TypeError, "weight"),
    ("targets-out-of-range", False, lambda a: a["targets"].masked_fill_(a["mask"], 37), ValueError, "targets"),
    ("temperature-0", False, lambda a: a.update(temperature=0.0), ValueError, "temperature"),
    ("softcap-neg", False, lambda a: a.update(softcap=-2.0), ValueError, "softcap"),
    ("mask-fraction", False, lambda a: a.update(mask=a["mask"] * 0.5), ValueError, "mask"),
    (
        "cu_seqlens-decreasing",
        True,
        lambda a: a.update(cu_seqlens=torch.tensor([0, 9, 4, 15])),
        ValueError,
        "cu_seqlens",
    ),
    ("config-dict", False, lambda a: a.update(config={}), TypeError, "config"),
    ("backend-unknown", False, lambda a: a.update(backend="nope"), ValueError, "backend"),
    ("mask-meta", False, lambda a: a.update(mask=a["mask"].to("meta")), ValueError, "mask is on meta"),
    ("weight-meta", False, lambda a: a.update(weight=a["weight"].to("meta")), ValueError, "weight is on meta"),
    ("old_logp-meta", False, lambda a: a.update(old_logp=a["old_logp"].to("meta")), ValueError, "old_logp is on meta"),
]


@pytest.mark.parametrize("packed, change, exc, match", [c[1:] for c in FUSED_BAD], ids=[c[0] for c in FUSED_BAD])
@pytest.mark.parametrize("api", ["function", "module"])
def test_bad_inputs_fused_policy_loss(api, packed, change, exc, match):
    args = fused_args(packed)
    change(args)
    with pytest.raises(exc, match=match):
        if api == "function":
            fused_policy_loss(**args)
        else:
            kw = {k: args.pop(k) for k in ("temperature", "softcap", "backend", "config") if k in args}
            cfg = kw.pop("config", None)
            FusedPolicyLoss(cfg, **kw)(**args)


def test_numpy_and_tensor_scalars_accepted():
    """Scalars may be Python / numpy numbers or 1-element tensors (read with .item(): a host sync on an
    accelerator, so prefer Python floats there)."""
    np = pytest.importorskip("numpy")
    a = core_args()
    want, _ = fusedrl.linear_logprob_entropy(**a, temperature=0.5, softcap=20.0, backend="torch")
    for T, c in ((np.float32(0.5), np.float64(20.0)), (torch.tensor(0.5), torch.tensor([20.0])), (0.5, 20)):
        got, _ = fusedrl.linear_logprob_entropy(**a, temperature=T, softcap=c, backend="torch")
        assert torch.equal(got, want)


def test_fused_policy_loss_ignores_padding_ids():
    loss, _ = fused_policy_loss(**fused_args())
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(config={"loss_mode": "vanilla"}), TypeError, "config"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(backend="nope"), ValueError, "backend"),
        (dict(backend=None), ValueError, "backend"),
    ],
)
def test_bad_fused_policy_loss_module_construction(kw, exc, match):
    """Errors surface when the module is built, not at the first training step."""
    cfg = kw.pop("config", None)
    with pytest.raises(exc, match=match):
        FusedPolicyLoss(cfg, **kw)


@pytest.mark.parametrize(
    "field, value",
    [
        ("loss_mode", None),
        ("loss_mode", "PPO"),
        ("loss_agg_mode", "mean"),
        ("kl_loss_type", 3),
        ("kl_loss_type", "k5"),
        ("clip_ratio_low", "0.2"),
        ("clip_ratio_low", -0.1),
        ("clip_ratio_high", float("inf")),
        ("clip_ratio_c", 1.0),
        ("clip_ratio_c", float("nan")),
        ("entropy_coeff", -1e-3),
        ("kl_loss_coef", float("nan")),
        ("clip_cov_ratio", -1.0),
        ("clip_cov_ub", float("nan")),
        ("clip_cov_lb", 10.0),
        ("kl_cov_ratio", True),
        ("ppo_kl_coef", -0.5),
        ("global_num_tokens", 0),
        ("global_num_tokens", True),
        ("global_num_tokens", torch.ones(2)),
        ("global_num_seqs", -1),
        ("norm_len", float("inf")),
        ("generator", 0),
    ],
)
def test_bad_policy_loss_config(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        PolicyLossConfig(**{field: value})


# --------------------------------------------------------------------------------------------------
# the check_inputs switch: value checks that need a host sync
# --------------------------------------------------------------------------------------------------
def test_want_checks_policy(monkeypatch):
    monkeypatch.delenv("FUSEDRL_CHECK_INPUTS", raising=False)
    cpu, other = torch.device("cpu"), torch.device("meta")
    assert want_checks(None, cpu) and not want_checks(None, other)
    assert not want_checks(False, cpu) and want_checks(True, other)
    monkeypatch.setenv("FUSEDRL_CHECK_INPUTS", "1")
    assert want_checks(None, other)
    monkeypatch.setenv("FUSEDRL_CHECK_INPUTS", "0")
    assert not want_checks(None, other) and want_checks(None, cpu)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_check_inputs_off_never_reads_out_of_bounds(backend):
    """With checks off an out-of-range id gives a garbage (finite) logp, never an out-of-bounds access."""
    x, w, b, t = make_case(5, 16, 37, torch.float32, bias=True)
    t[1], t[3] = 37, -7
    lp, ent = fusedrl.linear_logprob_entropy(x, w, t, b, backend=backend, check_inputs=False)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    z = torch.randn(5, 37)
    lp, ent = fusedrl.logprob_entropy(z.requires_grad_(), t, backend=backend, check_inputs=False)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(lp).all() and torch.isfinite(z.grad).all()


def test_check_inputs_off_skips_loss_value_checks():
    args = loss_args(packed=True)
    args["cu_seqlens"] = torch.tensor([0, 9, 4, 15])
    loss, _ = policy_loss(**args, check_inputs=False)  # garbage segments, but no error and no crash
    assert loss.shape == ()
    args = loss_args()
    half = args["mask"].float() * 0.5
    got, _ = policy_loss(**dict(args, mask=half), check_inputs=False)  # read as boolean
    want, _ = policy_loss(**args)
    assert torch.equal(got, want)


def _meta_fused_case():
    B, T, H, V = 2, 3, 8, 11
    return dict(
        hidden=torch.randn(B, T, H, device="meta", requires_grad=True),
        weight=torch.randn(V, H, device="meta", requires_grad=True),
        targets=torch.full((B, T), V + 5, dtype=torch.long, device="meta"),  # out of range: unchecked
        old_logp=torch.zeros(B, T, device="meta"),
        advantages=torch.zeros(B, device="meta"),
        mask=torch.ones(B, T, device="meta") * 0.5,
        backend="torch",
        config=PolicyLossConfig(entropy_coeff=0.01),
    )


def test_no_host_sync_by_default_off_cpu(monkeypatch):
    """Off the CPU (meta here: any .item() raises) the default validation never syncs; check_inputs=True
    or FUSEDRL_CHECK_INPUTS=1 turn the syncing value checks on."""
    monkeypatch.delenv("FUSEDRL_CHECK_INPUTS", raising=False)
    loss, metrics = fused_policy_loss(**_meta_fused_case())
    loss.backward()
    assert loss.device.type == "meta"
    lp, ent = fusedrl.linear_logprob_entropy(
        torch.randn(4, 8, device="meta"),
        torch.randn(11, 8, device="meta"),
        torch.zeros(4, dtype=torch.long, device="meta"),
        backend="torch",
    )
    assert lp.shape == (4,)
    cu = torch.tensor([0, 5, 2, 6], device="meta")
    policy_loss(
        torch.zeros(6, device="meta"),
        torch.zeros(6, device="meta"),
        torch.zeros(6, device="meta"),
        torch.ones(6, device="meta"),
        cu_seqlens=cu,
    )
    sync_errors = (RuntimeError, NotImplementedError)
    with pytest.raises(sync_errors):
        fused_policy_loss(**_meta_fused_case(), check_inputs=True)
    monkeypatch.setenv("FUSEDRL_CHECK_INPUTS", "1")
    with pytest.raises(sync_errors):
        fused_policy_loss(**_meta_fused_case())


# ==================================================================================================
# 2. extreme values
# ==================================================================================================
def _ref_grads64(fn, leaves, g_lp, g_H):
    return fwd_bwd(fn, [t.double() for t in leaves], g_lp.double(), g_H.double())


@pytest.mark.parametrize("temperature", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("device, backend", backend_params(with_reference=False))
def test_huge_logits_and_extreme_temperature(device, backend, temperature):
    """Logits of +-1e4 (given, and from hidden @ W^T), temperature 1e-3 and 1e3: finite, and equal to the
    fp64 reference on the same inputs up to fp32 relative precision."""
    need(device, backend)
    g = torch.Generator().manual_seed(3)
    n, v, h = 5, 67, 16
    z = (torch.rand(n, v, generator=g) * 2 - 1) * 1e4
    t = torch.randint(0, v, (n,), generator=g)
    x = torch.randn(n, h, generator=g) * 25.0
    w = torch.randn(v, h, generator=g) * 25.0  # |x . w| up to ~1e4
    g_lp, g_H = torch.rand(n, generator=g) + 0.5, torch.rand(n, generator=g) - 0.5
    cases = [
        (
            lambda z: fusedrl.logprob_entropy(z, t.to(device), temperature, backend=backend),
            lambda z: reference.logprob_entropy(z, t.to(device), temperature),
            [z],
        ),
        (
            lambda x, w: fusedrl.linear_logprob_entropy(x, w, t.to(device), temperature=temperature, backend=backend),
            lambda x, w: reference.linear_logprob_entropy(x, w, t.to(device), temperature=temperature),
            [x, w],
        ),
    ]
    for fn, ref_fn, leaves in cases:
        leaves = [q.to(device) for q in leaves]
        lp, ent, grads = fwd_bwd(fn, leaves, g_lp, g_H)
        r_lp, r_ent, r_grads = _ref_grads64(ref_fn, leaves, g_lp, g_H)
        zmax = 1e4 if len(leaves) == 1 else (leaves[0].double() @ leaves[1].double().t()).abs().max().item()
        scale = zmax / temperature  # |z|: fp32 holds it to ~6e-8 relative
        assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and (ent >= 0).all()
        assert err(lp, r_lp) <= 1e-6 * scale + 1e-5
        assert err(ent, r_ent) <= 1e-6 * scale + 1e-5
        for gr, rg in zip(grads, r_grads):
            assert torch.isfinite(gr).all()
            assert err(gr, rg) <= 1e-5 * (rg.abs().max().item() + 1.0)


def masked_vocab_params(negs):
    return [pytest.param(*p.values, neg, id=f"{p.id}-{neg}", marks=p.marks) for p in backend_params() for neg in negs]


@pytest.mark.parametrize("device, backend, neg", masked_vocab_params(["-1e4", "-inf"]))
def test_one_hot_certain_softmax(device, backend, neg):
    """Every other logit at -1e4 (or -inf: a masked vocabulary): logp = 0 and entropy = 0 exactly, and
    the gradients are finite (zero)."""
    need(device, backend)
    low = float(neg)
    n, v = 3, 300
    t = torch.tensor([0, 137, 299], device=device)
    z = torch.full((n, v), low)
    z[torch.arange(n), t.cpu()] = 2.5
    lp, ent, (gz,) = fwd_bwd(lambda z: fusedrl.logprob_entropy(z, t, backend=backend), [z.to(device)])
    assert (lp == 0).all() and (ent == 0).all(), (lp, ent)
    assert torch.isfinite(gz).all() and gz.abs().max() <= 1e-6
    # same through the linear path: the bias carries the mask
    x, w = torch.randn(n, 8), torch.randn(v, 8) * 1e-3
    bias = torch.full((v,), low)
    bias[t.cpu()] = 0.0
    fn = lambda x, w, b: fusedrl.linear_logprob_entropy(x, w, t, b, backend=backend)  # noqa: E731
    lp, ent, grads = fwd_bwd(fn, [q.to(device) for q in (x, w, bias)])
    r_lp, r_ent, r_grads = _ref_grads64(
        lambda x, w, b: reference.linear_logprob_entropy(x, w, t, b),
        [q.to(device) for q in (x, w, bias)],
        torch.ones(n),
        torch.full((n,), 0.5),
    )
    assert err(lp, r_lp) < 1e-5 and err(ent, r_ent) < 1e-5
    for gr, rg in zip(grads, r_grads):
        assert torch.isfinite(gr).all() and err(gr, rg) < 1e-5


@pytest.mark.parametrize("device, backend, neg", masked_vocab_params(["-inf"]))
def test_partly_masked_vocabulary_minus_inf(device, backend, neg):
    """-inf on a block of the vocabulary (bias / logits), incl. a whole leading tile: matches the reference."""
    need(device, backend)
    n, v, h = 4, 700, 8
    x, w, _, _ = make_case(n, h, v, torch.float32)
    bias = torch.zeros(v)
    bias[:300] = -math.inf
    bias[450:460] = -math.inf
    t = torch.tensor([300, 301, 500, 699])
    g_lp, g_H = torch.tensor([1.0, -0.5, 2.0, 0.3]), torch.tensor([0.7, 1.1, -0.4, 0.2])
    dev = lambda *a: [q.to(device) for q in a]  # noqa: E731
    t = t.to(device)
    lp, ent, grads = fwd_bwd(
        lambda x, w, b: fusedrl.linear_logprob_entropy(x, w, t, b, backend=backend), dev(x, w, bias), g_lp, g_H
    )
    r_lp, r_ent, r_grads = _ref_grads64(
        lambda x, w, b: reference.linear_logprob_entropy(x, w, t, b), dev(x, w, bias), g_lp, g_H
    )
    assert err(lp, r_lp) < 1e-5 and err(ent, r_ent) < 1e-5
    for gr, rg in zip(grads, r_grads):
        assert torch.isfinite(gr).all() and err(gr, rg) < 1e-5
    z = (x @ w.t() + bias).to(device)
    lp, ent, (gz,) = fwd_bwd(lambda z: fusedrl.logprob_entropy(z, t, backend=backend), [z], g_lp, g_H)
    r_lp, r_ent, (rz,) = _ref_grads64(lambda z: reference.logprob_entropy(z, t), [z], g_lp, g_H)
    assert err(lp, r_lp) < 1e-5 and err(ent, r_ent) < 1e-5
    assert torch.isfinite(gz).all() and err(gz, rz) < 1e-5


@pytest.mark.parametrize(
    "device, backend", [p for p in backend_params() if p.values[1] != "triton" or p.values[0] == "cuda"]
)
def test_uniform_softmax_full_vocab(device, backend):
    """Uniform softmax at V = 151936 (zero weight): entropy = log V and logp = -log V within 1e-5 (fp32)."""
    need(device, backend)
    V = 151936
    x = torch.randn(2, 8, device=device)
    w = torch.zeros(V, 8, device=device)
    t = torch.tensor([0, V - 1], device=device)
    lp, ent, (gx, gw) = fwd_bwd(lambda x, w: fusedrl.linear_logprob_entropy(x, w, t, backend=backend), [x, w])
    assert (ent - math.log(V)).abs().max() <= 1e-5 and (lp + math.log(V)).abs().max() <= 1e-5
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    lp, ent, (gz,) = fwd_bwd(
        lambda z: fusedrl.logprob_entropy(z, t, backend=backend), [torch.zeros(2, V, device=device)]
    )
    assert (ent - math.log(V)).abs().max() <= 1e-5 and (lp + math.log(V)).abs().max() <= 1e-5
    # d logp / dz = onehot - 1/V; d H / dz = 0 at the uniform distribution
    want = torch.full((2, V), -1.0 / V, dtype=torch.float64, device=device)
    want[torch.arange(2, device=device), t] += 1
    assert err(gz, want) <= 1e-6


@pytest.mark.parametrize("device, backend", backend_params())
def test_uniform_softmax_interpreter_sized(device, backend):
    """Uniform softmax over several vocab tiles / splits (a vocabulary the interpreter can afford)."""
    need(device, backend)
    V = 2053
    x, w = torch.randn(3, 8, device=device), torch.zeros(V, 8, device=device)
    t = torch.tensor([0, 1000, V - 1], device=device)
    lp, ent = fusedrl.linear_logprob_entropy(x, w, t, backend=backend)
    assert (ent - math.log(V)).abs().max() <= 1e-5 and (lp + math.log(V)).abs().max() <= 1e-5


@pytest.mark.parametrize("device, backend", backend_params())
def test_fp16_logits_beyond_fp16_range(device, backend):
    """fp16 hidden / weight whose logits exceed 65504: eager fp16 overflows, fp32 accumulation does not."""
    need(device, backend)
    g = torch.Generator().manual_seed(5)
    n, h, v = 4, 16, 45
    x = (torch.rand(n, h, generator=g) * 40 + 60).half()  # all positive: u ~ 16 * 80 * w
    w = (torch.randn(v, h, generator=g) * 60).half()
    w[:2] = 120.0  # two rows with logits ~ 1.5e5, 4-6 apart (a non-trivial softmax between them)
    w[1, 0] = 119.9375
    t = torch.tensor([0, 5, 17, 44])
    eager = x.to(device) @ w.to(device).t()
    assert not torch.isfinite(eager).all()  # the test really leaves the fp16 range
    leaves = [x.to(device), w.to(device)]
    td = t.to(device)
    lp, ent, grads = fwd_bwd(lambda x, w: fusedrl.linear_logprob_entropy(x, w, td, backend=backend), leaves)
    r_lp, r_ent, r_grads = _ref_grads64(
        lambda x, w: reference.linear_logprob_entropy(x, w, td), leaves, torch.ones(n), torch.full((n,), 0.5)
    )
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    scale = (x.double() @ w.double().t()).abs().max().item()
    assert err(lp, r_lp) <= 1e-6 * scale and err(ent, r_ent) <= 1e-6 * scale + 1e-5
    # an fp32 LSE of ~1.5e5 is exact to ~|LSE| * 6e-8 ~ 0.01, which moves the recomputed p by up to ~1% and
    # the gradients by that much times |w| (eager fp32 has logit errors of the same order)
    wmax = w.double().abs().max().item()
    for gr, rg in zip(grads, r_grads):
        assert gr.dtype == torch.float16 and torch.isfinite(gr).all()
        assert err(gr, rg) <= 2e-3 * (rg.abs().max().item() + 1) + 1e-7 * scale * wmax


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("device, backend", backend_params())
def test_non_finite_hidden_propagates_per_token(device, backend, bad):
    """A non-finite hidden row makes that token's logp/entropy NaN; the other tokens (values and dx rows)
    are exactly as with clean inputs; dW/db are NaN (they sum over every token), as in eager PyTorch."""
    need(device, backend)
    n, h, v = 5, 16, 67
    x, w, b, t = make_case(n, h, v, torch.float32, bias=True)
    x[2, 3] = float(bad)
    dev = [q.to(device) for q in (x, w, b)]
    t = t.to(device)
    fn = lambda x, w, b: fusedrl.linear_logprob_entropy(x, w, t, b, backend=backend)  # noqa: E731
    lp, ent, (gx, gw, gb) = fwd_bwd(fn, dev)
    assert torch.isnan(lp[2]) and torch.isnan(ent[2])
    good = torch.tensor([0, 1, 3, 4], device=device)
    clean = [q.to(device) for q in (x[good.cpu()], w, b)]
    r_lp, r_ent, (r_gx, _, _) = _ref_grads64(
        lambda x, w, b: reference.linear_logprob_entropy(x, w, t[good], b), clean, torch.ones(4), torch.full((4,), 0.5)
    )
    assert err(lp[good], r_lp) < 1e-5 and err(ent[good], r_ent) < 1e-5
    assert torch.isfinite(gx[good]).all() and err(gx[good], r_gx) < 1e-4
    assert not torch.isfinite(gx[2]).all()
    assert torch.isnan(gw).any() and torch.isnan(gb).any()
    # the same through given logits: a NaN / +inf logit poisons its own row only (a single -inf logit is a
    # masked-out token, not an error: see test_partly_masked_vocabulary_minus_inf)
    if bad == "-inf":
        return
    z = torch.randn(n, v)
    z[1, 7] = float(bad)
    t2 = t.clone()
    t2[1] = 8  # not the poisoned column itself
    lp, ent, (gz,) = fwd_bwd(lambda z: fusedrl.logprob_entropy(z, t2, backend=backend), [z.to(device)])
    assert torch.isnan(lp[1]) and torch.isnan(ent[1]) and torch.isnan(gz[1]).any()
    rows = torch.tensor([0, 2, 3, 4], device=device)
    r_lp, r_ent = reference.logprob_entropy(z[rows.cpu()].double().to(device), t2[rows])
    assert err(lp[rows], r_lp) < 1e-5 and err(ent[rows], r_ent) < 1e-5
    assert torch.isfinite(gz[rows]).all()


@pytest.mark.parametrize("device, backend", backend_params())
def test_non_finite_weight_poisons_every_token(device, backend):
    need(device, backend)
    x, w, _, t = make_case(3, 16, 67, torch.float32)
    w[10, 0] = float("nan")
    lp, ent = fusedrl.linear_logprob_entropy(x.to(device), w.to(device), t.to(device), backend=backend)
    assert torch.isnan(lp).all() and torch.isnan(ent).all()


@pytest.mark.parametrize("device, backend", backend_params())
def test_empty_and_single_token_single_word(device, backend):
    """N = 0 (empty outputs, zero grads), N = 1, and V = 1 (logp = 0, entropy = 0, zero grads)."""
    need(device, backend)
    d = device
    # N = 0, flat and with a leading shape
    for shape in ((0,), (2, 0), (0, 3)):
        x = torch.randn(*shape, 8, device=d)
        w = torch.randn(5, 8, device=d)
        t = torch.zeros(shape, dtype=torch.long, device=d)
        lp, ent, (gx, gw) = fwd_bwd(lambda x, w: fusedrl.linear_logprob_entropy(x, w, t, backend=backend), [x, w])  # noqa: B023
        assert lp.shape == shape and ent.shape == shape and gx.shape == x.shape and (gw == 0).all()
        lp, ent, (gz,) = fwd_bwd(
            lambda z: fusedrl.logprob_entropy(z, t, backend=backend),  # noqa: B023
            [torch.randn(*shape, 5, device=d)],
        )
        assert lp.shape == shape and gz.shape == (*shape, 5)
    # N = 1 against the reference
    x, w, b, t = make_case(1, 8, 13, torch.float32, device=d, bias=True)
    lp, ent = fusedrl.linear_logprob_entropy(x, w, t, b, backend=backend)
    r_lp, r_ent = ref64(x, w, t, b, 1.0, None)
    assert lp.shape == (1,) and err(lp, r_lp) < 1e-5 and err(ent, r_ent) < 1e-5
    # V = 1: certain
    x, w = torch.randn(4, 8, device=d) * 10, torch.randn(1, 8, device=d)
    t = torch.zeros(4, dtype=torch.long, device=d)
    for c in (None, 2.0):
        lp, ent, (gx, gw) = fwd_bwd(
            lambda x, w: fusedrl.linear_logprob_entropy(x, w, t, softcap=c, backend=backend),  # noqa: B023
            [x, w],
        )
        assert (lp == 0).all() and (ent == 0).all()
        assert (gx == 0).all() and (gw == 0).all()
    lp, ent, (gz,) = fwd_bwd(
        lambda z: fusedrl.logprob_entropy(z, t, backend=backend), [torch.randn(4, 1, device=d) * 1e3]
    )
    assert (lp == 0).all() and (ent == 0).all() and (gz == 0).all()


def test_empty_batches_in_the_loss_head():
    for mode in ("vanilla", "gspo", "clip_cov", "kl_cov", "gpg", "cispo"):
        for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
            cfg = PolicyLossConfig(loss_mode=mode, loss_agg_mode=agg, entropy_coeff=0.1)
            for shape, cu in (
                ((0, 4), None),
                ((2, 0), None),
                ((0,), torch.zeros(1, dtype=torch.long)),
                ((3,), torch.tensor([0, 0, 0])),
                ((0,), None),
            ):
                lp = torch.zeros(shape, requires_grad=True)
                adv = torch.zeros(shape[0]) if len(shape) == 2 else torch.zeros(shape)
                loss, metrics = policy_loss(
                    lp, lp.detach(), adv, torch.ones(shape, dtype=torch.bool), entropy=lp, cu_seqlens=cu, config=cfg
                )
                loss.backward()
                assert loss.item() == 0.0 and (lp.grad == 0).all(), (mode, agg, shape)
                assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_empty_batches_fused(backend):
    w = torch.randn(7, 8, requires_grad=True)
    for shape, cu in (((0, 4), None), ((0,), torch.zeros(1, dtype=torch.long))):
        hidden = torch.zeros(*shape, 8, requires_grad=True)
        z = torch.zeros(shape)
        loss, _ = fused_policy_loss(
            hidden,
            w,
            torch.zeros(shape, dtype=torch.long),
            z,
            torch.zeros(shape[0]) if len(shape) == 2 else z,
            z.bool(),
            cu_seqlens=cu,
            config=PolicyLossConfig(entropy_coeff=0.1),
            backend=backend,
        )
        loss.backward()
        assert loss.item() == 0.0 and hidden.grad.shape == hidden.shape and (w.grad == 0).all()


# ==================================================================================================
# 5. strided / non-contiguous inputs
# ==================================================================================================
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("device, backend", backend_params(with_reference=False))
def test_strided_core_inputs(device, backend, dtype):
    """hidden = X[..., ::2] of a transposed buffer, weight = W_T.t(), bias = B[::2], expanded targets, and
    storage-offset slices: same values as contiguous copies, and grads land on the strided leaves."""
    need(device, backend)
    g = torch.Generator().manual_seed(11)
    B, T, H, V = 2, 5, 12, 97
    X = (torch.randn(T, B, 2 * H, generator=g) / 2).to(dtype).to(device).requires_grad_()
    W_T = (torch.randn(H, V, generator=g) / 2).to(dtype).to(device).requires_grad_()
    Bb = torch.randn(2 * V, generator=g).to(dtype).to(device).requires_grad_()
    tgt = torch.randint(0, V, (T,), generator=g).to(device).expand(B, T)  # stride 0 along B
    views = lambda X, W_T, Bb: (X.transpose(0, 1)[..., ::2], W_T.t(), Bb[::2])  # noqa: E731
    hidden, weight, bias = views(X, W_T, Bb)
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not bias.is_contiguous()
    g_lp = torch.randn(B, T, generator=g, dtype=torch.float64).to(device)
    g_H = torch.randn(B, T, generator=g, dtype=torch.float64).to(device)
    lp, ent = fusedrl.linear_logprob_entropy(hidden, weight, tgt, bias, temperature=0.9, softcap=20.0, backend=backend)
    (lp.double() * g_lp + ent.double() * g_H).sum().backward()

    leaves = [q.detach().contiguous().requires_grad_() for q in (hidden, weight, bias)]
    r_lp, r_ent = fusedrl.linear_logprob_entropy(
        leaves[0], leaves[1], tgt.contiguous(), leaves[2], temperature=0.9, softcap=20.0, backend="reference"
    )
    (r_lp.double() * g_lp + r_ent.double() * g_H).sum().backward()
    tol = ATOL[dtype]
    assert err(lp, r_lp) < tol and err(ent, r_ent) < tol
    gh, gw, gb = views(X.grad, W_T.grad, Bb.grad)
    for got, want in zip((gh, gw, gb), leaves):
        assert err(got, want.grad) <= GRAD_ATOL[dtype] * (want.grad.abs().max().item() + 1)
    assert (X.grad[..., 1::2] == 0).all() and (Bb.grad[1::2] == 0).all()  # nothing written off the view

    # storage offsets: contiguous slices that do not start at the beginning of their buffer
    xs = torch.randn(N0 + 3, H, generator=g).to(dtype).to(device)[3:]
    ws = torch.randn(V + 2, H, generator=g).to(dtype).to(device)[2:]
    ts = torch.randint(0, V, (N0 + 1,), generator=g).to(device)[1:]
    assert xs.storage_offset() and ws.storage_offset() and ts.storage_offset()
    lp, ent = fusedrl.linear_logprob_entropy(xs, ws, ts, backend=backend)
    r_lp, r_ent = fusedrl.linear_logprob_entropy(xs.clone(), ws.clone(), ts.clone(), backend="reference")
    assert err(lp, r_lp) < tol and err(ent, r_ent) < tol


@pytest.mark.parametrize("device, backend", backend_params(with_reference=False))
def test_strided_logits(device, backend):
    need(device, backend)
    g = torch.Generator().manual_seed(12)
    N, V = 6, 131
    for make_view in (lambda L: L[:, :V], lambda L: L[:V].t(), lambda L: L[::2, 3 : V + 3]):
        L = (torch.randn(2 * V + 4, 2 * V + 4, generator=g) * 3).to(device).requires_grad_()
        logits = make_view(L)[:N] if make_view(L).shape[0] >= N else make_view(L)
        n = logits.shape[0]
        t = torch.randint(0, V, (1,), generator=g).to(device).expand(n)
        lp, ent = fusedrl.logprob_entropy(logits, t, temperature=0.8, backend=backend)
        (lp + 0.5 * ent).sum().backward()
        leaf = logits.detach().contiguous().requires_grad_()
        r_lp, r_ent = reference.logprob_entropy(leaf, t, 0.8)
        (r_lp + 0.5 * r_ent).sum().backward()
        assert err(lp, r_lp) < 1e-5 and err(ent, r_ent) < 1e-5
        got = make_view(L.grad)
        got = got[:n]
        assert err(got, leaf.grad) < 1e-5
        assert L.grad.abs().sum().item() == pytest.approx(leaf.grad.abs().sum().item(), rel=1e-5)


def test_strided_policy_loss():
    g = torch.Generator().manual_seed(13)
    B, T = 4, 9
    LP = (-torch.rand(B, 2 * T, generator=g)).requires_grad_()
    ENT_T = torch.rand(T, B, generator=g).requires_grad_()
    logp, entropy = LP[:, ::2], ENT_T.t()
    old = torch.randn(1, T, generator=g).expand(B, T) * 0.1 + logp.detach()
    adv = torch.randn(B, 1, generator=g).expand(B, T)
    mask = (torch.rand(T, B, generator=g) > 0.2).t()
    ref = logp.detach()[:, :].t().contiguous().t() - 0.05
    cfg = PolicyLossConfig(
        loss_mode="vanilla", loss_agg_mode="seq-mean-token-mean", entropy_coeff=0.01, kl_loss_coef=0.1
    )
    loss, _ = policy_loss(logp, old, adv, mask, entropy=entropy, ref_logp=ref, config=cfg)
    loss.backward()
    c = [q.detach().contiguous().requires_grad_() for q in (logp, entropy)]
    want, _ = policy_loss(
        c[0], old.contiguous(), adv.contiguous(), mask.contiguous(), entropy=c[1], ref_logp=ref.contiguous(), config=cfg
    )
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(LP.grad[:, ::2], c[0].grad)
    torch.testing.assert_close(ENT_T.grad.t(), c[1].grad)
    assert (LP.grad[:, 1::2] == 0).all()


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_strided_fused_policy_loss(backend):
    g = torch.Generator().manual_seed(14)
    B, T, H, V = 2, 6, 8, 41
    X = torch.randn(B, T, 3 * H, generator=g).requires_grad_()
    W_T = torch.randn(H, V, generator=g).requires_grad_()
    hidden, weight = X[..., H : 2 * H], W_T.t()
    targets = torch.randint(0, V, (T, B), generator=g).t()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        old, _ = reference.linear_logprob_entropy(hidden, weight, targets)
    old = old + 0.1
    adv = torch.tensor([1.0, -0.5])
    cfg = PolicyLossConfig(entropy_coeff=0.01)
    loss, _ = fused_policy_loss(hidden, weight, targets, old, adv, mask, config=cfg, backend=backend)
    loss.backward()
    c = [q.detach().contiguous().requires_grad_() for q in (hidden, weight)]
    want, _ = fused_policy_loss(c[0], c[1], targets.contiguous(), old, adv, mask, config=cfg, backend="reference")
    want.backward()
    assert err(loss, want) < 1e-6
    assert err(X.grad[..., H : 2 * H], c[0].grad) < 1e-5 and err(W_T.grad.t(), c[1].grad) < 1e-5
    assert (X.grad[..., :H] == 0).all() and (X.grad[..., 2 * H :] == 0).all()


# ==================================================================================================
# 6. GPU: N > 65535 at V = 151936 within the memory contract, and compute-sanitizer memcheck
# ==================================================================================================
MIB = 2**20


@pytest.mark.gpu
@pytest.mark.parametrize("n", [65537, 262144])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_large_n_full_vocab_memory(backend, n):
    """bf16, H = 64, V = 151936: results match the reference on sampled tokens, and the peak memory above
    inputs + grads stays within the memory target of docs/design.md (128 MiB + 1 KiB/token)."""
    need("cuda", backend)
    dev = torch.device("cuda")
    H, V = 64, 151936
    g = torch.Generator(device=dev).manual_seed(0)
    x = (torch.randn(n, H, device=dev, generator=g) / H**0.25).bfloat16().requires_grad_()
    w = (torch.randn(V, H, device=dev, generator=g) / H**0.25).bfloat16().requires_grad_()
    t = torch.randint(0, V, (n,), device=dev, generator=g)
    g_lp = torch.randn(n, device=dev, generator=g)
    g_H = torch.randn(n, device=dev, generator=g)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    lp, ent = fusedrl.linear_logprob_entropy(x, w, t, backend=backend)
    ((lp * g_lp).sum() + (ent * g_H).sum()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    grads = x.grad.numel() * x.grad.element_size() + w.grad.numel() * w.grad.element_size()
    above = peak - base - grads
    limit = 128 * MIB + 1024 * n
    assert above <= limit, f"{backend}: {above / MIB:.1f} MiB above inputs + grads > {limit / MIB:.1f} MiB"
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    idx = torch.cat([torch.arange(0, 64), torch.arange(65535 - 32, 65535 + 32), torch.arange(n - 64, n)]).to(dev)
    r_lp, r_ent = ref64(x.detach()[idx], w.detach(), t[idx], None, 1.0, None)
    lo_lp, lo_ent = eager_lowprec(x.detach()[idx], w.detach(), t[idx], None, 1.0, None)
    assert_cce("logp", lp.detach()[idx], r_lp, lo_lp, torch.bfloat16)
    assert_cce("entropy", ent.detach()[idx], r_ent, lo_ent, torch.bfloat16)


_MEMCHECK_SCRIPT = textwrap.dedent("""
    import torch, fusedrl
    backend = {backend!r}
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for (n, h, v) in ((37, 24, 1003), (130, 72, 4099)):
            x = torch.randn(n, h, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(v, h, device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(v, device="cuda", dtype=dtype, requires_grad=True)
            t = torch.randint(0, v, (n,), device="cuda")
            for softcap in (None, 30.0):
                lp, ent = fusedrl.linear_logprob_entropy(x, w, t, b, temperature=0.7, softcap=softcap,
                                                         backend=backend)
                (lp.sum() + ent.sum()).backward()
            z = torch.randn(n, v, device="cuda", dtype=dtype, requires_grad=True)
            lp, ent = fusedrl.logprob_entropy(z, t, backend=backend)
            (lp.sum() + ent.sum()).backward()
            # unchecked out-of-range ids and non-finite values must not read or write out of bounds
            bad_t = t.clone()
            bad_t[0], bad_t[-1] = v + 1000, -5
            xb = x.detach().clone()
            xb[1, 0] = float("nan")
            lp, ent = fusedrl.linear_logprob_entropy(xb.requires_grad_(), w, bad_t, b, backend=backend,
                                                     check_inputs=False)
            (lp.sum() + ent.sum()).backward()
            lp, ent = fusedrl.logprob_entropy(z, bad_t, backend=backend, check_inputs=False)
            (lp.sum() + ent.sum()).backward()
    torch.cuda.synchronize()
    print("MEMCHECK-DONE")
""")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_compute_sanitizer_memcheck(backend, tmp_path):
    need("cuda", backend)
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "memcheck_case.py"
    script.write_text(_MEMCHECK_SCRIPT.format(backend=backend))
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # real allocations: OOB is visible
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [tool, "--tool", "memcheck", "--error-exitcode", "99", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "MEMCHECK-DONE" in out, out[-4000:]
    assert "ERROR SUMMARY: 0 errors" in out, out[-4000:]
