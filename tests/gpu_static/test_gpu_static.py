"""AOT gate: every GPU kernel of the package compiled for sm_90 and sm_80 on a CPU-only machine.

Triton: each kernel launch the launchers really make is recorded (the launchers run on ``meta`` tensors with
the kernels swapped for recorders and the device facts of an H100 / A100 patched in), at the headline shape
(N=8192, H=4096, V=151936: the divisibility hints the JIT gives such a launch) and at an odd one (N=37, H=123,
V=1003: no hints; bf16 only), in bf16, fp16 and fp32, with the pinned block configs and every autotune config.
Per-token temperature (HAS_TEMP_VEC) adds the variant of each kernel the launchers make with a temperature
tensor, at the aligned shape, pinned configs, bf16 (plus the one-pass epilogue without a 16-bit du copy, as
fp32 inputs run it): the per-row 1/T is one [BLOCK_N] load that changes no tile, shared memory or dot
lowering, and 16-bit spills are what the gate asserts. The entropy change (HAS_ENTROPY_CHANGE) adds the fwd
kernel with vocab splits (autotune configs too, bf16) and with one, the merge kernel, the logits variant and
the one-pass epilogue asked for dH, in every dtype. Each distinct launch becomes a case: the kernel's
signature is built the way ``triton.runtime.jit`` specialises arguments (ints equal to 1 become constants,
ints divisible by 16 and 16-byte-aligned pointers get a divisibility hint, nothing else about a value is used:
shapes stay symbolic) and compiled with triton's own AOT entry points (``triton.compiler.ASTSource`` +
``triton.compile(src, target=GPUTarget("cuda", 90 | 80, 32))``, as ``triton/tools/compile.py`` does): no GPU,
no driver. Asserted per case:

* it compiles;
* shared memory within the arch limit (sm_90: 232,448 B; sm_80: 166,912 B);
* no register spills (ptxas ``-v`` of the triton wheel) for 16-bit inputs (pinned and autotune configs)
  at the aligned shape (the odd, unaligned one compiles to scalar loads and some variants spill: those
  are printed, not asserted);
* ``tl.dot`` lowered to ``wgmma`` on sm_90 and ``mma`` on sm_80 (fp32 inputs included: tf32x3);
* async copies (``cp.async``) in the GEMM-bearing kernels at the aligned shape, the gradient-filtered
  GEMM included.

The one-pass epilogue also in its lean form (``store_du32=False``: the 16-bit du alone) over the run's padded
buffers, for 16-bit inputs: 128-bit loads (``ld.global.v4``) at both shapes.

CUDA: ``csrc/*.cu`` compiled by nvcc with ``-Xptxas -v`` for sm_80 and sm_90a; no spills. The one-pass
epilogue's sm_90a SASS (``cuobjdump -sass``: the toolkit's, or the triton wheel's): 128-bit loads of the
workspace in bursts of at least 4 per pass, 128-bit du stores, 64-bit stores of the 16-bit copy.

The compiles run in 2 worker processes (this file run as a script), each with a fresh, empty
TRITON_CACHE_DIR and TRITON_ALWAYS_COMPILE=1: nothing is cached between runs. ``-s`` prints the case
count and a table of the cases. Skips cleanly without triton / its CUDA backend / nvcc.
"""

# ruff: noqa: B023 -- the scenario lambdas are called while the generator is suspended at their yield
from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMEM_LIMIT = {90: 232448, 80: 166912}
ARCHS = (90, 80)
N_WORKERS = 2
# a hang guard, not a deadline: ~110 s quiet on 2 cores (2 workers), ~25x that before a worker counts as hung
# (a loaded 2-core machine once needed more than 900 s); pytest --aot-timeout=S overrides it
WORKER_TIMEOUT_S = 2700
# kernels with tl.dot (the IS_LOGITS variants of fwd / du load logits instead: no dot)
DOT_KERNELS = {"fwd_kernel", "du_kernel", "gemm_kernel", "bwd_atomic_kernel"}
# GEMM-bearing kernels whose K loop must be software-pipelined (async copies) at the aligned shape
ASYNC_KERNELS = {"fwd_kernel", "du_kernel", "gemm_kernel"}
SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGS_RE = re.compile(r"Used (\d+) registers")

# =================================================================================================
# Worker side (runs without TRITON_INTERPRET: the kernels are JITFunctions)
# =================================================================================================

_DTYPE_NAMES = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "int64": "i64",
    "int32": "i32",
    "int8": "i8",
    "uint8": "u8",
    "bool": "i1",
}


def _kernel_modules():
    from fusedrl.backends.triton import head, kernels, onepass

    return {"kernels": kernels, "onepass": onepass, "head": head}


def _all_kernels():
    """{(module, name)} of every JIT kernel (name ending in _kernel) the Triton modules define."""
    from triton.runtime.jit import JITFunction

    out = set()
    for mname, mod in _kernel_modules().items():
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                out.add((mname, name))
    return out


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, module, name, fn, log):
        self.module, self.name, self.fn, self.log = module, name, fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.module, self.name, self.fn, args, kwargs))

        return launch


def _spec(fn, args, kwargs):
    """(signature, constexprs, divisibility-hinted arg indices) the way the JIT specialises a launch."""
    import torch

    names = fn.arg_names
    params = getattr(fn, "params", None)
    meta = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    sig, consts, hints = {}, {}, []
    for i, name in enumerate(names):
        if name in meta:
            sig[name], consts[name] = "constexpr", meta[name]
            continue
        if params is not None and getattr(params[i], "is_constexpr", False):
            raise AssertionError(f"{fn.__name__}: constexpr {name} not given")
        a = args[i]
        no_spec = params is not None and getattr(params[i], "do_not_specialize", False)
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + _DTYPE_NAMES[str(a.dtype).replace("torch.", "")]
            if (a.storage_offset() * a.element_size()) % 16 == 0:  # allocations are 16-byte aligned
                hints.append(i)
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            if a == 1 and not no_spec:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32" if -(2**31) <= a < 2**31 else "i64"
                if a % 16 == 0 and not no_spec:
                    hints.append(i)
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            raise AssertionError(f"{fn.__name__}: argument {name} of type {type(a).__name__}")
    return sig, consts, hints


def _scenarios(tb, th, dtype):  # tb: fusedrl.backends.triton, th: its head module
    """Call every launcher on meta tensors: the launches they make are recorded. Yields (shape tag,
    call) or (shape tag, call, False) for scenarios whose launches get no autotune expansion."""
    import torch

    from fusedrl.backends.base import EpilogueHead, OnePassHead

    meta = torch.device("meta")
    f32 = torch.float32
    E = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device=meta)  # noqa: E731
    shapes = [(8192, 4096, 151936, "aligned")]
    if dtype == torch.bfloat16:  # the unhinted code paths once (fp16 / fp32 differ only in the dtype)
        shapes.append((37, 123, 1003, "odd"))
    for n, h, v, tag in shapes:
        x, w, b, t = E(n, h), E(v, h), E(v), E(n, dt=torch.int64)
        lse, ent, g = E(n, dt=f32), E(n, dt=f32), E(n, dt=f32)
        yield tag, lambda: tb.forward(x, w, t, b, 0.7, 30.0, True)
        yield tag, lambda: tb.forward(x, w, t, None, 1.0, None, False, vocab_splits=1)
        for opts in (
            dict(),
            dict(grad_filter_eps=1e-3),
            dict(workspace_mb=1, memory_budget_mb=64),
            dict(workspace_mb=1, memory_budget_mb=64, grad_filter_eps=1e-3),
            dict(memory_budget_mb=0),
            dict(memory_budget_mb=0, grad_filter_eps=1e-3),
        ):
            yield tag, lambda o=opts: tb.backward(x, w, t, b, 0.7, 30.0, lse, ent, g, g, **o)
        yield tag, lambda: tb.backward(x, w, t, None, 1.0, None, lse, None, g, None)
        yield tag, lambda: tb.backward(x, w, t, b, 0.7, 30.0, lse, ent, g, g, deterministic=False)
        yield tag, lambda: tb.backward(x, w, t, b, 1.0, None, lse, ent, g, g, deterministic=False, grad_filter_eps=1e-3)
        lg = E(n, v)
        yield tag, lambda: tb.logits_forward(lg, t, 0.7, 30.0, True)
        yield tag, lambda: tb.logits_backward(lg, t, 0.7, 30.0, lse, ent, g, g, inplace=True)
        # the one-pass epilogue: fp32 workspace, 16-bit copy of du for 16-bit inputs
        u = E(n, v, dt=f32)
        du16 = None if dtype == f32 else E(n, v)
        for bias, cap, ent_c, kl in ((b, 30.0, 0.01, 0.1), (None, None, 0.0, 0.0)):
            head = OnePassHead(
                mode=0,
                clip_lo=0.8,
                clip_hi=1.28,
                clip_c=3.0,
                dual=True,
                ent_coef=ent_c,
                kl_coef=kl,
                kl_type=3,
                kl_st=False,
                old=g,
                adv=g,
                weight=g,
                ref=g if kl else None,
                need_ent=bool(ent_c),
            )
            yield tag, lambda bb=bias, cc=cap, hh=head: tb.onepass_epilogue(u, t, bb, 0.7, cc, hh, du16=du16)
            if du16 is not None:
                # the lean epilogue (du16 alone: 16-bit inputs without a bias gradient) over the run's buffers:
                # workspace rows padded to 16 elements, du16 ring rows to 8 (fusedrl.onepass.run)
                up = E(n, -(-v // 16) * 16, dt=f32)[:, :v]
                dp = E(n, -(-v // 8) * 8)[:, :v]
                yield (
                    tag,
                    lambda bb=bias, cc=cap, hh=head, up=up, dp=dp: tb.onepass_epilogue(
                        up, t, bb, 0.7, cc, hh, du16=dp, store_du32=False
                    ),
                    False,
                )
        # the entropy change (HAS_ENTROPY_CHANGE: two more [BLOCK_N] sums over each tile): the fwd kernel with
        # vocab splits (and so the merge kernel) and with one split (its own finish), over given logits, and
        # the one-pass epilogue asked for dH; autotune configs for bf16 at the aligned shape (fp16 / fp32:
        # pinned, the same tiles in another dtype)
        tune = () if (tag == "aligned" and dtype == torch.bfloat16) else (False,)
        yield (tag, lambda: tb.forward(x, w, t, b, 0.7, 30.0, True, return_entropy_change=True)) + tune
        yield (
            tag,
            lambda: tb.forward(x, w, t, None, 1.0, None, False, vocab_splits=1, return_entropy_change=True),
            False,
        )
        yield tag, lambda: tb.logits_forward(lg, t, 0.7, 30.0, False, return_entropy_change=True), False
        dh_head = EpilogueHead(head, None, False, True)  # the loop's last head: no entropy bonus, no KL
        yield tag, lambda: tb.onepass_epilogue(u, t, b, 0.7, 30.0, dh_head, du16=du16), False
        if tag == "aligned" and dtype != torch.float16:
            # per-token temperature (fp32 [N]): the HAS_TEMP_VEC variants, pinned configs only
            tv = E(n, dt=f32)
            if dtype == torch.bfloat16:
                yield tag, lambda: tb.forward(x, w, t, b, tv, 30.0, True), False
                yield tag, lambda: tb.backward(x, w, t, b, tv, 30.0, lse, ent, g, g), False
                yield tag, lambda: tb.backward(x, w, t, b, tv, 30.0, lse, ent, g, g, deterministic=False), False
                yield tag, lambda: tb.logits_forward(lg, t, tv, 30.0, True), False
                yield tag, lambda: tb.logits_backward(lg, t, tv, 30.0, lse, ent, g, g, inplace=True), False
            head = OnePassHead(
                mode=0,
                clip_lo=0.8,
                clip_hi=1.28,
                clip_c=3.0,
                dual=True,
                ent_coef=0.01,
                kl_coef=0.1,
                kl_type=3,
                kl_st=False,
                old=g,
                adv=g,
                weight=g,
                ref=g,
                need_ent=True,
            )
            yield tag, lambda: tb.onepass_epilogue(u, t, b, tv, 30.0, head, du16=du16), False
    # the standalone vanilla head (per-token, shape-free)
    lp = torch.empty(8192, dtype=dtype, device=meta)
    mask = torch.empty(8192, dtype=torch.bool, device=meta)
    for m in (mask, None):
        for c in (3.0, None):
            yield "aligned", lambda m=m, c=c: th._launch(lp, lp, lp, m, 0.2, 0.28, c)


def _expand_tune(cfg_mod, case, family, is_fp32):
    """The autotune variants of a recorded pinned launch (the launchers' AUTOTUNE path)."""
    name, kw = case["kernel"], case["kwargs"]
    out = []
    tune = cfg_mod.TUNE_CONFIGS
    if name == "fwd_kernel":
        for bn, bv, bh, nw, ns in tune["fwd"][(family, is_fp32)]:
            out.append(dict(kw, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, IS_EVEN_H=False, num_warps=nw, num_stages=ns))
    elif name == "du_kernel" and not kw["IS_LOGITS"]:
        for bh, nw, ns in tune["du"][(family, is_fp32)]:
            out.append(dict(kw, BLOCK_H=bh, IS_EVEN_H=False, num_warps=nw, num_stages=ns))
    elif name == "gemm_kernel":
        for bd, nw, ns in tune["gemm"][(family, is_fp32)]:
            out.append(dict(kw, BLOCK_D=bd, num_warps=nw, num_stages=ns))
    return out


# constexprs that pick a kernel's code path for the autotune expansion (the rest are the recorded
# launch's, first one wins): filtered or not, and the GEMM's operand orientation (dx vs dW)
_TUNE_KEY_CONSTS = ("HAS_FLAGS", "HAS_FILTER", "stride_am", "stride_ak")


def _case_key(case):
    """Distinct compiles: one per code path (constexprs, warps, stages) and shape class; the hints
    of other values at the same shape class do not change what is checked. Autotune configs: one
    per tune config and _TUNE_KEY_CONSTS path."""
    if case["config"] == "tune":
        consts = {k: v for k, v in case["consts"].items() if k in _TUNE_KEY_CONSTS or k.startswith("BLOCK_")}
    else:
        consts = case["consts"]
    sig = {k: v for k, v in case["sig"].items() if v.startswith("*")}  # pointer dtypes
    return json.dumps(
        dict(
            arch=case["arch"],
            kernel=case["kernel"],
            module=case["module"],
            consts=consts,
            sig=sig,
            nw=case["num_warps"],
            ns=case["num_stages"],
            shape=case["shape"],
            cfg=case["config"],
        ),
        sort_keys=True,
    )


def collect_cases():
    """Every distinct (arch, kernel, signature, constexprs, hints, warps, stages) the launchers make."""
    import torch

    from fusedrl.backends import triton as tb
    from fusedrl.backends.triton import config as cfg_mod

    mods = _kernel_modules()
    th = mods["head"]
    kernels = sorted(_all_kernels())
    cases = {}
    for arch in ARCHS:
        family = "hopper" if arch >= 90 else "ampere"
        log = []
        saved = {}
        for mname, kname in kernels:
            mod = mods[mname]
            saved[(mname, kname)] = getattr(mod, kname)
            setattr(mod, kname, _Recorder(mname, kname, getattr(mod, kname), log))
        saved_attrs = {a: getattr(cfg_mod, a) for a in ("family", "num_sms", "device_facts")}
        cfg_mod.family = lambda device, _f=family: _f
        cfg_mod.num_sms = lambda device, _a=arch: 132 if _a >= 90 else 108
        # an 80 GB GPU with 75 GB free
        cfg_mod.device_facts = lambda device, _a=arch: (132 if _a >= 90 else 108, 75 * 2**30, 80 * 2**30)
        try:
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                dname = _DTYPE_NAMES[str(dtype).replace("torch.", "")]
                for tag, call, *no_tune in _scenarios(tb, th, dtype):
                    start = len(log)
                    call()
                    for mname, kname, fn, args, kwargs in log[start:]:
                        rec = dict(module=mname, kernel=kname, args=args, kwargs=kwargs, fn=fn)
                        variants = [("pinned", kwargs)]
                        if kname in ("fwd_kernel", "du_kernel", "gemm_kernel") and tag == "aligned" and not no_tune:
                            more = _expand_tune(cfg_mod, rec, family, dtype == torch.float32)
                            variants += [("tune", kw) for kw in more]
                        for cfg_tag, kw in variants:
                            sig, consts, hints = _spec(fn, args, kw)
                            case = dict(
                                arch=arch,
                                module=mname,
                                kernel=kname,
                                sig=sig,
                                consts=consts,
                                hints=hints,
                                num_warps=kw.get("num_warps", 4),
                                num_stages=kw.get("num_stages", 3),
                                dtype=dname,
                                shape=tag,
                                config=cfg_tag,
                            )
                            key = _case_key(case)
                            if key not in cases:
                                case["key"] = key
                                cases[key] = case
        finally:
            for (mname, kname), fn in saved.items():
                setattr(mods[mname], kname, fn)
            for a, f in saved_attrs.items():
                setattr(cfg_mod, a, f)
    return [cases[k] for k in sorted(cases)], [f"{m}.{k}" for m, k in kernels]


def _ptxas_path(arch=90):
    """The ptxas triton itself uses for `arch` (the wheel carries more than one), else the wheel's bin/ptxas."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            return get_ptxas(arch).path
        except TypeError:  # older signature: get_ptxas()
            return get_ptxas().path
    except Exception:  # noqa: BLE001 - fall back to the file in the wheel
        import triton.backends.nvidia as nv

        return os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")


def compile_case(case):
    """Compile one case; returns its result dict (error text instead of a crash)."""
    import triton
    from triton.backends.compiler import GPUTarget

    mod = _kernel_modules()[case["module"]]
    fn = getattr(mod, case["kernel"])
    target = GPUTarget("cuda", case["arch"], 32)
    backend = triton.compiler.make_backend(target)
    attrs = {
        (i,): backend.parse_attr("D") if hasattr(backend, "parse_attr") else [["tt.divisibility", 16]]
        for i in case["hints"]
    }
    src = triton.compiler.ASTSource(fn=fn, signature=dict(case["sig"]), constexprs=dict(case["consts"]), attrs=attrs)
    options = backend.parse_options(dict(num_warps=case["num_warps"], num_stages=case["num_stages"]))
    out = dict(key=case["key"])
    t0 = time.time()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):  # TRITON_DUMP_PTXAS_LOG: ptxas -v output of the real compile
            cc = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - reported per case
        out["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
        return out
    ptx = cc.asm["ptx"]
    log = buf.getvalue()
    if not SPILL_RE.search(log):  # older triton: run the wheel's ptxas -v on the PTX ourselves
        arch = "sm_90a" if case["arch"] >= 90 else f"sm_{case['arch']}"
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "k.ptx")
            with open(p, "w") as f:
                f.write(ptx)
            r = subprocess.run(
                [_ptxas_path(case["arch"]), "-v", f"--gpu-name={arch}", p, "-o", p + ".o"],
                capture_output=True,
                text=True,
            )
            log = r.stdout + r.stderr
    spills = [(int(a), int(b)) for a, b in SPILL_RE.findall(log)]
    out.update(
        seconds=round(time.time() - t0, 2),
        shared=int(cc.metadata.shared),
        spill_stores=max([a for a, _ in spills], default=-1),
        spill_loads=max([b for _, b in spills], default=-1),
        regs=max([int(r) for r in REGS_RE.findall(log)], default=-1),
        wgmma=ptx.count("wgmma.mma_async"),
        mma=len(re.findall(r"\bmma\.sync", ptx)),
        cp_async=ptx.count("cp.async"),
        ld_v4=len(re.findall(r"ld\.global[^;]*\.v4\.b32", ptx)),
    )
    return out


def worker_main(shard, nshards, out_path):
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, ROOT)
    cases, kernels = collect_cases()
    mine = cases[shard::nshards]
    results = [compile_case(c) for c in mine]
    with open(out_path, "w") as f:
        json.dump(dict(total=len(cases), kernels=kernels, results=results, cases=mine), f)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    worker_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    sys.exit(0)

# =================================================================================================
# Test side
# =================================================================================================

import pytest  # noqa: E402


def _triton_cuda_reason():
    try:
        import triton  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"triton with its CUDA backend is not importable: {type(e).__name__}: {e}"
    if not os.path.exists(_ptxas_path()):  # noqa: SIM102
        return "the triton wheel has no ptxas"
    return ""


pytestmark = pytest.mark.aot  # its own lane: tests/run.sh runs it after the fast lane


def _kill(procs):
    for _, p in procs:
        if p.poll() is None:
            p.kill()
    for _, p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
            pass


@pytest.fixture(scope="module")
def gate(request):
    why = _triton_cuda_reason()
    if why:
        pytest.skip(why)
    tmp = tempfile.mkdtemp(prefix="fusedrl-aot-")
    try:
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env.update(
            TRITON_CACHE_DIR=os.path.join(tmp, "cache"),
            TRITON_ALWAYS_COMPILE="1",
            TRITON_DUMP_PTXAS_LOG="1",
            TRITON_DEFAULT_FP_FUSION=env.get("TRITON_DEFAULT_FP_FUSION", "1"),
            PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        )
        t0 = time.time()
        procs = []
        for i in range(N_WORKERS):
            out = os.path.join(tmp, f"shard{i}.json")
            procs.append(
                (
                    out,
                    subprocess.Popen(
                        [sys.executable, os.path.abspath(__file__), "--worker", str(i), str(N_WORKERS), out],
                        env=env,
                        cwd=ROOT,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                    ),
                )
            )
        timeout = request.config.getoption("--aot-timeout") or WORKER_TIMEOUT_S
        shards = []
        try:
            for out, p in procs:
                left = max(1.0, timeout - (time.time() - t0))
                try:
                    text, _ = p.communicate(timeout=left)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"AOT worker hung: no result after {timeout:.0f} s (hang guard; --aot-timeout)")
                ok = p.returncode == 0 and os.path.exists(out)
                assert ok, f"AOT worker failed (rc {p.returncode}):\n{text[-4000:]}"
                with open(out) as f:
                    shards.append(json.load(f))
        finally:
            _kill(procs)  # every worker, on any exit (a timeout or a failed shard leaves none behind)
        wall = time.time() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cases = {c["key"]: c for s in shards for c in s["cases"]}
    results = [dict(cases[r["key"]], **r) for s in shards for r in s["results"]]
    assert len(results) == shards[0]["total"], "the shards did not cover every case"
    dump = request.config.getoption("--aot-dump")
    if dump:  # the per-case table as JSON (for notes / config pruning)
        with open(dump, "w") as f:
            json.dump(results, f, indent=0)
    return dict(results=results, kernels=shards[0]["kernels"], wall=wall)


def _name(r):
    kw = {k: v for k, v in r["consts"].items() if k.startswith("BLOCK_") or v is True}
    return (
        f"sm_{r['arch']} {r['kernel']} {r['dtype']} {r['shape']} {r['config']} w{r['num_warps']} "
        f"s{r['num_stages']} {kw}"
    )


def _ok(gate):
    return [r for r in gate["results"] if "error" not in r]


def test_aot_summary(gate):
    """Case count and per-kernel table (run with -s to see it)."""
    rs = gate["results"]
    by = collections.Counter((r["arch"], r["kernel"]) for r in rs)
    print(
        f"\nAOT gate: {len(rs)} Triton compile cases ({len(_ok(gate))} compiled) in {gate['wall']:.0f} s "
        f"on {N_WORKERS} workers"
    )
    for (arch, k), cnt in sorted(by.items()):
        sel = [r for r in _ok(gate) if r["arch"] == arch and r["kernel"] == k]
        print(
            f"  sm_{arch} {k:22s} {cnt:3d} cases, max smem {max([r['shared'] for r in sel], default=0):6d} B, "
            f"max regs {max([r['regs'] for r in sel], default=0):3d}, "
            f"spilling {sum(r['spill_stores'] > 0 or r['spill_loads'] > 0 for r in sel)}"
        )
    assert len(rs) > 0


def test_every_kernel_is_gated(gate):
    """Every JIT kernel of the Triton modules is launched by some recorded scenario."""
    seen = {f"{r['module']}.{r['kernel']}" for r in gate["results"]}
    missing = sorted(set(gate["kernels"]) - seen)
    assert not missing, f"kernels never launched by the gate's scenarios: {missing}"


def test_compiles(gate):
    errors = [f"{_name(r)}: {r['error'][:400]}" for r in gate["results"] if "error" in r]
    assert not errors, f"{len(errors)} cases fail to compile:\n" + "\n".join(errors[:20])


def test_shared_memory_within_arch_limit(gate):
    over = [
        f"{_name(r)}: {r['shared']} B > {SMEM_LIMIT[r['arch']]} B"
        for r in _ok(gate)
        if r["shared"] > SMEM_LIMIT[r["arch"]]
    ]
    assert not over, "\n".join(over)


def test_no_register_spills_16bit(gate):
    """No spills for bf16 / fp16 inputs at the aligned shape, pinned and autotune configs (ptxas -v of
    the triton wheel). The odd shape (H = 123, V = 1003: no 16-byte alignment, scalar loads) is
    reported, not asserted: production shapes specialise to the aligned variants."""
    rs = [r for r in _ok(gate) if r["dtype"] in ("bf16", "fp16")]
    assert all(r["spill_stores"] >= 0 for r in rs), "ptxas -v output had no spill line"
    odd = [r for r in rs if r["shape"] == "odd" and (r["spill_stores"] or r["spill_loads"])]
    print(f"\nodd-shape (unaligned) 16-bit cases that spill: {len(odd)} of {sum(r['shape'] == 'odd' for r in rs)}")
    for r in odd:
        print(f"  {_name(r)}: {r['spill_stores']} B stores / {r['spill_loads']} B loads")
    rs = [r for r in rs if r["shape"] == "aligned"]
    bad = [
        f"{_name(r)}: {r['spill_stores']} B stores / {r['spill_loads']} B loads, {r['regs']} regs"
        for r in rs
        if r["spill_stores"] > 0 or r["spill_loads"] > 0
    ]
    assert not bad, "\n".join(bad)


def test_dot_lowered_to_tensor_cores(gate):
    bad = []
    for r in _ok(gate):
        if r["kernel"] not in DOT_KERNELS or r["consts"].get("IS_LOGITS"):
            continue
        want = "wgmma" if r["arch"] >= 90 else "mma"
        if r[want] == 0:
            bad.append(f"{_name(r)}: no {want} (wgmma {r['wgmma']}, mma {r['mma']})")
    assert not bad, "\n".join(bad)


def test_async_copies_in_gemm_kernels(gate):
    """Software-pipelined K loops (cp.async) at the aligned shape, gradient-filtered GEMMs included."""
    rs = [
        r
        for r in _ok(gate)
        if r["kernel"] in ASYNC_KERNELS and r["shape"] == "aligned" and not r["consts"].get("IS_LOGITS")
    ]
    assert any(r["kernel"] == "gemm_kernel" and r["consts"].get("HAS_FLAGS") for r in rs)
    bad = [f"{_name(r)}: {r['cp_async']} cp.async" for r in rs if r["cp_async"] == 0]
    assert not bad, "\n".join(bad)


def test_onepass_epilogue_vector_loads(gate):
    """The lean one-pass epilogue over the run's padded workspace (rows of V rounded up to 16: the loads
    may read that far) reads U with 128-bit loads at the aligned and at the odd shape (V = 1003)."""
    rs = [r for r in _ok(gate) if r["kernel"] == "_onepass_kernel" and r["consts"].get("HAS_DU32") is False]
    assert {r["shape"] for r in rs} == {"aligned", "odd"}
    bad = [f"{_name(r)}: no ld.global.v4" for r in rs if r["ld_v4"] == 0]
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------------------
# csrc/ with nvcc
# ------------------------------------------------------------------------------------------------


def _nvcc():
    return shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")


@pytest.fixture(scope="module")
def nvcc_builds():
    """Every csrc/*.cu compiled by nvcc for sm_80 and sm_90a with ``-Xptxas -v``: ``[((src, arch), rc, log,
    object path)]``, the objects kept for the SASS checks until the module's tests are done."""
    nvcc = _nvcc()
    if not nvcc:
        pytest.skip("nvcc not found")
    srcs = sorted(os.path.join(ROOT, "csrc", f) for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith(".cu"))
    if not srcs:
        pytest.skip("no csrc/*.cu")
    jobs = [(s, a) for s in srcs for a in ("sm_80", "sm_90a")]
    with tempfile.TemporaryDirectory() as d:

        def build(job):
            src, arch = job
            obj = os.path.join(d, f"{os.path.basename(src)}.{arch}.o")
            cmd = [
                nvcc,
                "-O3",
                "-std=c++17",
                f"-arch={arch}",
                "-Xptxas",
                "-v",
                "-c",
                src,
                "-I",
                os.path.join(ROOT, "csrc"),
                "-o",
                obj,
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            return job, r.returncode, r.stdout + r.stderr, obj

        with ThreadPoolExecutor(N_WORKERS) as ex:
            yield list(ex.map(build, jobs))


def test_csrc_nvcc_no_spills(nvcc_builds):
    outs = [o[:3] for o in nvcc_builds]
    jobs = [o[0] for o in outs]
    errors, spills, n_funcs = [], [], 0
    for (src, arch), rc, log in outs:
        name = f"{os.path.relpath(src, ROOT)} {arch}"
        if rc != 0:
            errors.append(f"{name}: nvcc failed:\n{log[-2000:]}")
            continue
        found = SPILL_RE.findall(log)
        n_funcs += len(found)
        if not found:
            errors.append(f"{name}: no ptxas -v spill lines")
        spills += [f"{name}: {a} B spill stores, {b} B spill loads" for a, b in found if int(a) or int(b)]
    print(f"\nnvcc gate: {len(jobs)} compiles, {n_funcs} kernel entries checked")
    assert not errors, "\n".join(errors)
    assert not spills, "\n".join(spills)


def _cuobjdump():
    """cuobjdump: on PATH, beside nvcc, in /usr/local/cuda, or the one the triton wheel carries."""
    cands = [shutil.which("cuobjdump")]
    nvcc = _nvcc()
    if nvcc:
        cands.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump"))
    cands.append("/usr/local/cuda/bin/cuobjdump")
    try:
        import triton.backends.nvidia as nv

        cands.append(os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump"))
    except Exception:  # noqa: BLE001 - no triton: the other places only
        pass
    return next((c for c in cands if c and os.path.exists(c)), None)


def _sass_functions(obj):
    """{mangled function name: [SASS instruction text]} of an object file's sm_90a code."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or the triton wheel)")
    r = subprocess.run([tool, "-sass", obj], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    funcs, cur = {}, None
    for line in r.stdout.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if m and cur is not None:
            cur.append(m.group(1))
    return funcs


def test_onepass_epilogue_sass_vector_loads(nvcc_builds):
    """The CUDA one-pass epilogue (csrc/onepass.cu) for sm_90a: every variant of its 16-byte path (the last
    template flag, VEC) reads U with 128-bit loads, at least 4 of them issued back to back (in flight
    before any is used) in each pass, and writes du over U with 128-bit stores (16-bit copy: 64-bit stores,
    4 values); the scalar variants exist too (rows not 16-byte aligned)."""
    obj = next((o for (src, arch), rc, _, o in nvcc_builds if src.endswith("onepass.cu") and arch == "sm_90a"), None)
    if obj is None:
        pytest.skip("no csrc/onepass.cu")
    assert next(rc for (src, arch), rc, *_ in nvcc_builds if src.endswith("onepass.cu") and arch == "sm_90a") == 0
    funcs = {k: v for k, v in _sass_functions(obj).items() if "onepass_kernel" in k}
    vec = {k: v for k, v in funcs.items() if k.endswith("Lb1EEEvNS_3row11OnePassArgsE")}
    scalar = {k: v for k, v in funcs.items() if k.endswith("Lb0EEEvNS_3row11OnePassArgsE")}
    assert len(vec) == 6 and len(scalar) == 6, sorted(funcs)  # {none, half, bf16} x {dH or not}
    bad = []
    for name, ins in vec.items():
        ld128 = sum(bool(re.search(r"\bLDG\.E\.128\b", x)) for x in ins)
        # bursts: >= 4 128-bit loads with no floating-point instruction between them (all issued before
        # any value is used: in flight together), one per pass at least
        bursts, run = 0, 0
        for x in ins:
            if re.search(r"\bLDG\.E\.128\b", x):
                run += 1
                bursts += run == 4
            elif re.match(r"(@!?U?P\w+\s+)?(FADD|FMUL|FFMA|MUFU|FSETP|FMNMX|FSEL|FCHK|F2F)\b", x):
                run = 0
        st128 = sum(bool(re.search(r"\bSTG\.E\.128\b", x)) for x in ins)
        st64 = sum(bool(re.search(r"\bSTG\.E\.64\b", x)) for x in ins)
        has16 = "I13__nv_bfloat16" in name or "I6__half" in name
        if bursts < 2 or st128 == 0 or (has16 and st64 == 0):
            bad.append(f"{name}: {ld128} LDG.E.128 in {bursts} bursts of >= 4, {st128} STG.E.128, {st64} STG.E.64")
    assert not bad, "\n".join(bad)
