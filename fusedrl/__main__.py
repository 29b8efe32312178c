"""``python -m fusedrl``: the fused policy loss against eager PyTorch and ``torch.compile`` on this machine.

One training step of a PPO loss with an entropy bonus (dual clip, token-mean) from the last hidden states
and the lm_head weight: fusedrl's ``fused_policy_loss`` (default schedule: one pass, three GEMMs), eager
PyTorch (logits -> log_softmax -> gather, entropy, the loss) and ``torch.compile`` of the eager code. For
each: median step time, peak memory above the inputs, and the error of the loss and of the gradients of
hidden states and weight against an fp64 computation. Then the core op alone (per-token log-prob and
entropy, forward + backward with random upstream gradients) against eager. Defaults: CPU N=1024, H=768,
V=32000 fp32; CUDA N=8192, H=4096, V=151936 bf16 (a Qwen-7B-sized head).

    python -m fusedrl                       # whatever device is present
    python -m fusedrl --device cpu --n 2048 --h 1024 --v 32000
    python -m fusedrl --no-compile --no-memory

Exit status 0 when fusedrl agrees with fp64 (its error is within eager-in-the-input-dtype's error plus a
small tolerance), 1 otherwise. The comparison with peers and the GEMM floor is ``python -m bench``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch

from . import _measure as M
from .onepass import release_workspace

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# extra tolerance on top of eager-in-the-input-dtype's error (the tests' idiom)
ATOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2}
GRAD_ATOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 5e-2}
ENTROPY_COEFF = 1e-3


class Progress:
    """One status line on stderr, rewritten in place (a terminal) or appended (a log)."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self, what: str) -> None:
        self.done += 1
        line = f"[{self.done}/{self.total} {time.perf_counter() - self.t0:5.1f} s] {what}"
        sys.stderr.write(("\r" + line.ljust(78)) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\r" + " " * 78 + "\r")


def build(n: int, h: int, v: int, dtype: str, device: str, seed: int = 0):
    """A loss batch: hidden [n, h], weight [v, h] (logits ~ N(0, 1)), sampled targets, old log-probs near the
    current ones, advantages per token, a mask with ~10% padding."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(v, h, generator=g, device=device) / h**0.25
    x = torch.randn(n, h, generator=g, device=device) / h**0.25
    t = torch.randint(0, v, (n,), generator=g, device=device)
    with torch.no_grad():
        lp = torch.log_softmax((x.double() @ w.double().t()), -1).gather(-1, t[:, None]).squeeze(-1)
    old = (lp + 0.1 * torch.randn(n, generator=g, device=device, dtype=torch.float64)).float()
    adv = torch.randn(n, generator=g, device=device)
    mask = torch.rand(n, generator=g, device=device) > 0.1
    dt = DTYPES[dtype]
    return x.to(dt), w.to(dt), t, old, adv, mask


def eager_loss(x, w, t, old, adv, mask):
    """What a trainer does without fusedrl: logits, log_softmax, gather, entropy, the PPO loss (fp32)."""
    logp, ent = M.eager_logp_entropy(x, w, t)
    return M.eager_ppo_loss(logp, ent, old, adv, mask, ENTROPY_COEFF)


def fused_loss(x, w, t, old, adv, mask):
    import fusedrl

    cfg = fusedrl.PolicyLossConfig(entropy_coeff=ENTROPY_COEFF)
    return fusedrl.fused_policy_loss(x, w, t, old, adv, mask, config=cfg)[0]


_compiled = {}


def compiled_loss(*args):
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(eager_loss)
    return _compiled["fn"](*args)


LOSSES = {"fusedrl": fused_loss, "eager": eager_loss, "compile": compiled_loss}


def loss_step_factory(impl: str, n: int, h: int, v: int, dtype: str, seed: int = 0):
    """CPU peak-memory child: rebuild the batch, return one training step of ``impl``."""
    x, w, t, old, adv, mask = build(n, h, v, dtype, "cpu", seed)
    x.requires_grad_()
    w.requires_grad_()

    def run():
        x.grad = w.grad = None
        LOSSES[impl](x, w, t, old, adv, mask).backward()

    # the one-pass CPU workspace the warm-up kept for later calls belongs to the step's peak: free it first
    run.reset = release_workspace
    return run


def core_step_factory(impl: str, n: int, h: int, v: int, dtype: str, seed: int = 0):
    x, w, t, *_ = build(n, h, v, dtype, "cpu", seed)
    x.requires_grad_()
    w.requires_grad_()
    g = torch.Generator().manual_seed(seed + 1)
    g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)

    def run():
        x.grad = w.grad = None
        torch.autograd.backward(list(_core(impl, x, w, t)), [g_lp, g_h])

    run.reset = lambda: None
    return run


def _core(impl: str, x, w, t):
    if impl == "eager":
        return M.eager_logp_entropy(x, w, t)
    import fusedrl

    return fusedrl.linear_logprob_entropy(x, w, t)


def _grads(fn, x, w, *rest):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(x, w, *rest)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def measure_loss(impl: str, a, dev, ref, prog: Progress) -> dict:
    x, w, t, old, adv, mask = build(a.n, a.h, a.v, a.dtype, a.device, a.seed)
    fn = LOSSES[impl]
    try:
        prog.step(f"{impl}: first step" + (" (compiling)" if impl == "compile" else ""))
        loss, gx, gw = _grads(fn, x, w, t, old, adv, mask)
        err = dict(loss=abs(loss.double().item() - ref[0].item()), dx=M.max_abs_err(gx, ref[1]),
                   dw=M.max_abs_err(gw, ref[2]))  # fmt: skip
        del gx, gw
        xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()

        def step(_s):
            xs.grad = ws.grad = None
            fn(xs, ws, t, old, adv, mask).backward()

        prog.step(f"{impl}: timing")
        tt = M.time_phases([step], dev, warmup=1, repeats=a.repeats, max_seconds=a.max_seconds)[0]
        mem = None
        if not a.no_memory and impl != "compile":  # a compiled step would recompile in the memory child
            prog.step(f"{impl}: peak memory")
            mem = _memory(dev, lambda: step(None), "fusedrl.__main__:loss_step_factory", impl, a)
        return dict(err=err, time=tt, mem=mem)
    except Exception as e:  # e.g. eager OOM on a small GPU: report and go on
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return dict(failed=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _memory(dev, fn, factory: str, impl: str, a) -> Optional[int]:
    if dev.type == "cuda":
        r = M.peak_memory(fn, dev)
    else:
        r = M.peak_memory(None, dev, factory=factory, kwargs=dict(impl=impl, n=a.n, h=a.h, v=a.v, dtype=a.dtype,
                                                                  seed=a.seed))  # fmt: skip
    return r.get("peak_bytes") if r.get("ok") else None


def measure_core(impl: str, a, dev, ref, prog: Progress) -> dict:
    x, w, t, *_ = build(a.n, a.h, a.v, a.dtype, a.device, a.seed)
    g = torch.Generator(device=a.device).manual_seed(a.seed + 1)
    g_lp, g_h = torch.randn(a.n, generator=g, device=a.device), torch.randn(a.n, generator=g, device=a.device)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    try:
        prog.step(f"core op, {impl}")
        logp, ent = _core(impl, xs, ws, t)
        err = dict(logp=M.max_abs_err(logp, ref.logp), entropy=M.max_abs_err(ent, ref.entropy))
        del logp, ent

        def step(_s):
            xs.grad = ws.grad = None
            torch.autograd.backward(list(_core(impl, xs, ws, t)), [g_lp, g_h])

        repeats = max(2, a.repeats - 1)  # the secondary table: fewer repeats keep the run in budget
        tt = M.time_phases([step], dev, warmup=1, repeats=repeats, max_seconds=a.max_seconds)[0]
        return dict(err=err, time=tt)
    except Exception as e:
        return dict(failed=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m fusedrl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--n", type=int, default=None, help="tokens")
    ap.add_argument("--h", type=int, default=None, help="hidden size")
    ap.add_argument("--v", type=int, default=None, help="vocabulary size")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=None, help="time budget per measurement")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the eager loss")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(a.device).type == "cuda"
    defaults = (dict(n=8192, h=4096, v=151936, dtype="bf16", repeats=10, max_seconds=20.0) if cuda else
                dict(n=1024, h=768, v=32000, dtype="fp32", repeats=3, max_seconds=8.0))  # fmt: skip
    for k, val in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, val)
    return a


def _e(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1e}"


def main(argv=None) -> int:
    a = parse(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    import fusedrl
    from fusedrl.backends import resolve

    backend = resolve("auto", dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    impls = ["fusedrl", "eager"] + ([] if a.no_compile else ["compile"])
    prog = Progress(1 + 2 * len(impls) + (0 if a.no_memory else 2) + 2)
    print(f"fusedrl {fusedrl.__version__} on {name}: N={a.n} H={a.h} V={a.v} {a.dtype}, backend {backend!r}")
    print(f"PPO loss step (dual clip, token-mean, entropy bonus {ENTROPY_COEFF:g}), forward + backward:")
    prog.step("fp64 reference")
    x, w, t, old, adv, mask = build(a.n, a.h, a.v, a.dtype, a.device, a.seed)
    ref_loss = _grads(eager_loss, x.double(), w.double(), t, old.double(), adv.double(), mask)
    ref_core = M.reference64(x, w, t)
    loss_rows = {impl: measure_loss(impl, a, dev, ref_loss, prog) for impl in impls}
    core_rows = {impl: measure_core(impl, a, dev, ref_core, prog) for impl in ("fusedrl", "eager")}
    prog.close()

    labels = {"fusedrl": "fusedrl fused loss", "eager": "eager PyTorch", "compile": "torch.compile(eager)"}
    print(f"  {'':<22}{'step ms':>10}{'vs eager':>10}{'peak MiB':>10}{'err loss':>10}{'err dx':>9}{'err dW':>9}")
    eager_t = loss_rows["eager"]["time"].median if "time" in loss_rows["eager"] else None
    for impl, r in loss_rows.items():
        if "failed" in r:
            print(f"  {labels[impl]:<22}failed: {r['failed']}")
            continue
        speed = f"{eager_t / r['time'].median:.2f}x" if eager_t else "-"
        e = r["err"]
        print(f"  {labels[impl]:<22}{r['time'].median:>10.4g}{speed:>10}{M.fmt_bytes(r['mem']):>10}"
              f"{_e(e['loss']):>10}{_e(e['dx']):>9}{_e(e['dw']):>9}")  # fmt: skip
    print("Core op: per-token log-prob + entropy, forward + backward (random upstream gradients):")
    print(f"  {'':<22}{'step ms':>10}{'vs eager':>10}{'err logp':>10}{'err ent':>9}")
    core_eager = core_rows["eager"]["time"].median if "time" in core_rows["eager"] else None
    for impl, r in core_rows.items():
        label = "fusedrl core op" if impl == "fusedrl" else labels[impl]
        if "failed" in r:
            print(f"  {label:<22}failed: {r['failed']}")
            continue
        speed = f"{core_eager / r['time'].median:.2f}x" if core_eager else "-"
        print(f"  {label:<22}{r['time'].median:>10.4g}{speed:>10}{_e(r['err']['logp']):>10}"
              f"{_e(r['err']['entropy']):>9}")  # fmt: skip

    ok, bad = _agreement(a.dtype, loss_rows, core_rows)
    fr, er = loss_rows["fusedrl"], loss_rows["eager"]
    if "failed" not in fr and "failed" not in er:
        msg = f"fusedrl fused loss vs eager: {er['time'].median / fr['time'].median:.2f}x the speed"
        if fr["mem"] and er["mem"]:
            msg += f", {fr['mem'] / er['mem']:.2f}x the peak memory"
        print(msg)
    print("agreement with fp64: " + ("OK" if ok else "FAILED: " + "; ".join(bad)))
    if not a.no_memory and dev.type == "cpu" and "compile" in loss_rows:
        print("(torch.compile's peak memory is not measured on CPU: its measuring child process would recompile)")
    print(M.time_method(dev) + ("" if a.no_memory else " " + M.memory_method(dev)))
    return 0 if ok else 1


def _agreement(dtype: str, loss_rows: dict, core_rows: dict) -> tuple[bool, list[str]]:
    """fusedrl's errors against fp64, bounded by eager's own error in the input dtype plus a tolerance."""
    low = 0.0 if dtype == "fp32" else 1.0
    bad = []
    for rows, keys in ((loss_rows, ("loss", "dx", "dw")), (core_rows, ("logp", "entropy"))):
        fr, er = rows["fusedrl"], rows["eager"]
        if "failed" in fr:
            bad.append(f"fusedrl failed: {fr['failed']}")
            continue
        for k in keys:
            tol = (ATOL if k in ("loss", "logp", "entropy") else GRAD_ATOL)[dtype]
            bound = tol + (low * er["err"][k] if "err" in er else 0.0)
            if not fr["err"][k] <= bound:
                bad.append(f"{k} {fr['err'][k]:.2e} > {bound:.2e}")
    return not bad, bad


if __name__ == "__main__":
    sys.exit(main())
