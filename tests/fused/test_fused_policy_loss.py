"""fused_policy_loss == policy_loss(linear_logprob_entropy(...)) for every mode and backend."""

from __future__ import annotations

import pytest
import torch

from fusedrl import reference
from fusedrl.fused import FusedPolicyLoss, fused_policy_loss
from fusedrl.loss import LOSS_AGG_MODES, LOSS_MODES, PolicyLossConfig, policy_loss

try:
    from fusedrl.backends import available_backends

    BACKENDS = ["reference"] + [b for b in available_backends("cpu") if b in ("torch", "triton", "cuda")]
except ImportError:  # registry not there yet
    BACKENDS = ["reference"]
# the triton interpreter is slow: keep it to a subset of modes
FAST_BACKENDS = [b for b in BACKENDS if b != "triton"]


def make_case(B=3, T=7, H=16, V=37, seed=0, dtype=torch.float32, packed=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g) / H**0.25).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.25).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.3).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([T, 3, 5])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.1)
    targets = targets.masked_fill(~mask, -100)  # padding ids must be harmless
    with torch.no_grad():
        lp, _ = reference.linear_logprob_entropy(hidden, weight, targets.clamp_min(0), bias)
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    ref = lp + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g) * 2
    case = dict(
        hidden=hidden, weight=weight, targets=targets, old_logp=old, advantages=adv, mask=mask, ref_logp=ref, bias=bias
    )
    if packed:
        idx = torch.cat([torch.arange(i * T, i * T + int(n)) for i, n in enumerate(lengths)])
        flat = lambda x: x.reshape(B * T, *x.shape[2:])[idx]  # noqa: E731
        case.update(
            hidden=flat(hidden),
            targets=flat(targets),
            old_logp=flat(old),
            mask=flat(mask),
            ref_logp=flat(ref),
            cu_seqlens=torch.tensor([0] + lengths.cumsum(0).tolist(), dtype=torch.int32),
        )
    return {k: v.to(device) for k, v in case.items()}


def leaf(case):
    out = dict(case)
    for k in ("hidden", "weight", "bias"):
        out[k] = case[k].detach().clone().requires_grad_()
    return out


def unfused(case, cfg, backend="reference", **kw):
    tgt = torch.where(case["mask"], case["targets"], torch.zeros_like(case["targets"]))
    need_ent = cfg.entropy_coeff != 0 or kw.pop("return_entropy", False)
    lp, ent = reference.linear_logprob_entropy(
        case["hidden"], case["weight"], tgt, case["bias"], kw.pop("temperature", 1.0), kw.pop("softcap", None), need_ent
    )
    return policy_loss(
        lp,
        case["old_logp"],
        case["advantages"],
        case["mask"],
        entropy=ent,
        ref_logp=case["ref_logp"],
        cu_seqlens=case.get("cu_seqlens"),
        config=cfg,
    )


def grads(loss, case):
    return torch.autograd.grad(loss, [case["hidden"], case["weight"], case["bias"]])


def check(case, cfg, backend, atol=2e-5, **kw):
    a, b = leaf(case), leaf(case)
    dev = case["hidden"].device

    def fresh():
        if cfg.generator is None:
            return None
        return cfg.replace(generator=torch.Generator(device=dev).manual_seed(cfg.generator.initial_seed()))

    cfg_a = fresh() or cfg
    cfg_b = fresh() or cfg
    la, ma = fused_policy_loss(**a, config=cfg_a, backend=backend, **kw)
    lb, mb = unfused(b, cfg_b, **kw)
    torch.testing.assert_close(la, lb, atol=atol, rtol=1e-4)
    assert set(ma) == set(mb)
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], atol=atol, rtol=1e-4, msg=k)
    for ga, gb in zip(grads(la, a), grads(lb, b)):
        torch.testing.assert_close(ga, gb, atol=atol, rtol=1e-3)
    return la, ma


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_fused_matches_unfused(mode, layout, backend):
    case = make_case(packed=layout == "packed", seed=LOSS_MODES.index(mode))
    cfg = PolicyLossConfig(
        loss_mode=mode,
        loss_agg_mode="seq-mean-token-mean",
        entropy_coeff=0.02,
        kl_loss_coef=0.1,
        clip_cov_ratio=0.2,
        clip_cov_lb=0.1,
        kl_cov_ratio=0.2,
        generator=torch.Generator().manual_seed(3),
    )
    check(case, cfg, backend)


@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_fused_aggregations_torch_backend(agg):
    backend = "torch" if "torch" in BACKENDS else "reference"
    cfg = PolicyLossConfig(loss_agg_mode=agg, clip_ratio_high=0.28, entropy_coeff=0.01)
    check(make_case(seed=11), cfg, backend)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available")
@pytest.mark.parametrize("mode", ["vanilla", "kl_cov"])
def test_fused_triton_backend(mode):
    cfg = PolicyLossConfig(loss_mode=mode, entropy_coeff=0.02, kl_cov_ratio=0.2)
    check(make_case(B=2, T=5, H=16, V=37, seed=5), cfg, "triton", atol=1e-4)


def test_temperature_softcap_and_entropy_switch():
    case = make_case(seed=4)
    backend = FAST_BACKENDS[-1]
    cfg = PolicyLossConfig(entropy_coeff=0.05)
    check(case, cfg, backend, temperature=0.7, softcap=3.0)
    # entropy computed only when it is in the loss or asked for
    _, m = fused_policy_loss(**case, config=PolicyLossConfig(), backend=backend)
    assert "entropy" not in m
    _, m = fused_policy_loss(**case, config=PolicyLossConfig(), backend=backend, return_entropy=True)
    assert "entropy" in m
    _, m2 = unfused(case, PolicyLossConfig(), return_entropy=True)
    torch.testing.assert_close(m["entropy"], m2["entropy"], atol=1e-5, rtol=1e-5)


def test_module_equals_function_and_overrides():
    case = make_case(seed=6, packed=True)
    cfg = PolicyLossConfig(loss_agg_mode="token-mean", entropy_coeff=0.01)
    backend = FAST_BACKENDS[-1]
    mod = FusedPolicyLoss(cfg, temperature=0.9, backend=backend)
    lm, mm = mod(**case)
    lf, mf = fused_policy_loss(**case, config=cfg, temperature=0.9, backend=backend)
    torch.testing.assert_close(lm, lf)
    lg, _ = mod(**case, global_num_tokens=1000)
    n_valid = int(case["mask"].sum())
    torch.testing.assert_close(lg, lf * n_valid / 1000, rtol=1e-5, atol=1e-7)
    assert "FusedPolicyLoss" in repr(mod)


def test_no_grad_forward_and_all_masked():
    case = make_case(seed=8)
    backend = FAST_BACKENDS[-1]
    with torch.no_grad():
        loss, m = fused_policy_loss(**case, backend=backend)
    assert torch.isfinite(loss) and not loss.requires_grad
    case = leaf(dict(case, mask=torch.zeros_like(case["mask"])))
    loss, m = fused_policy_loss(**case, backend=backend, config=PolicyLossConfig(entropy_coeff=0.1))
    assert loss.item() == 0.0
    for g in grads(loss, case):
        assert (g == 0).all()


def test_errors():
    case = make_case()
    with pytest.raises(ValueError, match="targets"):
        fused_policy_loss(**dict(case, targets=case["targets"][:, :3]))
    with pytest.raises(TypeError, match="config"):
        fused_policy_loss(**case, config={"loss_mode": "vanilla"})


@pytest.mark.gpu
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_fused_on_cuda_every_backend(mode):
    from fusedrl.backends import available_backends as avail

    cfg = PolicyLossConfig(
        loss_mode=mode,
        loss_agg_mode="token-mean",
        entropy_coeff=0.02,
        kl_loss_coef=0.1,
        clip_cov_ratio=1.0,
        clip_cov_lb=0.1,
        kl_cov_ratio=0.2,
    )
    for packed in (False, True):
        case = make_case(B=3, T=40, H=64, V=1003, seed=1, packed=packed, device="cuda")
        for backend in ["reference"] + avail("cuda"):
            check(case, cfg, backend, atol=1e-4)
