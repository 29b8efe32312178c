"""Regression benchmarks (pytest-benchmark): the cases of ``python -m bench``, small enough to run in a few
minutes, on the CPU and, when there is one, on the GPU (a timer that synchronises the device).

    pytest bench --benchmark-only                                   # run and print the table
    pytest bench --benchmark-only --benchmark-save=cpu-baseline     # store a baseline (bench/results/pytest-benchmark)
    pytest bench --benchmark-only --benchmark-compare --benchmark-compare-fail=median:15%
                                                                    # fail when a median got >15% slower than
                                                                    # the newest stored run of this machine

``python -m bench`` keeps the full tables, the GEMM floor, the peers and the plots; this suite is the quick
check that a change did not make a hot path slower. Benchmarks are not tests: nothing here asserts a time.
"""

from __future__ import annotations

import time

import pytest
import torch

from bench.cases import DEFAULT_LOSS, KL_COV_LOSS, CaseSpec, build_case, make_old_logp
from bench.providers import Eager, EagerGRPO, FusedRL, FusedRLLoss

CUDA = torch.cuda.is_available()


def _cuda_timer() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


# one shape per device: CPU small enough for a quick run (2 cores), CUDA the headline shape
SHAPES = {"cpu": dict(n=1024, h=512, v=32000, dtype="fp32"), "cuda": dict(n=8192, h=4096, v=151936, dtype="bf16")}
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"), pytest.mark.benchmark(timer=_cuda_timer)],
    ),
]
BACKEND = {"cpu": "torch", "cuda": "auto"}

_CASES: dict = {}


def _case(device: str, task: str):
    """The bench's random-regime case for the device (the loss task gets rollout log-probs near the truth)."""
    key = (device, task)
    if key not in _CASES:
        spec = CaseSpec(**SHAPES[device], regime="random", device=device, seq_len=256)
        if task == "loss":
            c = build_case(spec, requires_grad=False)
            with torch.no_grad():
                import fusedrl

                lp, _ = fusedrl.linear_logprob_entropy(c.x, c.w, c.targets, return_entropy=False)
            spec.old_logp = make_old_logp(lp, spec.seed)
        _CASES[key] = build_case(spec)
    return _CASES[key]


def _step(provider, case):
    def setup():
        case.x.grad = case.w.grad = None

    def run():
        provider.backward(case, provider.forward(case))

    return setup, run


def _bench(benchmark, provider, case, rounds: int = 3):
    ok, why = provider.available(case.x.device, case.x.dtype)
    if not ok:
        pytest.skip(why)
    setup, run = _step(provider, case)
    setup()
    run()  # warm-up (allocator, workspace, compile caches)
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)


@pytest.mark.parametrize("device", DEVICES)
def test_core_op_train_step(benchmark, device):
    """linear_logprob_entropy forward + backward (random upstream gradients on logp and entropy)."""
    _bench(benchmark, FusedRL(BACKEND[device]), _case(device, "core"))


@pytest.mark.parametrize("device", DEVICES)
def test_core_op_scoring(benchmark, device):
    """linear_logprob_entropy under no_grad (old / reference log-probs of a rollout batch)."""
    provider, case = FusedRL(BACKEND[device]), _case(device, "core")
    ok, why = provider.available(case.x.device, case.x.dtype)
    if not ok:
        pytest.skip(why)
    provider.score(case)
    benchmark.pedantic(lambda: provider.score(case), rounds=3, iterations=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name, semantics, schedule",
    [("vanilla", DEFAULT_LOSS, "auto"), ("vanilla", DEFAULT_LOSS, "recompute"), ("kl_cov", KL_COV_LOSS, "auto")],
    ids=["one-pass", "recompute", "kl_cov-one-pass"],
)
def test_fused_loss_train_step(benchmark, device, name, semantics, schedule):
    """fused_policy_loss forward + backward: PPO + entropy bonus on the default schedule (one pass), the
    recompute schedule, and KL-Cov (selection and rank-k correction)."""
    _bench(benchmark, FusedRLLoss(BACKEND[device], schedule=schedule, semantics=semantics), _case(device, "loss"))


@pytest.mark.parametrize("device", DEVICES)
def test_eager_baselines(benchmark, device):
    """The eager loss step (logits, log_softmax, entropy, PPO loss): the yardstick the others move against."""
    _bench(benchmark, EagerGRPO(), _case(device, "loss"))


@pytest.mark.parametrize("device", DEVICES)
def test_eager_core(benchmark, device):
    _bench(benchmark, Eager(), _case(device, "core"))
