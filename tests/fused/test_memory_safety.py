"""A schedule that never kills a step (docs/one-pass.md, "Memory" and "CUDA graphs"): the one-pass
schedule's memory stays within ``memory_budget_mb`` (peak RSS of a spawned child on CPU); running out of
memory in its own workspace re-plans at half the budget, then falls back to the two-pass form with one
warning; free memory is read per call from the driver and the allocator's counters (only cached bytes
the allocator can hand out as one block count); token-level losses make no host read on either
schedule, so they capture in a CUDA graph (GPU tests)."""

from __future__ import annotations

import importlib
import sys
import traceback
import warnings

import pytest
import torch

from fusedrl import onepass
from fusedrl.backends import device as D
from fusedrl.fused import fused_policy_loss
from fusedrl.loss import PolicyLossConfig

OP = importlib.import_module("fusedrl.onepass.op")
RUN = importlib.import_module("fusedrl.onepass.run")
P = importlib.import_module("fusedrl.onepass.plan")
C = importlib.import_module("fusedrl.onepass.cost")

CFG = PolicyLossConfig(kl_loss_coef=0.1, entropy_coeff=0.01)


def _case(n=30, h=16, v=301, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    d = dict(
        hidden=(torch.randn(n, h, generator=g) / h**0.25).to(dtype),
        weight=(torch.randn(v, h, generator=g) / h**0.25).to(dtype),
        bias=(torch.randn(v, generator=g) * 0.3).to(dtype),
        targets=torch.randint(0, v, (n,), generator=g),
        mask=torch.rand(n, generator=g) > 0.2,
        old_logp=-torch.rand(n, generator=g) * 5 - 3,
        advantages=torch.randn(n, generator=g),
        ref_logp=-torch.rand(n, generator=g) * 5 - 3,
    )
    return {k: t.to(device) for k, t in d.items()}


def _run(case, schedule="one_pass", **kw):
    c = dict(case)
    leaves = [c[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    c.update(hidden=leaves[0], weight=leaves[1], bias=leaves[2])
    cfg = kw.pop("config", CFG)
    if cfg.generator is not None:  # the same random pick on every call (Clip-Cov)
        cfg = cfg.replace(generator=torch.Generator().manual_seed(cfg.generator.initial_seed()))
    loss, metrics = fused_policy_loss(**c, config=cfg, schedule=schedule, **kw)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def _same(a, b, atol=1e-10):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=1e-8)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-8)


# ------------------------------------------------------------------------------------------------
# Out of memory inside the schedule (injected): re-plan at half the budget, then two passes
# ------------------------------------------------------------------------------------------------


class _Failing:
    """Wraps a callable to raise ``torch.OutOfMemoryError`` on its first ``times`` calls."""

    def __init__(self, fn, times):
        self.fn, self.left, self.calls = fn, times, 0

    def __call__(self, *a, **k):
        self.calls += 1
        if self.left > 0:
            self.left -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.fn(*a, **k)


def _spy_budgets(monkeypatch):
    budgets = []
    real = OP.plan

    def spy(*a, **k):
        budgets.append(a[6])
        return real(*a, **k)

    monkeypatch.setattr(OP, "plan", spy)
    return budgets


def test_oom_once_replans_at_half_the_budget(monkeypatch):
    case = _case()
    want = _run(case, memory_budget_mb=0.2)
    budgets = _spy_budgets(monkeypatch)
    monkeypatch.setattr(RUN, "buffers", _Failing(RUN.buffers, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the re-plan is silent (logged)
        got = _run(case, memory_budget_mb=0.2)
    assert budgets == [0.2 * 2**20, 0.1 * 2**20]
    _same(got, want)


def test_oom_in_a_gemm_replans(monkeypatch):
    case = _case(seed=1)
    want = _run(case, memory_budget_mb=0.2)
    budgets = _spy_budgets(monkeypatch)
    monkeypatch.setattr(RUN, "mm_f32", _Failing(RUN.mm_f32, 1))
    got = _run(case, memory_budget_mb=0.2)
    assert len(budgets) == 2
    _same(got, want)


_MODES = {
    "vanilla": CFG,
    "kl_cov": PolicyLossConfig(loss_mode="kl_cov", kl_cov_ratio=0.2),
    "clip_cov": PolicyLossConfig(
        loss_mode="clip_cov",
        clip_cov_ratio=0.2,
        clip_cov_lb=-5.0,
        clip_cov_ub=5.0,
        generator=torch.Generator().manual_seed(3),
    ),  # fmt: skip
    "gspo": PolicyLossConfig(loss_mode="gspo"),
}


@pytest.mark.parametrize("mode", sorted(_MODES))
def test_oom_twice_falls_back_with_one_warning(monkeypatch, mode):
    """The fallback (two passes: the backend's recompute backward) gives the recompute values, the
    selection modes' rank-k correction included."""
    cfg = _MODES[mode]
    case = _case(seed=2)
    want = _run(case, "recompute", config=cfg)
    failing = _Failing(RUN.buffers, 2)
    monkeypatch.setattr(RUN, "buffers", failing)
    two = []
    real_two = OP.run_two_pass
    monkeypatch.setattr(OP, "run_two_pass", lambda *a: two.append(1) or real_two(*a))
    with pytest.warns(UserWarning, match="ran out of memory") as rec:
        got = _run(case, memory_budget_mb=1.0, config=cfg)  # room for the whole sequence (GSPO)
    assert len([w for w in rec if "ran out of memory" in str(w.message)]) == 1
    assert failing.calls == 2 and two == [1]
    _same(got, want)


def test_half_budget_that_cannot_fit_goes_straight_to_the_fallback(monkeypatch):
    """When half the budget cannot hold even the accumulators, the re-plan is not run (it would be one
    row per chunk): the two-pass form runs at once."""
    case = _case(n=40, seed=3, dtype=torch.bfloat16)  # 40 rows of du outweigh dW32: GEMM 3 not deferred
    assert not P.defers_dw(40, 16, 301, torch.bfloat16, "token", True)
    failing = _Failing(RUN.buffers, 1)
    monkeypatch.setattr(RUN, "buffers", failing)
    need = C.memory_parts(40, 16, 301, torch.bfloat16, 64, 64, C.Setting(gemm="upcast"))
    fixed = sum(b for k, b in need if k in ("dw32", "dx32", "db", "per_token"))
    budget_mb = 1.5 * fixed / 2**20  # the accumulators fit the budget, not half of it
    with pytest.warns(UserWarning, match="ran out of memory"):
        got = _run(case, memory_budget_mb=budget_mb)
    assert failing.calls == 1
    want = _run(case, "recompute")
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("mode", ["vanilla", "kl_cov"])
def test_oom_twice_in_a_deferred_run_takes_64_row_chunks(monkeypatch, mode):
    """A deferred run (bf16, GEMM 3 in the backward: its output is the du of every token, which the two-pass
    form does not give) retries in chunks of 64 rows instead of the two-pass form, with one warning."""
    cfg = _MODES[mode]
    case = _case(n=150, h=160, seed=4, dtype=torch.bfloat16)
    assert P.defers_dw(150, 160, 301, torch.bfloat16, "token", True)
    want = _run(case, "recompute", config=cfg)
    failing = _Failing(RUN.buffers, 2)
    monkeypatch.setattr(RUN, "buffers", failing)
    two, chunks = [], []
    monkeypatch.setattr(OP, "run_two_pass", lambda *a: two.append(1))
    real_one = OP.run_one_pass
    monkeypatch.setattr(OP, "run_one_pass", lambda *a, **k: chunks.append(a[5].chunks) or real_one(*a, **k))
    with pytest.warns(UserWarning, match="chunks of 64 rows") as rec:
        got = _run(case, memory_budget_mb=2.0, config=cfg)  # half of it fits too (the second try)
    assert len([w for w in rec if "ran out of memory" in str(w.message)]) == 1
    assert failing.calls == 3 and not two
    assert [b - a for a, b, _ in chunks[-1]] == [64, 64, 22]
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=1e-5, rtol=1e-5)
    for x, y in zip(got[1], want[1]):
        torch.testing.assert_close(x.float(), y.float(), atol=2e-2, rtol=2e-2)


def test_other_errors_propagate(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("not a memory problem")

    monkeypatch.setattr(RUN, "buffers", broken)
    with pytest.raises(RuntimeError, match="not a memory problem"):
        _run(_case(), memory_budget_mb=0.2)


# ------------------------------------------------------------------------------------------------
# Free memory, read per call
# ------------------------------------------------------------------------------------------------


def test_memory_counts_only_cached_bytes_one_block_can_use():
    gib = 2**30
    stats = {
        "reserved_bytes.all.current": 10 * gib,
        "allocated_bytes.all.current": 6 * gib,
        "inactive_split_bytes.all.current": 3 * gib,  # free pieces of segments still partly in use
    }
    plain = D.memory_from_counters(5 * gib, 80 * gib, stats, expandable=False)
    assert plain.usable == 5 * gib + 1 * gib and plain.cached_usable == gib
    expandable = D.memory_from_counters(5 * gib, 80 * gib, stats, expandable=True)
    assert expandable.usable == 5 * gib + 4 * gib
    capped = D.memory_from_counters(50 * gib, 80 * gib, stats, expandable=True, fraction=0.1)
    assert capped.usable == 8 * gib - 6 * gib  # set_per_process_memory_fraction(0.1): 8 GiB minus what is in use


_SETTINGS = [
    ("", False),
    ("expandable_segments:True", True),
    ("max_split_size_mb:128,expandable_segments:False", False),
    ("garbage_collection_threshold:0.6, expandable_segments:true", True),
]


@pytest.mark.parametrize("text, want", _SETTINGS)
def test_allocator_settings(monkeypatch, text, want):
    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: text, raising=False)
    assert D.allocator_expandable() is want


def test_memory_now_is_none_off_cuda():
    assert D.memory_now(torch.device("cpu")) is None


@pytest.mark.gpu
def test_gpu_memory_fraction_never_fails_a_step():
    """A per-process memory fraction far below what the asked budget needs: the one-pass schedule runs
    out of memory in its workspace, re-plans, falls back; the step completes with the recompute values."""
    dev = torch.device("cuda")
    case = _case(n=4096, h=1024, v=65536, dtype=torch.bfloat16, device=dev)
    torch.cuda.empty_cache()
    used = torch.cuda.memory_allocated(dev)
    total = torch.cuda.get_device_properties(dev).total_memory
    # room for the inputs, the gradients and the accumulators (about 0.5 GB), not for a 4 GiB workspace
    torch.cuda.set_per_process_memory_fraction(min(1.0, (used + 1.5 * 2**30) / total), dev)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = _run(case, memory_budget_mb=16384)
        want = _run(case, "recompute")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        torch.cuda.empty_cache()
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=2e-2, rtol=2e-2)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


# ------------------------------------------------------------------------------------------------
# Peak RSS within the budget (CPU, a spawned child: fusedrl/_measure.py)
# ------------------------------------------------------------------------------------------------


def rss_factory(n: int, h: int, v: int, budget_mb: float, dtype: str, ent: float):
    """The measured callable (module-level: the spawned child imports it): one fused-loss step on fresh
    gradients; ``reset`` frees the CPU workspace the warm-up kept, so the step's own allocations count."""
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    x = (torch.randn(n, h, generator=g) / h**0.5).to(dt).requires_grad_()
    w = (torch.randn(v, h, generator=g) / h**0.25).to(dt).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    old, adv = torch.randn(n, generator=g) * 0.1 - 10, torch.randn(n, generator=g)
    mask = torch.ones(n, dtype=torch.bool)
    cfg = PolicyLossConfig(entropy_coeff=ent)

    def run():
        loss, _ = fused_policy_loss(x, w, t, old, adv, mask, config=cfg, schedule="one_pass",
                                    memory_budget_mb=budget_mb)  # fmt: skip
        loss.backward()
        return loss.detach()

    def reset():
        onepass.release_workspace()
        x.grad = w.grad = None

    run.reset = reset
    return run


@pytest.mark.parametrize("dtype, ent, n", [("float32", 0.0, 768), ("float32", 0.01, 768), ("bfloat16", 0.0, 768),
                                           ("bfloat16", 0.0, 384)])  # fmt: skip
def test_peak_rss_within_budget(dtype, ent, n):
    """Peak RSS of a one-pass step above its inputs, minus the gradients it returns, stays within the
    budget + 5% (16-bit inputs: the fp32 accumulators and the fp32 copies of the upcast CPU GEMMs count;
    384 bf16 rows: GEMM 3 deferred, the du of every token and the backward's g·x count)."""
    from fusedrl._measure import peak_memory_cpu

    h, v, budget_mb = 256, 24000, 96.0
    assert P.defers_dw(n, h, v, getattr(torch, dtype), "token", True, budget_mb * 2**20) == (
        dtype == "bfloat16" and n == 384
    )
    size = 4 if dtype == "float32" else 2
    kw = dict(n=n, h=h, v=v, budget_mb=budget_mb, dtype=dtype, ent=ent)
    res = peak_memory_cpu(f"{__name__}:rss_factory", kw, threads=2, timeout_s=300)
    assert res["ok"], res
    grads = (n * h + v * h) * size
    extra = res["peak_bytes"] - grads
    assert extra <= budget_mb * 2**20 * 1.05, (extra / 2**20, res)
    assert extra > 0.25 * budget_mb * 2**20, (extra / 2**20, res)  # the workspace really was used


# ------------------------------------------------------------------------------------------------
# CUDA graphs: no host read on the token path (audited on CPU), capture on a GPU
# ------------------------------------------------------------------------------------------------


_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


@pytest.mark.parametrize("schedule", ["one_pass", "recompute", "auto"])
@pytest.mark.parametrize("mode", ["vanilla", "gpg", "cispo", "kl_cov"])
def test_token_path_makes_no_host_read(monkeypatch, schedule, mode):
    """Every host read of a tensor made from fusedrl's code during a token-level (and selection) loss,
    forward and backward, on both schedules, with the value checks off: none but the backward's
    unit-gradient check, which reads CPU tensors only (a CUDA gradient is always multiplied)."""
    hits = []

    def wrap(name):
        f = getattr(torch.Tensor, name)

        def g(self, *a, **k):
            frames = [fr for fr in traceback.extract_stack()[:-1] if "/fusedrl/" in fr.filename.replace("\\", "/")]
            # the backward's unit-gradient check reads CPU tensors only (guarded by the device type)
            if frames and not (self.device.type == "cpu" and "g_loss == 1" in (frames[-1].line or "")):
                hits.append((name, frames[-1].filename.rsplit("fusedrl", 1)[-1], frames[-1].lineno))
            return f(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, g)

    case = _case(n=24, seed=5, dtype=torch.float32)
    case["mask"] = case["mask"].reshape(4, 6)
    for k in ("targets", "old_logp", "ref_logp"):
        case[k] = case[k].reshape(4, 6)
    case["advantages"] = case["advantages"][:4]
    case["hidden"] = case["hidden"].reshape(4, 6, -1)
    cfg = PolicyLossConfig(loss_mode=mode, kl_loss_coef=0.1, entropy_coeff=0.01)
    leaves = [case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    c = dict(case, hidden=leaves[0], weight=leaves[1], bias=leaves[2])
    for name in _READS:
        wrap(name)
    loss, metrics = fused_policy_loss(**c, config=cfg, schedule=schedule, check_inputs=False)
    torch.autograd.grad(loss * 2.0, leaves)
    monkeypatch.undo()
    assert hits == [], hits


def _graph_step(case, schedule, cfg, backend):
    x = case["hidden"].clone().requires_grad_()
    w = case["weight"].clone().requires_grad_()

    def step():
        loss, metrics = fused_policy_loss(x, w, case["targets"], case["old_logp"], case["advantages"], case["mask"],
                                          ref_logp=case["ref_logp"], config=cfg, schedule=schedule,
                                          backend=backend, memory_budget_mb=256)  # fmt: skip
        gx, gw = torch.autograd.grad(loss, (x, w))
        return loss.detach(), gx, gw

    return step


@pytest.mark.gpu
@pytest.mark.parametrize("n", [512, 256])  # 256 rows: GEMM 3 deferred to the backward (plan.defers_dw)
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("schedule", ["one_pass", "recompute"])
def test_gpu_token_heads_capture_in_a_cuda_graph(schedule, backend, n):
    """One warm-up call, then capture: the replay gives the eager values (same plan, no host read)."""
    import fusedrl

    if backend not in fusedrl.available_backends("cuda"):
        pytest.skip(f"{backend} unavailable on cuda")
    assert P.defers_dw(n, 256, 8003, torch.bfloat16, "token", True) == (n == 256)
    dev = torch.device("cuda")
    case = _case(n=n, h=256, v=8003, dtype=torch.bfloat16, device=dev)
    cfg = PolicyLossConfig(kl_loss_coef=0.1, entropy_coeff=0.01)
    step = _graph_step(case, schedule, cfg, backend)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()  # the warm-up: probes, plan, kernels compiled
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out, eager):  # the same plan and kernels: equal up to cuBLAS's choice per stream
        torch.testing.assert_close(a.float(), b.float(), atol=1e-6, rtol=1e-2)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
