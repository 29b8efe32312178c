"""Per-token temperature (a float, or one value per token / per sequence) through the core op, the
logits op and the fused loss, forward and backward, on every backend, against the reference."""

from __future__ import annotations

import pytest
import torch
from _factory import make_case

import fusedrl
from fusedrl import PolicyLossConfig, fused_policy_loss, reference

# the triton backend runs in the interpreter on CPU (slow): small shapes
BACKENDS = ["torch"] + [b for b in ("triton",) if b in fusedrl.available_backends("cpu")]


def _temps(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 1.7 * torch.rand(shape, generator=g)


def _grads(out, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    logp, ent = out
    gl, gh = torch.randn(logp.shape, generator=g), torch.randn(ent.shape, generator=g)
    return torch.autograd.grad([logp, ent], leaves, [gl.to(logp.dtype), gh.to(ent.dtype)])


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_core_per_token_temperature(backend, softcap):
    x, w, b, t = make_case(37, 24, 507, torch.float32, bias=True, seed=3)
    x, w, b = (q.requires_grad_() for q in (x, w, b))
    temp = _temps(37)
    out = fusedrl.linear_logprob_entropy(x, w, t, b, temperature=temp, softcap=softcap, backend=backend)
    got = _grads(out, [x, w, b])
    x64, w64, b64 = (q.detach().double().requires_grad_() for q in (x, w, b))
    ref = reference.linear_logprob_entropy(x64, w64, t, b64, temp.double(), softcap)
    want = _grads(ref, [x64, w64, b64])
    torch.testing.assert_close(out[0].double(), ref[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[1].double(), ref[1], atol=2e-5, rtol=1e-5)
    for g1, g0 in zip(got, want):
        torch.testing.assert_close(g1.double(), g0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_core_per_sequence_temperature_and_equal_vector(backend):
    x, w, _, t = make_case(2 * 9, 16, 203, torch.float32, seed=4)
    x, t = x.reshape(2, 9, 16), t.reshape(2, 9)
    per_seq = torch.tensor([0.5, 1.7])
    lp, ent = fusedrl.linear_logprob_entropy(x, w, t, temperature=per_seq, backend=backend)
    want = fusedrl.linear_logprob_entropy(x, w, t, temperature=per_seq[:, None].expand(2, 9), backend=backend)
    torch.testing.assert_close(lp, want[0])
    # an all-equal vector is the float path
    same = fusedrl.linear_logprob_entropy(x, w, t, temperature=torch.full((2, 9), 0.7), backend=backend)
    scal = fusedrl.linear_logprob_entropy(x, w, t, temperature=0.7, backend=backend)
    torch.testing.assert_close(same[0], scal[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(same[1], scal[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_per_token_temperature(backend):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(11, 301, generator=g) * 3).requires_grad_()
    t = torch.randint(0, 301, (11,), generator=g)
    temp = _temps(11, 6)
    out = fusedrl.logprob_entropy(logits, t, temperature=temp, backend=backend)
    got = _grads(out, [logits])
    l64 = logits.detach().double().requires_grad_()
    ref = reference.logprob_entropy(l64, t, temp.double())
    want = _grads(ref, [l64])
    torch.testing.assert_close(out[0].double(), ref[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("schedule", ["one_pass", "recompute"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("kind", ["token", "sequence"])
def test_fused_loss_per_token_temperature(schedule, layout, kind):
    g = torch.Generator().manual_seed(7)
    B, T, H, V = 3, 6, 16, 151
    hidden = torch.randn(B * T, H, generator=g, dtype=torch.float64) / 2
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / 2
    targets = torch.randint(0, V, (B * T,), generator=g)
    old = -torch.rand(B * T, generator=g, dtype=torch.float64) * 5
    adv = torch.randn(B * T, generator=g, dtype=torch.float64)
    mask = torch.rand(B * T, generator=g) > 0.2
    seq_t = _temps(B, 8).double()
    tok_t = seq_t.repeat_interleave(T) if kind == "sequence" else _temps(B * T, 9).double()
    extra = {}
    if layout == "padded":
        shape = lambda z: z.reshape(B, T, *z.shape[1:])  # noqa: E731
        hidden, targets, old, adv, mask = map(shape, (hidden, targets, old, adv, mask))
        temp = seq_t if kind == "sequence" else tok_t.reshape(B, T)
    else:
        extra["cu_seqlens"] = torch.tensor([0, T, 2 * T, 3 * T], dtype=torch.int32)
        temp = seq_t if kind == "sequence" else tok_t
    cfg = PolicyLossConfig(entropy_coeff=0.01)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    loss, _ = fused_policy_loss(
        leaves[0],
        leaves[1],
        targets,
        old,
        adv,
        mask,
        temperature=temp,
        config=cfg,
        schedule=schedule,
        backend="torch",
        memory_budget_mb=0.01,
        **extra,
    )
    got = torch.autograd.grad(loss, leaves)
    ref_leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    lp, ent = reference.linear_logprob_entropy(
        ref_leaves[0], ref_leaves[1], targets, None, tok_t.reshape(targets.shape), None
    )
    want_loss, _ = fusedrl.policy_loss(lp, old, adv, mask, entropy=ent, config=cfg, **extra)
    want = torch.autograd.grad(want_loss, ref_leaves)
    torch.testing.assert_close(loss, want_loss, atol=1e-10, rtol=1e-9)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_temperature_validation():
    x, w, _, t = make_case(6, 8, 17, torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        fusedrl.linear_logprob_entropy(x, w, t, temperature=torch.ones(5))
    with pytest.raises(ValueError, match="temperature"):
        fusedrl.linear_logprob_entropy(x, w, t, temperature=torch.tensor([1.0, 1, 1, 1, 1, -1]))
    with pytest.raises(ValueError, match="temperature"):
        fusedrl.linear_logprob_entropy(x, w, t, temperature=torch.tensor([1.0, 1, 1, 1, 1, float("nan")]))
    with pytest.raises(ValueError, match="temperature"):
        fusedrl.linear_logprob_entropy(x, w, t, temperature=torch.ones(6, requires_grad=True))
    with pytest.raises(TypeError, match="temperature"):
        fusedrl.linear_logprob_entropy(x, w, t, temperature=torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        fusedrl.logprob_entropy(torch.randn(6, 17), t, temperature=torch.ones(6, 1))
