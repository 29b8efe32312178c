"""torch.compile(fullgraph=True) of the public ops: forward AND backward match eager.

fullgraph=True turns any graph break (a host sync such as ``.item()``, an untraceable import, a
data-dependent Python branch) into an error, so these tests also prove the traced paths are sync-free.
Shapes are tiny: the cost is compilation (inductor's C++ codegen on CPU), a few seconds per test.
"""

import pytest
import torch

import fusedrl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

COMPILE_BACKEND = "inductor"


def _compile(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _run(fn, params, *rest):
    """Loss value and the grads of ``params`` (the float tensors among them; None entries pass through)."""
    leaves = [_leaf(t) if t is not None and t.is_floating_point() else t for t in params]
    loss = fn(*leaves, *rest)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]


def _assert_same(eager, compiled, atol=1e-5, rtol=1e-4):
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # dynamo really captured a graph
    (le, ge), (lc, gc) = eager, compiled
    torch.testing.assert_close(lc, le, atol=atol, rtol=rtol)
    assert len(ge) == len(gc)
    for a, b in zip(gc, ge):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def _case(b=2, t=7, h=24, v=131, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, generator=g) / h**0.25
    w = torch.randn(v, h, generator=g) / h**0.25
    bb = torch.randn(v, generator=g) * 0.3 if bias else None
    tg = torch.randint(0, v, (b, t), generator=g)
    return x, w, bb, tg


@pytest.mark.parametrize("variant", ["plain", "bias_softcap_temperature", "no_entropy"])
def test_linear_logprob_entropy_compiles(variant):
    x, w, b, t = _case(bias=variant == "bias_softcap_temperature")
    temperature = 0.7 if variant == "bias_softcap_temperature" else 1.0
    softcap = 5.0 if variant == "bias_softcap_temperature" else None
    want_ent = variant != "no_entropy"
    g = torch.Generator().manual_seed(1)
    c_lp = torch.randn(t.shape, generator=g)
    c_h = torch.randn(t.shape, generator=g)

    def f(x, w, b, t):
        lp, ent = fusedrl.linear_logprob_entropy(
            x, w, t, bias=b, temperature=temperature, softcap=softcap, return_entropy=want_ent, backend="torch"
        )
        out = (lp * c_lp).sum()
        if want_ent:
            out = out + (ent * c_h).sum()
        return out

    eager = _run(f, [x, w, b, t])
    compiled = _run(_compile(f), [x, w, b, t])
    _assert_same(eager, compiled)


def test_linear_logprob_entropy_auto_backend_compiles():
    """backend="auto" is resolved at trace time (no import / driver query traced)."""
    x, w, _, t = _case(t=5, v=67, seed=3)

    def f(x, w, t):
        lp, ent = fusedrl.linear_logprob_entropy(x, w, t)
        return lp.sum() - 0.1 * ent.sum()

    _assert_same(_run(f, [x, w, t]), _run(_compile(f), [x, w, t]))


def test_logprob_entropy_compiles():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 97, generator=g) * 2
    t = torch.randint(0, 97, (3, 5), generator=g)

    def f(z, t):
        lp, ent = fusedrl.logprob_entropy(z, t, temperature=0.9, softcap=10.0, backend="torch")
        return (lp * 1.5).sum() + (ent * 0.25).sum()

    _assert_same(_run(f, [logits, t]), _run(_compile(f), [logits, t]))


def _rl_batch(b=3, t=6, seed=4):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, t, generator=g) > 0.25).float()
    mask[0, :2] = 1.0
    old = -torch.rand(b, t, generator=g) * 4 - 0.5
    ref = old + 0.1 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    return old, ref, adv, mask


_LOSS_CASES = {
    "vanilla": dict(
        loss_mode="vanilla", loss_agg_mode="token-mean", clip_ratio_high=0.28, entropy_coeff=0.01, kl_loss_coef=0.05
    ),
    "gspo": dict(loss_mode="gspo", loss_agg_mode="seq-mean-token-mean", clip_ratio_low=3e-4, clip_ratio_high=4e-4),
    # ratio 1: every candidate is picked, so the (RNG-dependent) random pick is deterministic
    "clip_cov": dict(
        loss_mode="clip_cov",
        loss_agg_mode="seq-mean-token-sum-norm",
        clip_cov_ratio=1.0,
        clip_cov_lb=-0.05,
        clip_cov_ub=0.05,
    ),
    "kl_cov": dict(loss_mode="kl_cov", loss_agg_mode="seq-mean-token-sum", kl_cov_ratio=0.2),
}


@pytest.mark.parametrize("name", list(_LOSS_CASES))
def test_fused_policy_loss_compiles(name):
    cfg_kw = dict(_LOSS_CASES[name])
    x, w, b, t = _case(b=3, t=6, h=16, v=83, bias=True, seed=5)
    old, ref, adv, mask = _rl_batch()
    # start off-policy so the ratios (and the clipping) are non-trivial
    with torch.no_grad():
        lp0, _ = fusedrl.linear_logprob_entropy(x, w, t, bias=b, temperature=0.8, backend="torch")
    old = lp0 + 0.2 * torch.randn(lp0.shape, generator=torch.Generator().manual_seed(6))
    cfg = fusedrl.PolicyLossConfig(**cfg_kw)

    def f(x, w, b, t, old, adv, mask, ref):  # grads w.r.t. x, w, b
        loss, metrics = fusedrl.fused_policy_loss(
            x,
            w,
            t,
            old,
            adv,
            mask,
            ref_logp=ref,
            bias=b,
            temperature=0.8,
            config=cfg,
            backend="torch",
            return_entropy=True,
        )
        return loss + 0.0 * metrics["pg_clipfrac"]

    rest = (old, adv, mask, ref)
    _assert_same(_run(f, [x, w, b, t], *rest), _run(_compile(f), [x, w, b, t], *rest))


def test_fused_policy_loss_metrics_compile():
    """Metrics come out of the compiled graph as tensors (no host sync) and match eager."""
    x, w, _, t = _case(b=2, t=5, h=16, v=61, seed=7)
    old, ref, adv, mask = _rl_batch(b=2, t=5, seed=8)
    cfg = fusedrl.PolicyLossConfig(loss_mode="vanilla", loss_agg_mode="seq-mean-token-mean", kl_loss_coef=0.1)

    def f(x, w, t, old, adv, mask, ref):
        return fusedrl.fused_policy_loss(
            x, w, t, old, adv, mask, ref_logp=ref, config=cfg, backend="torch", return_entropy=True
        )

    le, me = f(x, w, t, old, adv, mask, ref)
    lc, mc = _compile(f)(x, w, t, old, adv, mask, ref)
    torch.testing.assert_close(lc, le, atol=1e-5, rtol=1e-4)
    assert set(mc) == set(me)
    for k in me:
        assert isinstance(mc[k], torch.Tensor) and mc[k].dim() == 0
        torch.testing.assert_close(mc[k], me[k], atol=1e-5, rtol=1e-4)


def test_fused_policy_loss_packed_compiles():
    """Packed layout (cu_seqlens) traces without host syncs as well."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(11, 16, generator=g) / 2
    w = torch.randn(53, 16, generator=g) / 2
    t = torch.randint(0, 53, (11,), generator=g)
    cu = torch.tensor([0, 4, 9, 10])  # the last token belongs to no sequence
    old = -torch.rand(11, generator=g) * 3 - 1
    adv = torch.randn(3, generator=g)
    mask = torch.ones(11)
    cfg = fusedrl.PolicyLossConfig(
        loss_mode="gspo",
        loss_agg_mode="seq-mean-token-mean",
        clip_ratio_low=0.05,
        clip_ratio_high=0.08,
        entropy_coeff=0.01,
    )

    def f(x, w, t, cu, old, adv, mask):
        return fusedrl.fused_policy_loss(x, w, t, old, adv, mask, cu_seqlens=cu, config=cfg, backend="torch")[0]

    rest = (cu, old, adv, mask)
    _assert_same(_run(f, [x, w, t], *rest), _run(_compile(f), [x, w, t], *rest))
