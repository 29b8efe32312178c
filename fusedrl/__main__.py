"""``python -m fusedrl``: fused vs eager PyTorch on this machine, in under a minute.

Builds a realistic random case on the device that is present (CPU default N=1024, H=512, V=32000
fp32; CUDA default N=8192, H=4096, V=151936 bf16 = a Qwen-7B-sized head), runs the per-token
log-prob + entropy training step (forward, then backward with random upstream grads) with fusedrl
(``backend="auto"`` unless told) and with eager PyTorch (logits -> log_softmax -> gather, entropy),
and prints agreement with an fp64 oracle, median time and peak memory for each.

    python -m fusedrl                       # whatever device is present
    python -m fusedrl --device cpu --n 2048 --h 1024 --v 32000 --dtype fp32
    python -m fusedrl --backend torch --repeats 5

Exit status 0 when fusedrl agrees with the oracle (its error is within eager-in-the-input-dtype's
error plus a small tolerance, the CCE test idiom), 1 otherwise. The full comparison with peers and
the GEMM floor is ``python -m bench`` (repository checkout).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from . import _measure as M

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# extra tolerance on top of eager-in-the-input-dtype's error (tests/_helpers.py uses the same idea)
ATOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2}
GRAD_ATOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 5e-2}


def build(n: int, h: int, v: int, dtype: str, device: str, seed: int = 0, requires_grad: bool = True):
    """Random case: x, W ~ N(0, 1) / H**0.25 (logits ~ N(0, 1)), uniform targets, random upstream grads."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(v, h, generator=g, device=device) / h**0.25
    x = torch.randn(n, h, generator=g, device=device) / h**0.25
    t = torch.randint(0, v, (n,), generator=g, device=device)
    g_lp = torch.randn(n, generator=g, device=device)
    g_H = torch.randn(n, generator=g, device=device)
    dt = DTYPES[dtype]
    x = x.to(dt).requires_grad_(requires_grad)
    w = w.to(dt).requires_grad_(requires_grad)
    return x, w, t, g_lp, g_H


def _forward(impl: str, backend: str, x, w, t):
    if impl == "eager":
        return M.eager_logp_entropy(x, w, t)
    import fusedrl

    return fusedrl.linear_logprob_entropy(x, w, t, backend=backend)


def step_factory(impl: str, backend: str, n: int, h: int, v: int, dtype: str, seed: int = 0):
    """CPU peak-memory child: rebuild the case, return one training step."""
    x, w, t, g_lp, g_H = build(n, h, v, dtype, "cpu", seed)

    def run():
        x.grad = w.grad = None
        logp, ent = _forward(impl, backend, x, w, t)
        torch.autograd.backward([logp, ent], [g_lp, g_H])
        return x.grad, w.grad

    def reset():
        x.grad = w.grad = None

    run.reset = reset
    return run


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m fusedrl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--n", type=int, default=None, help="tokens")
    ap.add_argument("--h", type=int, default=None, help="hidden size")
    ap.add_argument("--v", type=int, default=None, help="vocabulary size")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    ap.add_argument("--backend", default="auto", help="fusedrl backend (auto | torch | triton | cuda)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(a.device).type == "cuda"
    defaults = (
        dict(n=8192, h=4096, v=151936, dtype="bf16", repeats=10, warmup=3)
        if cuda
        else dict(n=1024, h=512, v=32000, dtype="fp32", repeats=3, warmup=1)
    )
    for k, val in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, val)
    return a


def _fmt_e(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1e}"


def main(argv=None) -> int:
    a = parse(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    import fusedrl
    from fusedrl.backends import resolve

    backend = resolve(a.backend, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"fusedrl {fusedrl.__version__} on {name}: N={a.n} H={a.h} V={a.v} {a.dtype}; "
        f"backend {a.backend!r} -> {backend!r}; available here: {fusedrl.available_backends(dev)}"
    )
    x, w, t, g_lp, g_H = build(a.n, a.h, a.v, a.dtype, a.device, a.seed)
    ref = M.reference64(x.detach(), w.detach(), t)
    rg = M.reference64_grads(ref, x.detach(), w.detach(), t, g_lp, g_H)

    results = {}
    for impl in ("eager", "fusedrl"):
        label = "eager PyTorch" if impl == "eager" else f"fusedrl ({backend})"
        try:
            x.grad = w.grad = None
            logp, ent = _forward(impl, backend, x, w, t)
            torch.autograd.backward([logp, ent], [g_lp, g_H])
            err = dict(
                logp=M.max_abs_err(logp, ref.logp),
                entropy=M.max_abs_err(ent, ref.entropy),
                dx=M.max_abs_err(x.grad[ref.tok_idx], rg["dx"]),
                dw=M.max_abs_err(w.grad[ref.voc_idx], rg["dw"]),
            )
            del logp, ent
            x.grad = w.grad = None
            box = {}

            def fwd(_s):
                box["out"] = _forward(impl, backend, x, w, t)

            def bwd(_s):
                torch.autograd.backward(list(box.pop("out")), [g_lp, g_H])

            def setup():
                x.grad = w.grad = None

            tf, tb, tt = M.time_phases([fwd, bwd], dev, setup=setup, warmup=a.warmup, repeats=a.repeats)
            with torch.no_grad():
                ts = M.time_fn(lambda: _forward(impl, backend, x, w, t), dev, warmup=1, repeats=a.repeats)
            x.grad = w.grad = None
            mem = None
            if not a.no_memory:
                if dev.type == "cuda":

                    def one():
                        lp, en = _forward(impl, backend, x, w, t)
                        torch.autograd.backward([lp, en], [g_lp, g_H])

                    r = M.peak_memory(one, dev)
                else:
                    r = M.peak_memory(
                        None,
                        dev,
                        factory="fusedrl.__main__:step_factory",
                        kwargs=dict(impl=impl, backend=backend, n=a.n, h=a.h, v=a.v, dtype=a.dtype, seed=a.seed),
                    )
                x.grad = w.grad = None
                mem = r.get("peak_bytes") if r.get("ok") else None
                if not r.get("ok"):
                    print(f"  ({label}: memory not measured: {r.get('error')})")
            results[impl] = dict(label=label, err=err, fwd=tf, bwd=tb, total=tt, score=ts, mem=mem)
        except Exception as e:  # e.g. eager OOM on a small GPU: report and go on
            x.grad = w.grad = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            results[impl] = dict(label=label, failed=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    hdr = (
        f"{'':<18}{'fwd+bwd ms (IQR)':>24}{'fwd ms':>9}{'bwd ms':>9}{'score ms':>10}{'peak MiB':>10}"
        f"{'err logp':>10}{'err ent':>9}{'err dx':>9}{'err dW':>9}"
    )
    print(hdr)
    for impl in ("eager", "fusedrl"):
        r = results[impl]
        if "failed" in r:
            print(f"{r['label']:<18}  failed: {r['failed']}")
            continue
        tt = r["total"]
        e = r["err"]
        print(
            f"{r['label']:<18}{f'{tt.median:.4g} ({tt.q1:.4g}-{tt.q3:.4g})':>24}{r['fwd'].median:>9.4g}"
            f"{r['bwd'].median:>9.4g}{r['score'].median:>10.4g}{M.fmt_bytes(r['mem']):>10}"
            f"{_fmt_e(e['logp']):>10}{_fmt_e(e['entropy']):>9}{_fmt_e(e['dx']):>9}{_fmt_e(e['dw']):>9}"
        )
    ok = True
    fr, er = results["fusedrl"], results["eager"]
    if "failed" not in fr and "failed" not in er:
        sp = er["total"].median / fr["total"].median
        msg = f"fusedrl vs eager: {sp:.2f}x the speed"
        if fr["mem"] is not None and er["mem"]:
            msg += f", {fr['mem'] / er['mem']:.3f}x the peak memory"
        print(msg)
    if "failed" in fr:
        ok = False
    else:
        lowprec = 0.0 if a.dtype == "fp32" or "failed" in er else 1.0
        bad = []
        for k in ("logp", "entropy", "dx", "dw"):
            tol = (ATOL if k in ("logp", "entropy") else GRAD_ATOL)[a.dtype]
            bound = tol + (lowprec * er["err"][k] if "err" in er else 0.0)
            if not (fr["err"][k] <= bound):
                bad.append(f"{k} {fr['err'][k]:.2e} > {bound:.2e}")
        ok = not bad
        print(
            "agreement with fp64 oracle: "
            + ("OK" if ok else "FAILED: " + "; ".join(bad))
            + " (dx on 256 tokens, dW on 512 vocabulary rows)"
        )
    print(M.time_method(dev))
    if not a.no_memory:
        print(M.memory_method(dev))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
