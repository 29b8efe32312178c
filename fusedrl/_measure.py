"""Timing, peak-memory and accuracy helpers shared by ``python -m fusedrl`` and ``python -m bench``.

Not public API. Three things, each kept deliberately simple so the numbers can be trusted:

* **Time** (:func:`time_phases`): every repeat runs an untimed ``setup`` and then one or more timed
  phases back to back (e.g. forward, then backward of that forward). On CUDA each phase boundary is
  a CUDA event on the current stream and the device is synchronised once per repeat; on CPU it is
  ``time.perf_counter``. Warm-up repeats are discarded. Reported: median, first/third quartile (IQR),
  min, and the number of repeats.
* **Peak memory above the inputs** (:func:`peak_memory`):
  - CUDA: ``torch.cuda.reset_peak_memory_stats``; ``max_memory_allocated() - memory_allocated()``
    measured around one run, after the inputs exist (caching-allocator bytes actually handed to
    tensors, so allocator caching does not inflate it).
  - CPU: one run in a freshly *spawned* child process (``multiprocessing`` spawn context). The child
    rebuilds the inputs from a seed (a ``"module:function"`` factory + keyword arguments), runs the
    callable once as a warm-up, reads its resident set size (``/proc/self/statm``) as the baseline,
    then runs it again while a background thread samples RSS every ~1 ms. Peak = max sample -
    baseline. glibc malloc is told to serve every block >= 64 KiB with mmap and to trim eagerly
    (``MALLOC_MMAP_THRESHOLD_=65536``, ``MALLOC_TRIM_THRESHOLD_=0``) so freed tensors really leave
    the RSS instead of lingering in malloc arenas. ``ru_maxrss`` is reported alongside as a
    cross-check (it is the peak of the whole child, warm-up included, so it is only an upper bound).
    A 1 ms sampler can miss a spike shorter than 1 ms; tensors large enough to matter take longer
    than that to write on a CPU.
* **Accuracy** (:func:`reference64`): an fp64 oracle computed from the same (upcast) inputs, in
  token chunks so it never holds an fp64 ``[N, V]`` tensor: per-token logp / entropy / LSE for all
  tokens (one fp64 GEMM), dx on a token subset, dW (and db) on a vocabulary subset - which is what
  makes it affordable at N=8192, V=151936.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from . import _config

Tensor = torch.Tensor

MIB = 2**20

CPU_MEMORY_METHOD = (
    "CPU peak memory: one run in a spawned child process; RSS sampled every ~1 ms from /proc/self/statm; "
    "peak minus the RSS measured after building the inputs and one warm-up run; glibc malloc forced to "
    "mmap blocks >= 64 KiB and trim eagerly (MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0)."
)
CUDA_MEMORY_METHOD = (
    "CUDA peak memory: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus "
    "memory_allocated() before the run (inputs already resident; outputs and gradients count)."
)
CPU_TIME_METHOD = "CPU time: time.perf_counter (wall clock) per phase, warm-up repeats discarded; median and IQR."
CPU_PROCESS_TIME_METHOD = (
    "CPU time: time.process_time (CPU seconds used by this process, all threads) per phase, "
    "warm-up repeats discarded; median and IQR. Unlike wall time it is not inflated by other "
    "processes competing for the cores; with one torch thread it equals compute time."
)
CUDA_TIME_METHOD = (
    "CUDA time: torch.cuda.Event per phase on the current stream, one synchronize per repeat, "
    "warm-up repeats discarded; median and IQR."
)


def memory_method(device) -> str:
    return CUDA_MEMORY_METHOD if torch.device(device).type == "cuda" else CPU_MEMORY_METHOD


def time_method(device, clock: str = "wall") -> str:
    if torch.device(device).type == "cuda":
        return CUDA_TIME_METHOD
    return CPU_PROCESS_TIME_METHOD if clock == "process" else CPU_TIME_METHOD


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Summary of one timed phase, in milliseconds."""

    median: float
    q1: float
    q3: float
    min: float
    repeats: int
    samples: list[float] = field(default_factory=list)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def as_dict(self) -> dict:
        d = asdict(self)
        d["iqr"] = self.iqr
        return d


def summarize(samples_ms: Sequence[float]) -> Timing:
    s = sorted(float(v) for v in samples_ms)
    if not s:
        nan = float("nan")
        return Timing(nan, nan, nan, nan, 0, [])
    if len(s) >= 2:
        q = statistics.quantiles(s, n=4, method="inclusive")
        q1, q3 = q[0], q[2]
    else:
        q1 = q3 = s[0]
    return Timing(statistics.median(s), q1, q3, s[0], len(s), [round(v, 4) for v in samples_ms])


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_phases(
    phases: Sequence[Callable],
    device,
    *,
    setup: Optional[Callable] = None,
    warmup: int = 1,
    repeats: int = 5,
    max_seconds: Optional[float] = None,
    clock: str = "wall",
) -> list[Timing]:
    """Time consecutive phases of one step.

    Each repeat: ``state = setup()`` (untimed; None when no setup), then ``phase_i(state)`` for each
    phase with a time mark before the first and after every phase. Returns one :class:`Timing` per
    phase plus, when there is more than one phase, a last one for all phases together.
    ``max_seconds`` stops adding timed repeats (after at least 3) once the budget is spent.
    ``clock`` (CPU only): ``"wall"`` (perf_counter) or ``"process"`` (process_time: CPU time of this
    process, robust to other load on a shared machine; use with one torch thread).
    """
    if clock not in ("wall", "process"):
        raise ValueError(f"clock must be 'wall' or 'process', got {clock!r}")
    now = time.process_time if clock == "process" else time.perf_counter
    device = torch.device(device)
    cuda = device.type == "cuda"
    per_phase: list[list[float]] = [[] for _ in phases]
    total: list[float] = []
    t_start = time.perf_counter()
    for it in range(warmup + repeats):
        state = setup() if setup is not None else None
        synchronize(device)
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(len(phases) + 1)]
            ev[0].record()
            for i, ph in enumerate(phases):
                ph(state)
                ev[i + 1].record()
            torch.cuda.synchronize(device)
            marks = [0.0] + [ev[0].elapsed_time(e) for e in ev[1:]]
        else:
            marks = [now()]
            for ph in phases:
                ph(state)
                marks.append(now())
            marks = [(m - marks[0]) * 1e3 for m in marks]
        del state
        if it >= warmup:
            for i in range(len(phases)):
                per_phase[i].append(marks[i + 1] - marks[i])
            total.append(marks[-1])
            done = it - warmup + 1
            if max_seconds is not None and done >= 3 and time.perf_counter() - t_start > max_seconds:
                break
    out = [summarize(p) for p in per_phase]
    if len(phases) > 1:
        out.append(summarize(total))
    return out


def time_fn(
    fn: Callable[[], object],
    device,
    *,
    warmup: int = 1,
    repeats: int = 5,
    max_seconds: Optional[float] = None,
    clock: str = "wall",
) -> Timing:
    """Median/IQR time of a zero-argument callable."""
    return time_phases([lambda _s: fn()], device, warmup=warmup, repeats=repeats, max_seconds=max_seconds, clock=clock)[
        0
    ]


# --------------------------------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------------------------------
def tensor_bytes(*tensors: Optional[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def peak_memory_cuda(fn: Callable[[], object], device) -> int:
    """Bytes allocated at the peak of one ``fn()`` run above what was allocated just before it."""
    device = torch.device(device)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return int(peak - base)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> Optional[int]:
    """Resident set size of this process in bytes (None where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def _ru_maxrss() -> int:
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


class _RssSampler:
    def __init__(self, interval_s: float = 0.001):
        self.interval = interval_s
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            r = current_rss()
            if r is not None and r > self.peak:
                self.peak = r
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = current_rss() or 0
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        r = current_rss()
        if r is not None and r > self.peak:
            self.peak = r


def _resolve(spec: str) -> Callable:
    import importlib

    mod, _, name = spec.partition(":")
    return getattr(importlib.import_module(mod), name)


def _cpu_peak_child(conn, factory: str, kwargs: dict, threads: int, warmup: bool, interval_s: float) -> None:
    try:
        torch.set_num_threads(threads)
        run = _resolve(factory)(**kwargs)
        if warmup:
            out = run()
            del out
        reset = getattr(run, "reset", None)  # drop state the warm-up left behind (e.g. .grad tensors)
        if reset is not None:
            reset()
        gc.collect()
        base = current_rss()
        if base is None:
            raise RuntimeError("/proc/self/statm is not readable: no RSS sampling on this platform")
        with _RssSampler(interval_s) as s:
            out = run()
        del out
        conn.send(
            {
                "ok": True,
                "peak_bytes": int(s.peak - base),
                "baseline_rss": int(base),
                "ru_maxrss_minus_baseline": int(_ru_maxrss() - base),
                "samples": s.samples,
            }
        )
    except BaseException as e:  # report, never hang the parent
        import traceback

        conn.send({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
    finally:
        conn.close()


def peak_memory_cpu(
    factory: str,
    kwargs: dict,
    *,
    threads: Optional[int] = None,
    warmup: bool = True,
    interval_s: float = 0.001,
    timeout_s: float = 900.0,
) -> dict:
    """Peak RSS above the inputs of one run, measured in a spawned child (see module docstring).

    ``factory`` is ``"package.module:function"``; ``function(**kwargs)`` must build the inputs
    (deterministically) and return a zero-argument callable that performs one measured run.
    Returns a dict with ``ok``, ``peak_bytes``, ``baseline_rss``, ``ru_maxrss_minus_baseline``
    (or ``error``).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    # the spawned child inherits the environment: glibc malloc told to mmap and trim eagerly
    with _config.temporary_environ(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0"):
        p = ctx.Process(
            target=_cpu_peak_child,
            args=(child, factory, kwargs, threads or torch.get_num_threads(), warmup, interval_s),
        )
        p.start()
    child.close()
    res = None
    try:
        if parent.poll(timeout_s):
            res = parent.recv()
    except EOFError:
        res = None
    p.join(10)
    if p.is_alive():
        p.terminate()
        p.join(5)
    if res is None:
        res = {"ok": False, "error": f"child exited with code {p.exitcode} before reporting (timeout {timeout_s}s?)"}
    return res


def peak_memory(
    fn: Optional[Callable[[], object]],
    device,
    *,
    factory: Optional[str] = None,
    kwargs: Optional[dict] = None,
    **cpu_opts,
) -> dict:
    """Device-appropriate peak memory above inputs: CUDA in process (``fn``), CPU in a child (``factory``)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return {"ok": True, "peak_bytes": peak_memory_cuda(fn, device)}
        except torch.OutOfMemoryError as e:  # pragma: no cover - GPU only
            torch.cuda.empty_cache()
            return {"ok": False, "error": f"OOM: {str(e).splitlines()[0]}"}
    if factory is None:
        return {"ok": False, "error": "no factory for the CPU child process"}
    return peak_memory_cpu(factory, kwargs or {}, **cpu_opts)


# --------------------------------------------------------------------------------------------------
# the eager baseline
# --------------------------------------------------------------------------------------------------
def eager_logp_entropy(x: Tensor, w: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """What a trainer does today: logits in the input dtype, upcast to fp32 (as HF models do),
    log_softmax, gather, entropy = -sum p log p. Materialises several [N, V] fp32 tensors."""
    logits = x @ w.t()
    if logits.dtype != torch.float64:  # fp64 stays fp64 (the oracle)
        logits = logits.float()
    lsm = torch.log_softmax(logits, dim=-1)
    logp = lsm.gather(-1, targets[:, None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return logp, ent


def eager_ppo_loss(logp: Tensor, ent: Optional[Tensor], old: Tensor, adv: Tensor, mask: Tensor,
                   entropy_coeff: float = 0.0, clip_low: float = 0.2, clip_high: float = 0.2,
                   clip_c: Optional[float] = 3.0) -> Tensor:  # fmt: skip
    """The PPO loss as a trainer writes it in eager PyTorch (verl's vanilla mode: clip-higher, dual clip,
    token-mean, entropy bonus), the baseline of ``python -m fusedrl`` and ``python -m bench``."""
    d = logp - old
    r = torch.exp(torch.clamp(d, -20.0, 20.0))
    l1 = -adv * r
    l2 = -adv * torch.clamp(r, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(l1, l2)
    if clip_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * clip_c), loss)
    m = mask.to(loss.dtype)
    n_tok = m.sum().clamp(min=1)
    out = (loss * m).sum() / n_tok
    if entropy_coeff and ent is not None:
        out = out - entropy_coeff * (ent * m).sum() / n_tok
    return out


# --------------------------------------------------------------------------------------------------
# fp64 reference on subsets
# --------------------------------------------------------------------------------------------------
def _z64(x64: Tensor, w64: Tensor, b64: Optional[Tensor], temperature: float, softcap: Optional[float]):
    u = x64 @ w64.t()
    if b64 is not None:
        u = u + b64
    if softcap is not None:
        t = torch.tanh(u / softcap)
        return t * (softcap / temperature), (1 - t * t) / temperature
    if temperature == 1.0:
        return u, None
    return u / temperature, 1.0 / temperature


def pick_subset(n: int, k: int, device, seed: int = 1234, must: Optional[Tensor] = None) -> Tensor:
    """Sorted deterministic subset of ``range(n)`` of size <= k (plus ``must`` ids), on ``device``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randperm(n, generator=g)[: min(k, n)]
    if must is not None and must.numel():
        idx = torch.cat([idx, must.reshape(-1).cpu()[: max(1, k // 4)]])
    return torch.unique(idx).to(device)


@dataclass
class Reference64:
    """fp64 per-token statistics for all tokens and the subsets the gradient oracle uses."""

    logp: Tensor  # [N] fp64
    entropy: Tensor  # [N] fp64
    lse: Tensor  # [N] fp64
    tok_idx: Tensor  # token subset for dx
    voc_idx: Tensor  # vocab subset for dW / db


def reference64(
    x: Tensor,
    w: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    *,
    tok_subset: int = 256,
    voc_subset: int = 512,
    chunk_elems: int = 2**25,
    seed: int = 1234,
) -> Reference64:
    """fp64 logp / entropy / LSE for every token (token-chunked: one fp64 GEMM, bounded workspace)."""
    n, h = x.shape
    v = w.shape[0]
    w64 = w.double()
    b64 = bias.double() if bias is not None else None
    logp = torch.empty(n, dtype=torch.float64, device=x.device)
    ent = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    step = max(1, chunk_elems // max(v, 1))
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        z, _ = _z64(x[n0:n1].double(), w64, b64, temperature, softcap)
        ls = torch.logsumexp(z, dim=1)
        p = torch.exp(z - ls[:, None])
        lse[n0:n1] = ls
        ent[n0:n1] = ls - (p * z).sum(1)
        logp[n0:n1] = z.gather(1, targets[n0:n1, None].long()).squeeze(1) - ls
        del z, p
    del w64
    tok = pick_subset(n, tok_subset, x.device, seed)
    voc = pick_subset(v, voc_subset, x.device, seed + 1, must=targets[tok])
    return Reference64(logp, ent, lse, tok, voc)


def reference64_grads(
    ref: Reference64,
    x: Tensor,
    w: Tensor,
    targets: Tensor,
    g_lp: Optional[Tensor],
    g_H: Optional[Tensor],
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    chunk_elems: int = 2**25,
) -> dict[str, Tensor]:
    """fp64 dx on ``ref.tok_idx`` rows, dW (and db) on ``ref.voc_idx`` rows, for upstream grads
    ``g_lp`` / ``g_H`` of logp / entropy (either may be None = 0)."""
    n, h = x.shape
    v = w.shape[0]
    dev = x.device
    zeros = torch.zeros(n, dtype=torch.float64, device=dev)
    glp = zeros if g_lp is None else g_lp.double()
    gH = zeros if g_H is None else g_H.double()
    b64 = bias.double() if bias is not None else None

    def du(z, scale, rows, cols_targets_hit):
        ls, H = ref.lse[rows], ref.entropy[rows]
        p = torch.exp(z - ls[:, None])
        d = -glp[rows, None] * p - gH[rows, None] * p * (z - ls[:, None] + H[:, None])
        d = d + cols_targets_hit * glp[rows, None]
        return d * scale if scale is not None else d

    # dx on the token subset: full vocabulary per token (chunked over vocab)
    t = ref.tok_idx
    x_t = x[t].double()
    dx = torch.zeros(t.numel(), h, dtype=torch.float64, device=dev)
    vstep = max(1, min(16384, chunk_elems // max(t.numel(), 1)))  # bounds the fp64 weight slice too
    for v0 in range(0, v, vstep):
        v1 = min(v, v0 + vstep)
        w_c = w[v0:v1].double()
        z, sc = _z64(x_t, w_c, None if b64 is None else b64[v0:v1], temperature, softcap)
        hit = (targets[t, None].long() == torch.arange(v0, v1, device=dev)[None, :]).double()
        dx += du(z, sc, t, hit) @ w_c
        del z, w_c
    # dW / db on the vocabulary subset: all tokens (chunked over tokens)
    c = ref.voc_idx
    w_s = w[c].double()
    b_s = None if b64 is None else b64[c]
    dw = torch.zeros(c.numel(), h, dtype=torch.float64, device=dev)
    db = torch.zeros(c.numel(), dtype=torch.float64, device=dev)
    nstep = max(1, chunk_elems // max(c.numel(), 1))
    for n0 in range(0, n, nstep):
        n1 = min(n, n0 + nstep)
        x_c = x[n0:n1].double()
        rows = torch.arange(n0, n1, device=dev)
        z, sc = _z64(x_c, w_s, b_s, temperature, softcap)
        hit = (targets[n0:n1, None].long() == c[None, :]).double()
        d = du(z, sc, rows, hit)
        dw += d.t() @ x_c
        db += d.sum(0)
    out = {"dx": dx, "dw": dw}
    if bias is not None:
        out["db"] = db
    return out


def max_abs_err(a: Optional[Tensor], ref: Optional[Tensor]) -> Optional[float]:
    """max |a - ref| over finite-or-not entries (NaN propagates as nan); None when either is missing."""
    if a is None or ref is None:
        return None
    if a.numel() == 0:
        return 0.0
    d = (a.detach().double() - ref.double()).abs()
    if torch.isnan(d).any():
        return float("nan")
    return float(d.max().item())


def fmt_bytes(b: Optional[float]) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "-"
    return f"{b / MIB:.1f}"
