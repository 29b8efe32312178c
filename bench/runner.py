"""``python -m bench``: fusedrl vs eager PyTorch, torch.compile, installed peers and the GEMM floor.

See bench/results/README.md for how the committed results were produced and what every column means.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch

from fusedrl import _measure as M

from . import report
from .cases import DTYPES, Case, CaseSpec, build_case, calibrate_alpha, grpo_loss, make_old_logp
from .providers import GEMM_NAMES, Provider, select

# --------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------
PRESETS = {
    # docs/design.md targets, CPU line: torch backend, fp32, N=4096, H=1024, V=32000
    "cpu-target": dict(
        device="cpu",
        n=[4096],
        h=1024,
        v=[32000],
        dtype="fp32",
        regime="both",
        repeats=3,
        warmup=0,
        providers=["eager", "compile", "fusedrl", "verl-torch", "liger", "!compile-grpo"],
    ),
    # docs/design.md targets (fused loss), CPU line: the one-pass fused loss vs the three-GEMM floor, eager, compile
    "cpu-loss": dict(
        device="cpu",
        n=[4096],
        h=1024,
        v=[32000],
        dtype="fp32",
        regime="both",
        repeats=3,
        warmup=1,
        tasks=["loss", "core"],
        providers=[
            "eager-grpo",
            "compile-grpo",
            "fusedrl-grpo-torch",
            "fusedrl-klcov-torch",
            "fusedrl-clipcov-torch",
            "fusedrl-steer-torch",
            "fusedrl-bapo-torch",
            "fusedrl-rlplus-torch",
            "fusedrl-segment-torch",
            "fusedrl-torch",
        ],
    ),  # fmt: skip
    # docs/design.md targets (fused loss), GPU line: the fused loss on every backend with the peers, headline shape
    "headline-loss": dict(
        device="cuda", n=[8192], h=4096, v=[151936], dtype="bf16", regime="both", repeats=10, warmup=3, tasks=["loss"]
    ),
    # the headline shape of docs/design.md: N=8192, H=4096, V=151936 (Qwen-7B head), bf16
    "headline": dict(device="cuda", n=[8192], h=4096, v=[151936], dtype="bf16", regime="both", repeats=10, warmup=3),
}
QUICK = {
    "cpu": dict(
        n=[512, 2048],
        h=1024,
        v=[32000],
        dtype="fp32",
        regime="random",
        repeats=3,
        warmup=1,
        providers=["eager", "fusedrl"],
        tasks=["core"],
    ),
    "cuda": dict(
        n=[2048, 8192],
        h=4096,
        v=[151936],
        dtype="bf16",
        regime="random",
        repeats=5,
        warmup=2,
        providers=["eager", "fusedrl"],
        tasks=["core"],
    ),
}
DEFAULTS = {
    "cpu": dict(n=[1024, 4096], h=1024, v=[32000], dtype="fp32", regime="both", repeats=3, warmup=1),
    "cuda": dict(n=[8192], h=4096, v=[151936], dtype="bf16", regime="both", repeats=10, warmup=3),
}


def _ints(s: str) -> list[int]:
    return [int(float(x)) for x in s.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="small fast sweep (eager vs fusedrl vs GEMM floor)")
    ap.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="cpu-target: the CPU target shape; headline: the GPU headline shape",
    )
    ap.add_argument("--n", type=_ints, default=None, help="comma list of token counts N")
    ap.add_argument("--h", type=int, default=None, help="hidden size H")
    ap.add_argument("--v", type=_ints, default=None, help="comma list of vocabulary sizes V")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    ap.add_argument("--regime", choices=["random", "peaked", "both"], default=None)
    ap.add_argument(
        "--providers",
        default=None,
        help="comma list of provider names or prefixes (e.g. eager,fusedrl,liger; !name excludes); default: all",
    )
    ap.add_argument("--tasks", default=None, help="comma list of core,loss (default: both; --quick: core)")
    ap.add_argument(
        "--out",
        default=None,
        help="output folder (default bench/results/<device-tag>/, with --quick <device-tag>-quick/)",
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    ap.add_argument("--warmup", type=int, default=None, help="discarded warm-up repeats")
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="stop adding repeats (after 3) once one timing loop has run this long",
    )
    ap.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="skip (and list as skipped) providers that would start after this many seconds",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    ap.add_argument("--no-score", action="store_true", help="skip the no-grad scoring rows")
    ap.add_argument("--no-errors", action="store_true", help="skip the fp64 accuracy check")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--filter-eps",
        default="auto",
        help="gradient-filter threshold for the '+filter' rows: auto (finfo(dtype).eps/32), a float, "
        "or none to drop those rows",
    )
    ap.add_argument("--seq-len", type=int, default=1024, help="loss task: tokens per sequence")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument(
        "--paired-floor",
        choices=["auto", "on", "off"],
        default="auto",
        help="also run the three floor GEMMs inside every timed repeat of a training step and report "
        "'x floor' as the median per-repeat ratio (robust to load drifting on a shared machine; "
        "auto = on for CPU, off for CUDA)",
    )
    ap.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="CPU timing clock: wall (perf_counter) or process (CPU time of this process; robust to "
        "other load on a shared machine, use with --threads 1)",
    )
    ap.add_argument(
        "--plot-only",
        "--render",
        dest="plot_only",
        default=None,
        metavar="RESULTS_JSON",
        help="re-render results.md and plot.png next to an existing results.json (no measuring)",
    )
    a = ap.parse_args(argv)
    if a.plot_only:
        return a
    dev = a.device or (PRESETS[a.preset]["device"] if a.preset else ("cuda" if torch.cuda.is_available() else "cpu"))
    a.device = dev
    dtype_key = "cuda" if torch.device(dev).type == "cuda" else "cpu"
    base = dict(DEFAULTS[dtype_key])
    base.update(providers=None, tasks=["core", "loss"])
    if a.preset:
        base.update({k: v for k, v in PRESETS[a.preset].items() if k != "device"})
    if a.quick:
        base.update(QUICK[dtype_key])
    for k in ("n", "h", "v", "dtype", "regime", "repeats", "warmup"):
        if getattr(a, k) is None:
            setattr(a, k, base[k])
    a.providers = [t.strip() for t in a.providers.split(",")] if a.providers else base["providers"]
    a.tasks = [t.strip() for t in a.tasks.split(",")] if a.tasks else base["tasks"]
    a.paired_floor = (a.paired_floor == "on") or (a.paired_floor == "auto" and torch.device(dev).type == "cpu")
    fe = str(a.filter_eps).lower()
    a.filter_eps = None if fe in ("none", "off", "0") else ("auto" if fe == "auto" else float(fe))
    return a


# --------------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------------
def _git(*args) -> Optional[str]:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return (
            subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip() or None
        )
    except Exception:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    info = {"type": device.type}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            name=torch.cuda.get_device_name(device),
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            sms=p.multi_processor_count,
            cuda=torch.version.cuda,
        )
    else:
        mem = None
        try:
            mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        except (ValueError, OSError, AttributeError):
            pass
        info.update(name=cpu_name(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(), memory_gib=mem)
    return info


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for k in ("h200", "h100", "a100", "l40s", "l4", "b200", "gh200"):
        if k in name:
            return f"cuda-{k}"
    return "cuda-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")


def loadavg() -> Optional[list[float]]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "numpy", "liger_kernel", "cut_cross_entropy", "verl"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod.replace("_", "-")) if mod != "triton" else __import__("triton").__version__
        except Exception:
            out[mod] = None
    try:
        import fusedrl

        out["fusedrl"] = fusedrl.__version__
    except Exception:
        out["fusedrl"] = None
    return out


# --------------------------------------------------------------------------------------------------
# measurement pieces
# --------------------------------------------------------------------------------------------------
def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _floor_gemms(case: Case):
    """The three floor GEMMs (x@W^T, dz@W, dz^T@x) as zero-argument callables over buffers made once
    per shape, in GEMM_NAMES order."""
    x, w = case.x.detach(), case.w.detach()
    n, v = x.shape[0], w.shape[0]
    g = torch.Generator(device=x.device).manual_seed(99)
    dz = (torch.randn(n, v, generator=g, device=x.device) * 1e-3).to(x.dtype)
    out1 = torch.empty(n, v, dtype=x.dtype, device=x.device)
    out2 = torch.empty_like(x)
    out3 = torch.empty_like(w)
    return [
        lambda: torch.matmul(x, w.t(), out=out1),
        lambda: torch.matmul(dz, w, out=out2),
        lambda: torch.matmul(dz.t(), x, out=out3),
    ]


def _floor_fns(case: Case):
    """The three floor GEMMs as phases (for --paired-floor)."""
    return [lambda _s, f=f: f() for f in _floor_gemms(case)]


def gemm_floor(case: Case, args) -> dict[str, M.Timing]:
    """The three bare GEMMs of the op's shapes in the input dtype, into preallocated outputs."""
    res = {}
    for key, fn in zip(GEMM_NAMES, _floor_gemms(case)):
        res[key] = M.time_fn(
            fn,
            case.x.device,
            warmup=max(1, args.warmup),
            repeats=args.repeats,
            max_seconds=args.max_seconds,
            clock=args.clock,
        )
    return res  # dz and the outputs are freed on return


class Ref:
    """fp64 oracle for one case; gradient references cached per upstream-grad kind."""

    def __init__(self, case: Case, args):
        t0 = time.perf_counter()
        self.r = M.reference64(case.x.detach(), case.w.detach(), case.targets)
        self.seconds = time.perf_counter() - t0
        self._grads: dict[str, dict[str, torch.Tensor]] = {}
        self.case = case

    @property
    def mean_entropy(self) -> float:
        return float(self.r.entropy.mean())

    def core_grads(self, with_entropy: bool):
        key = f"core-{with_entropy}"
        if key not in self._grads:
            c = self.case
            self._grads[key] = M.reference64_grads(
                self.r, c.x.detach(), c.w.detach(), c.targets, c.g_lp, c.g_H if with_entropy else None
            )
        return self._grads[key]

    def loss(self, sem):
        key = f"loss-{sem}"
        if key not in self._grads:
            c = self.case
            from .cases import _pad_bt

            lp = self.r.logp.clone().requires_grad_(True)
            en = self.r.entropy.clone().requires_grad_(True)
            loss = grpo_loss(
                _pad_bt(lp, c.B, c.T),
                _pad_bt(en, c.B, c.T),
                c.old_logp.double(),
                c.adv_bt().double(),
                c.mask.double(),
                sem,
            )
            g_lp, g_H = torch.autograd.grad(loss, [lp, en], allow_unused=True)
            grads = M.reference64_grads(self.r, c.x.detach(), c.w.detach(), c.targets, g_lp, g_H)
            grads["loss"] = loss.detach()
            self._grads[key] = grads
        return self._grads[key]


def _errors(p: Provider, case: Case, ref: Optional[Ref], out) -> dict:
    if ref is None or not getattr(p, "oracle", True):
        return {}
    r = ref.r
    e = {}
    if p.task == "core":
        logp, ent = out
        e["logp"] = M.max_abs_err(logp.reshape(-1), r.logp)
        e["entropy"] = M.max_abs_err(ent.reshape(-1), r.entropy) if (ent is not None and p.has_entropy) else None
        g = ref.core_grads(p.has_entropy)
    else:
        g = ref.loss(p.semantics)
        e["loss"] = M.max_abs_err(out.detach().reshape(()), g["loss"])
    if case.x.grad is not None:
        e["dx"] = M.max_abs_err(case.x.grad[r.tok_idx], g["dx"])
    if case.w.grad is not None:
        e["dw"] = M.max_abs_err(case.w.grad[r.voc_idx], g["dw"])
    return e


def _mem(p: Provider, case: Case, args, mode: str) -> dict:
    if args.no_memory:
        return {"ok": False, "error": "skipped (--no-memory)"}
    dev = case.x.device
    if dev.type == "cuda":

        def run():
            if mode == "score":
                return p.score(case)
            out = p.forward(case)
            p.backward(case, out)
            return None

        case.zero_grads()
        res = M.peak_memory(run, dev)
        case.zero_grads()
        return res
    return M.peak_memory(
        None,
        dev,
        factory="bench.providers:memory_factory",
        kwargs=dict(provider=p.name, spec=case.spec.to_dict(), mode=mode, filter_eps=args.filter_eps),
    )


def bench_provider(p: Provider, case: Case, ref: Optional[Ref], args) -> list[dict]:
    dev = case.x.device
    rows = []
    base = dict(provider=p.name, family=p.family, task=p.task, note=p.note)

    # 1) one checked run (also the first warm-up: compile / autotune happen here)
    case.zero_grads()
    out = p.forward(case)
    p.backward(case, out)
    err = _errors(p, case, None if args.no_errors else ref, out)
    del out
    case.zero_grads()
    _free(dev)

    # 2) training step timing: forward and backward of that forward, per repeat
    holder = {}

    def setup():
        case.zero_grads()
        return holder

    def fwd(s):
        s["out"] = p.forward(case)

    def bwd(s):
        p.backward(case, s.pop("out"))

    gem = getattr(case, "floor_fns", None) if args.paired_floor else None
    # a provider priced against another one (e.g. the forward with dH against the one without) runs that
    # provider's forward inside the same repeats (its output dropped at once)
    base_p = getattr(p, "paired_base", None)

    def base_fwd(_s):
        base_p.forward(case)  # the output (and its graph) dropped at once

    extra = [base_fwd] if base_p is not None else []
    res = M.time_phases(
        [fwd, bwd] + extra + list(gem or []),
        dev,
        setup=setup,
        warmup=args.warmup,
        repeats=args.repeats,
        max_seconds=args.max_seconds,
        clock=args.clock,
    )
    tf, tb = res[0], res[1]
    med = lambda xs: float(statistics.median(xs))  # noqa: E731
    vs_base = {}
    if extra:
        vs_base = dict(provider=base_p.name, x_fwd=med([a / b for a, b in zip(tf.samples, res[2].samples)]))
    pair = None
    if gem:
        # the three floor GEMMs ran in the same repeats, right after the step: ratios per repeat
        i = 2 + len(extra)
        f1, f2, f3 = res[i].samples, res[i + 1].samples, res[i + 2].samples
        tot = [a + b for a, b in zip(tf.samples, tb.samples)]
        tt = M.summarize(tot)
        pair = dict(
            x_floor=med([t / (a + b + c) for t, a, b, c in zip(tot, f1, f2, f3)]),
            x_floor_fwd=med([t / a for t, a in zip(tf.samples, f1)]),
            x_floor_bwd=med([t / (b + c) for t, b, c in zip(tb.samples, f2, f3)]),
            floor_ms=med([a + b + c for a, b, c in zip(f1, f2, f3)]),
            repeats=len(tot),
        )
    else:
        tt = M.summarize([a + b for a, b in zip(tf.samples, tb.samples)]) if extra else res[2]
    case.zero_grads()
    _free(dev)
    mem = _mem(p, case, args, "train")
    _free(dev)
    rows.append(
        dict(
            base,
            mode="train",
            status="ok",
            fwd=tf.as_dict(),
            bwd=tb.as_dict(),
            total=tt.as_dict(),
            mem=mem,
            err=err,
            **({"paired_floor": pair} if pair else {}),
            **({"vs_base": vs_base} if vs_base else {}),
        )
    )

    # 3) scoring: no-grad forward
    if p.task == "core" and p.can_score and not args.no_score:
        with torch.no_grad():
            out = p.score(case)
        serr = {}
        if ref is not None and not args.no_errors:
            serr["logp"] = M.max_abs_err(out[0].reshape(-1), ref.r.logp)
            if out[1] is not None and p.has_entropy:
                serr["entropy"] = M.max_abs_err(out[1].reshape(-1), ref.r.entropy)
        del out
        svs = {}
        if base_p is not None:  # scored against the base provider inside the same repeats
            both = M.time_phases(
                [lambda _s: p.score(case), lambda _s: base_p.score(case)],
                dev,
                warmup=args.warmup,
                repeats=args.repeats,
                max_seconds=args.max_seconds,
                clock=args.clock,
            )
            ts = both[0]
            svs = dict(provider=base_p.name, x_fwd=med([a / b for a, b in zip(ts.samples, both[1].samples)]))
        else:
            ts = M.time_fn(
                lambda: p.score(case),
                dev,
                warmup=args.warmup,
                repeats=args.repeats,
                max_seconds=args.max_seconds,
                clock=args.clock,
            )
        _free(dev)
        smem = _mem(p, case, args, "score")
        _free(dev)
        rows.append(dict(base, mode="score", status="ok", fwd=ts.as_dict(), mem=smem, err=serr,
                         **({"vs_base": svs} if svs else {})))  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------
# main loop
# --------------------------------------------------------------------------------------------------
class Progress:
    def __init__(self, total: int):
        self.total, self.k = total, 0
        self.bar = None
        if sys.stderr.isatty():  # a bar in a log file is noise: print a counter there instead
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, dynamic_ncols=True, file=sys.stderr)
            except Exception:
                self.bar = None

    def step(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(msg[:60])
        else:
            print(f"[{self.k + 1}/{self.total}] {msg}", file=sys.stderr, flush=True)

    def done(self) -> None:
        self.k += 1
        if self.bar is not None:
            self.bar.update(1)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    out_dir = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", device_tag(device) + ("-quick" if args.quick else "")
    )
    os.makedirs(out_dir, exist_ok=True)
    regimes = ["random", "peaked"] if args.regime == "both" else [args.regime]
    providers = select(args.providers, args.tasks, args.filter_eps)
    avail = {}
    for p in providers:
        try:
            avail[p.name] = p.available(device, dtype)
        except Exception as e:
            avail[p.name] = (False, f"availability check failed: {type(e).__name__}: {e}")
    runnable = [p for p in providers if avail[p.name][0]]
    skipped = [dict(provider=p.name, task=p.task, reason=avail[p.name][1]) for p in providers if not avail[p.name][0]]

    meta = dict(
        tool="python -m bench",
        argv=sys.argv[1:] if args.argv is None else args.argv,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        device=device_info(device),
        versions=versions(),
        loadavg_start=loadavg(),
        fusedrl_commit=_git("rev-parse", "HEAD"),
        fusedrl_describe=_git("describe", "--always", "--dirty"),
        config=dict(
            n=args.n,
            h=args.h,
            v=args.v,
            dtype=args.dtype,
            regimes=regimes,
            tasks=args.tasks,
            repeats=args.repeats,
            warmup=args.warmup,
            max_seconds=args.max_seconds,
            seed=args.seed,
            seq_len=args.seq_len,
            filter_eps=args.filter_eps,
            threads=torch.get_num_threads(),
            paired_floor=args.paired_floor,
            clock=args.clock if device.type == "cpu" else "cuda-events",
            preset=args.preset,
            quick=args.quick,
        ),
        methods=dict(
            time=M.time_method(device, args.clock),
            memory=M.memory_method(device),
            accuracy="max |error| vs an fp64 oracle on the same (upcast) inputs: logp and entropy on all "
            "tokens; dx on 256 random tokens; dW on 512 random vocabulary rows (incl. targets)",
            flops="nominal: forward 2NHV, backward 4NHV, training step 6NHV (recompute not counted)",
            floor="three bare GEMMs x@W^T [N,V], dz@W [N,H], dz^T@x [V,H] in the input dtype into "
            "preallocated outputs, same run; fwd ratio vs the first, bwd vs the other two",
        ),
    )
    result = dict(meta=meta, cases=[], rows=[], skipped=skipped, provider_order=[p.name for p in providers])

    print(
        f"fusedrl bench on {meta['device'].get('name')} ({device.type}), torch {torch.__version__}; "
        f"N={args.n} H={args.h} V={args.v} {args.dtype}; regimes {regimes}; out {out_dir}",
        flush=True,
    )
    for s in skipped:
        print(f"  skipped {s['provider']}: {s['reason']}", flush=True)

    n_items = len(args.n) * len(args.v) * (len(regimes) * (len(runnable) + 1) + 1)
    prog = Progress(n_items)
    t_start = time.perf_counter()
    order = sorted(runnable, key=run_priority)
    try:
        for v in args.v:
            for n in args.n:
                group = []  # the regimes of one shape, measured side by side (provider-outer)
                floor_samples: dict[str, list[float]] = {}
                floor: dict[str, dict] = {}  # shared by the regimes: GEMM time does not depend on the data
                for regime in regimes:
                    spec = CaseSpec(
                        n=n,
                        h=args.h,
                        v=v,
                        dtype=args.dtype,
                        regime=regime,
                        device=args.device,
                        seed=args.seed,
                        seq_len=args.seq_len,
                    )
                    tag = f"{regime} N={n} V={v}"
                    prog.step(f"{tag}: inputs, fp64 reference, GEMM floor")
                    t0 = time.perf_counter()
                    if regime == "peaked":
                        spec.alpha = calibrate_alpha(spec)
                    case = build_case(spec)
                    ref = Ref(case, args)
                    if "loss" in args.tasks:
                        spec.old_logp = make_old_logp(ref.r.logp, args.seed)  # case.spec is spec
                        case.old_logp = _old_bt(case, spec)
                    if not floor_samples:
                        _pool_floor(floor_samples, floor, gemm_floor(case, args))
                    cinfo = dict(
                        regime=regime,
                        n=n,
                        h=args.h,
                        v=v,
                        dtype=args.dtype,
                        alpha=spec.alpha,
                        mean_entropy=ref.mean_entropy,
                        ref_seconds=round(ref.seconds, 2),
                        input_bytes=case.input_bytes(),
                        grad_bytes=case.grad_bytes(),
                        floor=floor,
                        setup_seconds=round(time.perf_counter() - t0, 2),
                    )
                    result["cases"].append(cinfo)
                    prog.write(
                        f"[{tag}] mean entropy {ref.mean_entropy:.3f} nats (fp64, all tokens)"
                        + (f", alpha={spec.alpha:.3f}" if regime == "peaked" else "")
                        + f"; GEMM floor {sum(t['median'] for t in floor.values()):.1f} ms"
                    )
                    prog.done()
                    if args.paired_floor:
                        if not group:
                            floor_fns = _floor_fns(case)
                        case.floor_fns = floor_fns
                    group.append((regime, case, ref, cinfo))
                    _free(device)
                for p in order:
                    for regime, case, ref, cinfo in group:
                        tag = f"{regime} N={n} V={v}"
                        prog.step(f"{tag}: {p.name}")
                        common = dict(regime=regime, n=n, h=args.h, v=v, dtype=args.dtype)
                        spent = time.perf_counter() - t_start
                        if args.budget_seconds is not None and spent > args.budget_seconds:
                            rows = [
                                dict(
                                    provider=p.name,
                                    family=p.family,
                                    task=p.task,
                                    note=p.note,
                                    mode="train",
                                    status="skipped",
                                    reason=f"time budget of {args.budget_seconds:.0f} s spent (--budget-seconds)",
                                )
                            ]
                        else:
                            try:
                                rows = bench_provider(p, case, ref, args)
                            except Exception as e:  # OOM or a broken peer: record, go on
                                oom = "out of memory" in str(e).lower() or isinstance(
                                    e, getattr(torch, "OutOfMemoryError", ())
                                )
                                rows = [
                                    dict(
                                        provider=p.name,
                                        family=p.family,
                                        task=p.task,
                                        note=p.note,
                                        mode="train",
                                        status="oom" if oom else "error",
                                        reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                                    )
                                ]
                                case.zero_grads()
                                _free(device)
                        for r in rows:
                            r.update(common)
                            result["rows"].append(r)
                            prog.write(report.one_line(r, cinfo))
                        report.derive(result)
                        report.write_json(result, out_dir)
                        report.write_markdown(result, out_dir, quiet=True)
                        prog.done()
                # second floor measurement at the end of the shape group, pooled with the first: on a busy
                # machine this keeps the floor from being one lucky or unlucky moment
                if group:
                    prog.step(f"N={n} V={v}: GEMM floor again")
                    _pool_floor(floor_samples, floor, gemm_floor(group[0][1], args))
                    prog.done()
                    report.derive(result)
                    report.write_json(result, out_dir)
                del group
                floor_fns = None
                _free(device)
    finally:
        prog.close()
    result["meta"]["loadavg_end"] = loadavg()
    report.derive(result)
    report.write_json(result, out_dir)
    md = report.write_markdown(result, out_dir)
    print(md)
    plotted = False
    if not args.no_plot:
        msg = report.plot(result, out_dir)
        print(msg)
        plotted = not msg.startswith("plot skipped")
    print(f"wrote {out_dir}/results.md, results.json" + (", plot.png" if plotted else ""))
    return result


def _pool_floor(samples: dict[str, list[float]], floor: dict[str, dict], new: dict[str, M.Timing]) -> None:
    for k, t in new.items():
        samples.setdefault(k, []).extend(t.samples)
        floor[k] = M.summarize(samples[k]).as_dict()


RUN_ORDER = ("fusedrl-", "eager", "liger", "verl", "cce", "fusedrl-grpo", "eager-grpo", "liger-grpo", "compile")


def run_priority(p: Provider) -> tuple:
    """Run order under a time budget: fusedrl and eager first, peers next, loss rows, torch.compile last
    (its compile time is the most expensive thing in the suite). Tables keep the registry order."""
    if p.name.startswith("compile"):
        return (9, p.name)
    if p.name == "fusedrl-torch":  # the portable fallback: after the GPU backends and eager
        return (1.5, p.name)
    if p.task == "loss":
        return (5 + ("fusedrl" not in p.name) + (p.name.startswith("liger")) + 0.5 * p.name.endswith("-torch"), p.name)
    for i, pre in enumerate(RUN_ORDER[:5]):
        if p.name.startswith(pre):
            return (i, p.name)
    return (8, p.name)


def _old_bt(case: Case, spec: CaseSpec) -> torch.Tensor:
    from .cases import _pad_bt

    return _pad_bt(torch.tensor(spec.old_logp, dtype=torch.float32, device=case.x.device), case.B, case.T)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.argv = argv
    if args.plot_only:
        with open(args.plot_only) as f:
            result = json.load(f)
        out_dir = os.path.dirname(os.path.abspath(args.plot_only))
        report.derive(result)
        report.write_markdown(result, out_dir)
        print(report.plot(result, out_dir))
        print(f"re-rendered {out_dir}/results.md and plot.png from {args.plot_only}")
        return
    run(args)
