"""``python -m bench.sweep``: correctness sweep of every fusedrl backend against an fp64 oracle.

One shape (default: the headline shape, N=8192 H=4096 V=151936 bf16 on CUDA), three cases:

* ``random``: logits ~ N(0, 1), near-uniform softmax (bench/cases.py);
* ``peaked``: LM-like softmax, mean entropy ~0.5 nats (bench/cases.py, alpha calibrated);
* ``masked``: the random inputs (N capped by ``--masked-n``) plus a bias that is ``-inf`` on the
  padded vocabulary tail (Qwen pads 151665 real ids to 151936) and on scattered columns, with a
  random bias elsewhere: the masked-vocabulary case (``0 * -inf`` must never appear).
  Its oracle is the same problem restricted to the unmasked columns; dW and db rows of masked
  columns must be exactly 0.

Per case, forward and backward with random upstream gradients ``g_lp`` and ``g_H`` on logp and
entropy, for eager PyTorch in the input dtype (the yardstick), the fp32 ``reference`` backend, every
registry backend (torch, triton, cuda) and ``triton`` with gradient filtering. Then the GRPO-style
fused loss (bench/cases.py ``grpo_loss``, the bench's ``loss`` task) per backend against eager.
Errors are max |a - ref| (and ||a - ref|| / ||ref||) against an fp64 oracle computed from the same
upcast inputs (fusedrl/_measure.py): logp and entropy on all tokens, dx on 256 tokens, dW/db on 512
vocabulary rows. Verdict (the numerical contract, the tests' idiom in tests/_factory.py): every output
finite, and each error <= eager's error + ATOL (grads: + GRAD_ATOL * max|ref|). Before each run on
CUDA the caching allocator is filled with NaN bytes, so an output element the kernels never write
shows up as non-finite.

Also: ``--one BACKEND`` (one small unaligned case with -inf columns, for compute-sanitizer / ncu;
exit 1 on a non-finite output), ``--render sweep.json`` (the table of a finished or cut-off run) and
``--auto-entry results.json --sweep sweep.json [--write fusedrl/backends/auto_table.json]`` (the
measured ``auto`` order from a GPU bench run; see docs/gpu-validation.md).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the triton backend runs in its interpreter on CPU (dry runs)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable, Optional  # noqa: E402

from fusedrl import _measure as M  # noqa: E402

from .cases import DTYPES, CaseSpec, _pad_bt, build_case, calibrate_alpha, grpo_loss, make_old_logp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADLINE = dict(n=8192, h=4096, v=151936, dtype="bf16")
DRY = dict(n=48, h=64, v=1003, dtype="bf16")
# the tests' tolerances (tests/_factory.py): extra error allowed on top of eager's, per input dtype
ATOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2}
GRAD_ATOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 5e-2}  # times max |ref| of that gradient
BACKENDS = ("cuda", "triton", "torch")  # run order; every one that is available is checked
QWEN_REAL_VOCAB = 151665  # Qwen2.5's real ids; its lm_head pads to 151936


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------
def _git(*args) -> Optional[str]:
    try:
        return (
            subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip() or None
        )
    except Exception:
        return None


def _commit() -> tuple:
    """(full hash, describe): git, else FUSEDRL_COMMIT ("<hash> <describe>", which bench/gpu_check.sh sets
    from .whl/COMMIT on a machine whose copy of the tree has no .git)."""
    env = os.environ.get("FUSEDRL_COMMIT", "").split()
    return (
        _git("rev-parse", "HEAD") or (env[0] if env else None),
        _git("describe", "--always", "--dirty") or (env[-1] if env else None),
    )


def _device_info(dev: torch.device) -> dict:
    if dev.type != "cuda":
        return {"type": dev.type, "name": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    p = torch.cuda.get_device_properties(dev)
    return {
        "type": "cuda",
        "name": torch.cuda.get_device_name(dev),
        "capability": f"{p.major}.{p.minor}",
        "arch": f"sm_{p.major}{p.minor}",
        "sms": p.multi_processor_count,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
    }


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as e:
        out["triton"] = f"not importable: {type(e).__name__}"
    try:
        from fusedrl.backends.cuda_backend import build_info

        out["fusedrl_build"] = build_info()
    except Exception as e:
        out["fusedrl_build"] = f"{type(e).__name__}: {e}"
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


def _poison(dev: torch.device, nbytes: int) -> None:
    """Fill (up to half the free memory, at most ``nbytes``) of the caching allocator with 0xFF bytes
    (NaN in bf16 / fp16 / fp32) and give it back to the cache: outputs that later allocations carve
    out of it and that a kernel never writes stay NaN."""
    if dev.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(dev)
    nb = int(min(nbytes, free // 2))
    if nb > 0:
        buf = torch.empty(nb, dtype=torch.uint8, device=dev)
        buf.fill_(0xFF)
        del buf
    torch.cuda.synchronize(dev)


def _finite(t: Optional[torch.Tensor]) -> Optional[bool]:
    return None if t is None else bool(torch.isfinite(t).all().item())


def _rel(a: Optional[torch.Tensor], r: Optional[torch.Tensor]) -> Optional[float]:
    if a is None or r is None:
        return None
    a, r = a.detach().double(), r.double()
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    return float((a - r).norm() / r.norm().clamp_min(1e-300))


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    return f"{x:.1e}"


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------
class Sweep:
    def __init__(self, args):
        self.a = args
        self.dev = torch.device(args.device)
        self.t0 = time.perf_counter()
        self.out = args.out
        self.result = dict(meta=self._meta(), cases=[], rows=[])
        self.write()

    def _meta(self) -> dict:
        a = self.a
        try:
            from fusedrl.backends import auto_choice

            auto = auto_choice(self.dev)
        except Exception as e:
            auto = f"{type(e).__name__}: {e}"
        return dict(
            tool="python -m bench.sweep",
            argv=sys.argv[1:],
            date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            device=_device_info(self.dev),
            versions=_versions(),
            commit=_commit()[0],
            describe=_commit()[1],
            auto=auto,
            config=dict(
                n=a.n,
                h=a.h,
                v=a.v,
                dtype=a.dtype,
                regimes=a.regimes,
                masked_n=a.masked_n,
                seed=a.seed,
                seq_len=a.seq_len,
                filter_eps=a.filter_eps,
                backends=a.backends,
                loss=not a.no_loss,
                budget_seconds=a.budget_seconds,
                dry=a.dry,
            ),
            reference=(
                "fp64 oracle on the same upcast inputs (fusedrl/_measure.py reference64): logp/entropy on "
                "all tokens, dx on 256 tokens, dW/db on 512 vocabulary rows (targets included)"
            ),
            verdict=(
                "pass: every output finite and, per output, max|err| <= eager_err + ATOL[dtype] "
                "(gradients: + GRAD_ATOL[dtype] * max|ref|); masked case: dW/db rows of -inf columns == 0"
            ),
            tolerances=dict(atol=ATOL, grad_atol=GRAD_ATOL),
            uncovered=("seconds include JIT compilation and first-call setup: they are not performance figures"),
        )

    # ---------------------------------------------------------------- bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        return self.a.budget_seconds is not None and self.elapsed() > self.a.budget_seconds

    def write(self) -> None:
        self.result["summary"] = summarize(self.result["rows"])
        self.result["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        if not self.out:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        tmp = self.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f, indent=1, default=str)
        os.replace(tmp, self.out)

    def add(self, row: dict) -> None:
        self.result["rows"].append(row)
        print(one_line(row), flush=True)
        self.write()

    # ---------------------------------------------------------------- inputs
    def build(self, regime: str):
        a = self.a
        spec = CaseSpec(
            n=a.n, h=a.h, v=a.v, dtype=a.dtype, regime=regime, device=a.device, seed=a.seed, seq_len=a.seq_len
        )
        t0 = time.perf_counter()
        if regime == "peaked":
            spec.alpha = calibrate_alpha(spec)
        case = build_case(spec)
        ref = M.reference64(case.x.detach(), case.w.detach(), case.targets)
        grads = M.reference64_grads(ref, case.x.detach(), case.w.detach(), case.targets, case.g_lp, case.g_H)
        _sync(self.dev)
        info = dict(
            regime=regime,
            n=a.n,
            h=a.h,
            v=a.v,
            dtype=a.dtype,
            alpha=spec.alpha,
            mean_entropy=float(ref.entropy.mean()),
            setup_seconds=round(time.perf_counter() - t0, 2),
        )
        self.result["cases"].append(info)
        print(
            f"[{regime}] N={a.n} H={a.h} V={a.v} {a.dtype}: mean entropy {info['mean_entropy']:.3f} nats "
            f"(fp64){f', alpha={spec.alpha:.3f}' if regime == 'peaked' else ''}; setup {info['setup_seconds']} s",
            flush=True,
        )
        return dict(regime=regime, spec=spec, case=case, ref=ref, grads=grads, keep=None)

    def build_masked(self):
        """Random inputs with a -inf bias on masked columns; the oracle drops those columns."""
        a = self.a
        n = min(a.n, a.masked_n)
        spec = CaseSpec(n=n, h=a.h, v=a.v, dtype=a.dtype, regime="random", device=a.device, seed=a.seed + 3)
        t0 = time.perf_counter()
        case = build_case(spec)
        dev, v = self.dev, a.v
        tail = v - QWEN_REAL_VOCAB if v > QWEN_REAL_VOCAB else max(1, v // 64)
        masked = torch.zeros(v, dtype=torch.bool, device=dev)
        masked[v - tail :] = True
        masked[torch.arange(7, v, max(2, v // 150), device=dev)] = True  # inside tiles too, not only the tail
        keep = torch.nonzero(~masked).squeeze(1)
        g = torch.Generator(device=dev).manual_seed(a.seed + 5)
        b = (0.5 * torch.randn(v, generator=g, device=dev)).masked_fill(masked, float("-inf"))
        case.b = b.to(DTYPES[a.dtype]).requires_grad_(True)
        t_keep = torch.randint(0, keep.numel(), (n,), generator=g, device=dev)  # targets in kept columns only
        case.targets = keep[t_keep].contiguous()
        w_keep = case.w.detach()[keep]
        b_keep = case.b.detach()[keep]
        ref = M.reference64(case.x.detach(), w_keep, t_keep, bias=b_keep)
        grads = M.reference64_grads(ref, case.x.detach(), w_keep, t_keep, case.g_lp, case.g_H, bias=b_keep)
        _sync(dev)
        info = dict(
            regime="masked",
            n=n,
            h=a.h,
            v=v,
            dtype=a.dtype,
            masked_columns=int(masked.sum()),
            mean_entropy=float(ref.entropy.mean()),
            setup_seconds=round(time.perf_counter() - t0, 2),
        )
        self.result["cases"].append(info)
        print(
            f"[masked] N={n} H={a.h} V={v}: {info['masked_columns']} columns -inf (tail {tail} + scattered); "
            f"setup {info['setup_seconds']} s",
            flush=True,
        )
        return dict(
            regime="masked",
            spec=spec,
            case=case,
            ref=ref,
            grads=grads,
            keep=keep,
            masked=masked,
            t_keep=t_keep,
            w_keep=w_keep,
            b_keep=b_keep,
        )

    # ---------------------------------------------------------------- core rows
    def core_row(self, c: dict, impl: str, backend: Optional[str], fn: Callable, eager: Optional[dict]) -> dict:
        """Run fn(case) -> (logp, entropy, dx, dw, db) (backward included) and judge it."""
        case, ref, g = c["case"], c["ref"], c["grads"]
        row = dict(part="core", regime=c["regime"], impl=impl, backend=backend, n=case.x.shape[0])
        if self.over_budget():
            row.update(
                status="skipped", verdict="skipped", reason=f"time budget of {self.a.budget_seconds:.0f} s spent"
            )
            return row
        case.zero_grads()
        if getattr(case, "b", None) is not None:
            case.b.grad = None
        _free(self.dev)
        _poison(self.dev, self.a.poison_gib * 2**30)
        t0 = time.perf_counter()
        try:
            lp, ent, dx, dw, db = fn(case)
            _sync(self.dev)
        except Exception as e:
            oom = "out of memory" in str(e).lower()
            row.update(
                status="oom" if oom else "error",
                verdict="error",
                reason=f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}",
            )
            case.zero_grads()
            _free(self.dev)
            return row
        row["seconds"] = round(time.perf_counter() - t0, 2)
        if dx is None or dw is None or (getattr(case, "b", None) is not None and db is None):
            row.update(status="error", verdict="error", reason="backward left a gradient (dx, dW or db) unset")
            case.zero_grads()
            return row
        keep = c["keep"]
        vi = ref.voc_idx if keep is None else keep[ref.voc_idx]  # oracle rows -> columns of the full problem
        outs = dict(
            logp=(lp, ref.logp), entropy=(ent, ref.entropy), dx=(dx[ref.tok_idx], g["dx"]), dw=(dw[vi], g["dw"])
        )
        if "db" in g and db is not None:
            outs["db"] = (db[vi], g["db"])
        row["finite"] = dict(logp=_finite(lp), entropy=_finite(ent), dx=_finite(dx), dw=_finite(dw))
        if db is not None:
            row["finite"]["db"] = _finite(db)
        row["err"] = {k: M.max_abs_err(o, r) for k, (o, r) in outs.items()}
        row["rel"] = {k: _rel(o, r) for k, (o, r) in outs.items()}
        row["tol"] = {
            k: (ATOL[self.a.dtype] if k in ("logp", "entropy") else GRAD_ATOL[self.a.dtype] * float(r.abs().max()))
            for k, (o, r) in outs.items()
        }
        if keep is not None:  # masked columns: exactly zero gradient rows
            m = c["masked"]
            row["masked_rows_zero"] = bool((dw[m] == 0).all().item()) and (
                db is None or bool((db[m] == 0).all().item())
            )
        judge(row, eager)
        row["status"] = "ok"
        del lp, ent, dx, dw, db
        case.zero_grads()
        return row

    def core_fns(self, c: dict):
        """(impl, backend, fn) for every row of the core part, eager first."""
        import fusedrl

        a = self.a
        eps = (torch.finfo(DTYPES[a.dtype]).eps / 32) if a.filter_eps == "auto" else a.filter_eps
        masked = c["keep"] is not None

        def fused(backend, grad_filter_eps=0.0):
            def fn(case):
                lp, ent = fusedrl.linear_logprob_entropy(
                    case.x,
                    case.w,
                    case.targets,
                    bias=getattr(case, "b", None),
                    backend=backend,
                    grad_filter_eps=grad_filter_eps,
                )
                torch.autograd.backward([lp, ent], [case.g_lp, case.g_H])
                b = getattr(case, "b", None)
                return lp.detach(), ent.detach(), case.x.grad, case.w.grad, (b.grad if b is not None else None)

            return fn

        def eager(case):
            if not masked:
                lp, ent = M.eager_logp_entropy(case.x, case.w, case.targets)
                torch.autograd.backward([lp, ent], [case.g_lp, case.g_H])
                return lp.detach(), ent.detach(), case.x.grad, case.w.grad, None
            # eager cannot take a -inf bias (its entropy forms 0 * -inf): it runs the kept-column problem,
            # with the bias as one more hidden column (x' = [x, 1], W' = [W_keep, b_keep])
            n, h = case.x.shape
            xa = torch.cat([case.x.detach(), torch.ones(n, 1, dtype=case.x.dtype, device=case.x.device)], 1)
            wa = torch.cat([c["w_keep"], c["b_keep"][:, None]], 1)
            xa.requires_grad_(True)
            wa.requires_grad_(True)
            lp, ent = M.eager_logp_entropy(xa, wa, c["t_keep"])
            torch.autograd.backward([lp, ent], [case.g_lp, case.g_H])
            dw = torch.zeros_like(case.w)
            dw[c["keep"]] = wa.grad[:, :h]
            db = torch.zeros(case.w.shape[0], dtype=case.w.dtype, device=case.w.device)
            db[c["keep"]] = wa.grad[:, h]
            return lp.detach(), ent.detach(), xa.grad[:, :h], dw, db

        rows = [("eager", None, eager)]
        for b in a.backends:
            rows.append((b, b, fused(b)))
        rows.append(("reference-fp32", "reference", fused("reference")))
        for b in a.filter_backends:
            if eps and b in a.backends:
                rows.append((f"{b}+filter", b, fused(b, eps)))
        return rows

    def run_core(self, c: dict) -> None:
        from fusedrl.backends import availability

        eager = None
        for impl, backend, fn in self.core_fns(c):
            if backend not in (None, "reference"):
                ok, why = availability(backend, self.dev)
                if not ok:
                    self.add(
                        dict(
                            part="core",
                            regime=c["regime"],
                            impl=impl,
                            backend=backend,
                            status="unavailable",
                            verdict="unavailable",
                            reason=why,
                        )
                    )
                    continue
            row = self.core_row(c, impl, backend, fn, eager)
            if impl == "eager" and row.get("status") == "ok":
                eager = row
            self.add(row)
        _free(self.dev)

    # ---------------------------------------------------------------- loss rows
    def run_loss(self, c: dict) -> None:
        try:
            from .providers import EagerGRPO, FusedRLLoss
        except Exception as e:
            self.add(
                dict(
                    part="loss",
                    regime=c["regime"],
                    impl="*",
                    status="error",
                    verdict="error",
                    reason=f"bench.providers not importable: {type(e).__name__}: {e}",
                )
            )
            return
        case, ref, spec = c["case"], c["ref"], c["spec"]
        spec.old_logp = make_old_logp(ref.logp, self.a.seed)
        case.old_logp = _pad_bt(torch.tensor(spec.old_logp, dtype=torch.float32, device=self.dev), case.B, case.T)
        provs = [("eager-grpo", None, EagerGRPO())] + [(f"grpo-{b}", b, FusedRLLoss(b)) for b in self.a.backends]
        oracle = {}
        eager = None
        for impl, backend, p in provs:
            row = dict(part="loss", regime=c["regime"], impl=impl, backend=backend, n=case.x.shape[0])
            try:
                ok, why = p.available(self.dev, case.dtype)
            except Exception as e:
                ok, why = False, f"{type(e).__name__}: {e}"
            if not ok:
                row.update(status="unavailable", verdict="unavailable", reason=why)
                self.add(row)
                continue
            if self.over_budget():
                row.update(status="skipped", verdict="skipped", reason="time budget spent")
                self.add(row)
                continue
            sem = p.semantics
            if sem not in oracle:
                lp = ref.logp.clone().requires_grad_(True)
                en = ref.entropy.clone().requires_grad_(True)
                loss = grpo_loss(
                    _pad_bt(lp, case.B, case.T),
                    _pad_bt(en, case.B, case.T),
                    case.old_logp.double(),
                    case.adv_bt().double(),
                    case.mask.double(),
                    sem,
                )
                g_lp, g_H = torch.autograd.grad(loss, [lp, en], allow_unused=True)
                gr = M.reference64_grads(ref, case.x.detach(), case.w.detach(), case.targets, g_lp, g_H)
                oracle[sem] = (loss.detach(), gr)
            loss_ref, gr = oracle[sem]
            case.zero_grads()
            _free(self.dev)
            _poison(self.dev, self.a.poison_gib * 2**30)
            t0 = time.perf_counter()
            try:
                out = p.forward(case)
                p.backward(case, out)
                _sync(self.dev)
            except Exception as e:
                row.update(
                    status="error",
                    verdict="error",
                    reason=f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}",
                )
                case.zero_grads()
                self.add(row)
                continue
            row["seconds"] = round(time.perf_counter() - t0, 2)
            dx, dw = case.x.grad, case.w.grad
            if dx is None or dw is None:
                row.update(status="error", verdict="error", reason="backward left x.grad or w.grad unset")
                case.zero_grads()
                self.add(row)
                continue
            outs = dict(
                loss=(out.detach().reshape(()), loss_ref),
                dx=(dx[ref.tok_idx], gr["dx"]),
                dw=(dw[ref.voc_idx], gr["dw"]),
            )
            row["finite"] = dict(loss=_finite(out.detach()), dx=_finite(dx), dw=_finite(dw))
            row["err"] = {k: M.max_abs_err(o, r) for k, (o, r) in outs.items()}
            row["rel"] = {k: _rel(o, r) for k, (o, r) in outs.items()}
            row["tol"] = {
                k: (ATOL[self.a.dtype] if k == "loss" else GRAD_ATOL[self.a.dtype] * float(r.abs().max()))
                for k, (o, r) in outs.items()
            }
            judge(row, eager)
            row["status"] = "ok"
            if impl == "eager-grpo":
                eager = row
            del out, dx, dw
            case.zero_grads()
            self.add(row)
        _free(self.dev)

    # ---------------------------------------------------------------- driver
    def run(self) -> dict:
        a = self.a
        kept = []
        for regime in [r for r in a.regimes if r in ("random", "peaked")]:
            if self.over_budget():
                break
            c = self.build(regime)
            self.run_core(c)
            kept.append(c)
        if "masked" in a.regimes and not self.over_budget():
            c = self.build_masked()
            self.run_core(c)
            del c
            _free(self.dev)
        if not a.no_loss:
            for c in kept:
                if self.over_budget():
                    break
                self.run_loss(c)
        self.result["meta"]["complete"] = not self.over_budget()
        self.write()
        print(render(self.result))
        if self.out:
            print(f"wrote {self.out}")
        return self.result


# --------------------------------------------------------------------------------------------------
# verdicts and reports
# --------------------------------------------------------------------------------------------------
def judge(row: dict, eager: Optional[dict]) -> None:
    """Fill row['vs_eager'], row['fails'] and row['verdict'] (eager rows are the baseline)."""
    fails = []
    for k, ok in row.get("finite", {}).items():
        if ok is False:
            fails.append(f"{k} not finite")
    if row.get("masked_rows_zero") is False:
        fails.append("dW/db rows of masked columns not zero")
    ee = (eager or {}).get("err", {})
    row["vs_eager"] = {}
    for k, e in row.get("err", {}).items():
        if e is None:
            continue
        base = ee.get(k)
        if base is not None and not math.isnan(base) and base > 0:
            row["vs_eager"][k] = e / base
        if row["impl"].startswith("eager"):
            continue
        if math.isnan(e):
            if f"{k} not finite" not in fails:
                fails.append(f"{k} error NaN")
            continue
        bound = (base if base is not None and not math.isnan(base) else 0.0) + row["tol"][k]
        if e > bound:
            fails.append(f"{k}: {e:.2e} > eager {_fmt(base)} + tol {row['tol'][k]:.1e}")
    row["fails"] = fails
    if row["impl"].startswith("eager"):
        row["verdict"] = "baseline" if not fails else "baseline-nonfinite"
    else:
        row["verdict"] = "pass" if not fails else "FAIL"


def summarize(rows: list[dict]) -> dict:
    out = {"pass": 0, "FAIL": 0, "error": 0, "skipped": 0, "unavailable": 0, "backends": {}}
    for r in rows:
        v = r.get("verdict")
        if v in out:
            out[v] += 1
        b = r.get("backend")
        if b and b != "reference" and r["impl"] == b:  # exact core rows decide a backend's status
            cur = out["backends"].get(b)
            rank = {"FAIL": 4, "error": 3, "pass": 2, "skipped": 1, "unavailable": 0}
            if cur is None or rank.get(v, 0) > rank.get(cur, 0):
                out["backends"][b] = v
    out["all_pass"] = out["FAIL"] == 0 and out["error"] == 0 and out["pass"] > 0
    return out


def one_line(r: dict) -> str:
    head = f"[{r['regime']}] {r['part']:4s} {r['impl']:15s}"
    if r.get("status") != "ok":
        return f"{head} {r.get('status')}: {r.get('reason', '')}"
    errs = " ".join(
        f"{k} {_fmt(e)}" + (f" (x{r['vs_eager'][k]:.2g})" if k in r.get("vs_eager", {}) else "")
        for k, e in r["err"].items()
    )
    tail = f" | {'; '.join(r['fails'])}" if r.get("fails") else ""
    return f"{head} {errs} -> {r['verdict']} ({r.get('seconds', 0):.1f} s){tail}"


def render(result: dict) -> str:
    """Markdown table of a sweep result (also of a cut-off run's JSON)."""
    m = result.get("meta", {})
    d = m.get("device", {})
    lines = [
        f"### correctness sweep: {d.get('name')} {d.get('arch') or ''} | commit {m.get('describe')} | {m.get('date')}",
        "",
        f"max |err| vs fp64 (x = ratio to eager {m.get('config', {}).get('dtype')}); verdict: {m.get('verdict')}",
        "",
        "| case | part | impl | logp / loss | entropy | dx | dW | db | verdict | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.get("rows", []):
        if r.get("status") != "ok":
            lines.append(
                f"| {r['regime']} | {r['part']} | {r['impl']} | | | | | | {r.get('verdict')}: "
                f"{(r.get('reason') or '')[:120]} | |"
            )
            continue

        def cell(k, r=r):
            e = r["err"].get(k)
            if e is None:
                return "-"
            x = r.get("vs_eager", {}).get(k)
            return _fmt(e) + (f" (x{x:.2g})" if x is not None and not r["impl"].startswith("eager") else "")

        first = cell("logp") if "logp" in r["err"] else cell("loss")
        verdict = r["verdict"] + (": " + "; ".join(r["fails"]) if r.get("fails") else "")
        lines.append(
            f"| {r['regime']} | {r['part']} | {r['impl']} | {first} | {cell('entropy')} | {cell('dx')} | "
            f"{cell('dw')} | {cell('db')} | {verdict} | {r.get('seconds', '')} |"
        )
    s = result.get("summary") or summarize(result.get("rows", []))
    lines += [
        "",
        f"summary: {s['pass']} pass, {s['FAIL']} FAIL, {s['error']} error, {s['skipped']} skipped, "
        f"{s['unavailable']} unavailable; per backend: {s['backends']}"
        + ("" if m.get("complete", False) else "  (run incomplete: cut off or budget spent)"),
    ]
    cases = result.get("cases", [])
    if cases:
        lines.append(
            "cases: "
            + "; ".join(
                f"{c['regime']} N={c['n']} mean entropy {c['mean_entropy']:.3f}"
                + (f" alpha {c['alpha']:.3f}" if c.get("alpha") else "")
                + (f" masked cols {c['masked_columns']}" if c.get("masked_columns") else "")
                for c in cases
            )
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# --one: a small case for compute-sanitizer / ncu
# --------------------------------------------------------------------------------------------------
def one(args) -> int:
    """Forward + backward once (bias with -inf columns, T=0.7, entropy, random upstream grads), then the
    filtered backward and the fused loss; exit status 1 on a non-finite output."""
    import fusedrl
    from fusedrl.backends import availability

    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    ok, why = availability(args.one, dev)
    if not ok:
        print(f"--one {args.one} on {dev}: backend unavailable: {why}", flush=True)
        return 3
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    n, h, v = args.n, args.h, args.v
    x = (torch.randn(n, h, generator=g) / h**0.25).to(dt).to(dev).requires_grad_(True)
    w = (torch.randn(v, h, generator=g) / h**0.25).to(dt).to(dev).requires_grad_(True)
    b = 0.5 * torch.randn(v, generator=g)
    b[-max(1, v // 50) :] = float("-inf")
    b = b.to(dt).to(dev).requires_grad_(True)
    t = torch.randint(0, v - max(1, v // 50), (n,), generator=g).to(dev)
    g_lp, g_H = torch.randn(n, generator=g).to(dev), torch.randn(n, generator=g).to(dev)
    bad = []
    for eps in (0.0, torch.finfo(dt).eps / 32):
        if eps and args.one == "torch":
            continue
        lp, ent = fusedrl.linear_logprob_entropy(
            x, w, t, bias=b, temperature=0.7, backend=args.one, grad_filter_eps=eps
        )
        torch.autograd.backward([lp, ent], [g_lp, g_H])
        _sync(dev)
        for name, tt in (("logp", lp), ("entropy", ent), ("dx", x.grad), ("dW", w.grad), ("db", b.grad)):
            if not bool(torch.isfinite(tt).all()):
                bad.append(f"{name} (eps={eps:g})")
        x.grad = w.grad = b.grad = None
    T = max(1, min(16, n))
    B = n // T
    cfg = fusedrl.PolicyLossConfig(entropy_coeff=1e-3)
    mask = torch.ones(B, T, device=dev)
    loss, _ = fusedrl.fused_policy_loss(
        x[: B * T].reshape(B, T, h),
        w,
        t[: B * T].reshape(B, T),
        -torch.rand(B, T, device=dev),
        torch.randn(B, device=dev),
        mask,
        config=cfg,
        backend=args.one,
    )
    loss.backward()
    _sync(dev)
    if not (bool(torch.isfinite(loss)) and bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(w.grad).all())):
        bad.append("fused_policy_loss")
    print(
        f"--one {args.one} on {dev} N={n} H={h} V={v} {args.dtype}: "
        + ("all outputs finite" if not bad else f"NON-FINITE: {', '.join(bad)}"),
        flush=True,
    )
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------------
# --auto-entry: the measured `auto` order from a GPU bench run (+ this sweep)
# --------------------------------------------------------------------------------------------------
def auto_entry(bench_json: str, sweep_json: Optional[str], source: Optional[str] = None) -> dict:
    """Table entry for fusedrl/backends/auto_table.json: backends ordered by the median training-step time
    (fwd+bwd, core op, exact: no gradient filtering) summed over the regimes every ranked backend ran,
    restricted to backends whose exact core rows all passed the sweep."""
    with open(bench_json) as f:
        res = json.load(f)
    meta = res.get("meta", {})
    dev = meta.get("device", {})
    if dev.get("type") != "cuda" or not dev.get("capability"):
        raise SystemExit(f"{bench_json}: not a CUDA run (device {dev}); the auto table holds GPU measurements only")
    arch = "sm_" + dev["capability"].replace(".", "")
    verdicts, excluded = {}, {}
    if sweep_json:
        with open(sweep_json) as f:
            sw = json.load(f)
        sarch = sw.get("meta", {}).get("device", {}).get("arch")
        if sarch and sarch != arch:
            raise SystemExit(f"sweep ran on {sarch}, bench on {arch}: pair runs from the same device")
        verdicts = summarize(sw.get("rows", []))["backends"]
    times: dict[str, dict[str, float]] = {}
    for r in res.get("rows", []):
        p = r.get("provider", "")
        if (
            r.get("task") == "core"
            and r.get("mode") == "train"
            and r.get("status") == "ok"
            and p.startswith("fusedrl-")
            and "+" not in p
        ):
            times.setdefault(p[len("fusedrl-") :], {})[r["regime"]] = float(r["total"]["median"])
    if not times:
        raise SystemExit(f"{bench_json}: no successful fusedrl core training rows to rank")
    for b in list(times):
        v = verdicts.get(b)
        if sweep_json and v != "pass":
            excluded[b] = f"sweep verdict {v or 'missing'}"
            del times[b]
    if not times:
        raise SystemExit(f"no backend both measured and passing the sweep (excluded: {excluded})")
    common = set.intersection(*(set(t) for t in times.values()))
    regimes = sorted(common) or sorted({k for t in times.values() for k in t})
    score = {b: sum(t.get(k, math.inf) for k in regimes) for b, t in times.items()}
    order = sorted(score, key=lambda b: score[b])
    cfg = meta.get("config", {})
    src = source or os.path.relpath(os.path.abspath(bench_json), ROOT)
    if sweep_json and not source:
        src += " + " + os.path.relpath(os.path.abspath(sweep_json), ROOT)
    entry = dict(
        order=order,
        source=src,
        device=dev.get("name"),
        date=meta.get("date"),
        commit=meta.get("fusedrl_commit") or meta.get("commit"),
        metric=(
            f"median fwd+bwd ms of the core op (exact), N={cfg.get('n')} H={cfg.get('h')} V={cfg.get('v')} "
            f"{cfg.get('dtype')}, summed over regimes {regimes}"
        ),
        measured_ms={b: round(score[b], 3) for b in order},
        correctness=("bench/sweep.py verdicts: " + json.dumps(verdicts)) if sweep_json else "not checked",
    )
    if excluded:
        entry["excluded"] = excluded
    return {"arch": arch, "entry": entry}


def write_table(path: str, arch: str, entry: dict) -> None:
    from fusedrl.backends import validate_table_entry

    why = validate_table_entry(arch, entry)
    if why:
        raise SystemExit(f"refusing to write an invalid entry: {why}")
    data = {"schema": 1, "entries": {}}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.setdefault("entries", {})[arch] = entry
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


# --------------------------------------------------------------------------------------------------
# --finalize: the end of bench/gpu_check.sh in one process (each python start costs seconds of GPU time)
# --------------------------------------------------------------------------------------------------
def finalize(d: str) -> int:
    """Print the sweep table; stamp the commit into the bench's results.json when the machine had no .git
    (FUSEDRL_COMMIT); re-render results.md and plot.png from the JSON (a bench cut off by its limit has a
    complete JSON but no plot); print the bench's headline rows and the measured auto-table entry."""
    sj, rj = os.path.join(d, "sweep.json"), os.path.join(d, "results.json")
    if os.path.exists(sj):
        try:
            with open(sj) as f:
                print(render(json.load(f)))
        except Exception as e:
            print(f"sweep.json unreadable: {type(e).__name__}: {e}")
    if not os.path.exists(rj):
        print("no bench results.json")
        return 0
    try:
        with open(rj) as f:
            r = json.load(f)
        m = r.setdefault("meta", {})
        c = os.environ.get("FUSEDRL_COMMIT", "").split()
        if c and not m.get("fusedrl_commit"):
            m.update(
                fusedrl_commit=c[0],
                fusedrl_describe=c[-1] if len(c) > 1 else c[0][:7],
                commit_source="FUSEDRL_COMMIT / .whl/COMMIT (no .git on the machine that ran it)",
            )
            with open(rj + ".tmp", "w") as f:
                json.dump(r, f, indent=1, default=str)
            os.replace(rj + ".tmp", rj)
            print(f"stamped commit {' '.join(c)} into results.json")
        from .runner import main as bench_main

        bench_main(["--render", rj])
    except (Exception, SystemExit) as e:
        print(f"re-render failed: {type(e).__name__}: {e}")
    md = os.path.join(d, "results.md")
    if os.path.exists(md):
        print("\n--- bench headline rows (full tables: results.md)")
        keep = ("## ", "| GEMM floor", "| fusedrl", "| eager", "| compile", "| liger", "| verl", "| cce")
        with open(md) as f:
            for line in f:
                if line.startswith(keep):
                    print(line.rstrip()[:220])
    print("\n--- measured auto entry (commit it: docs/gpu-validation.md section 3)")
    try:
        print(json.dumps(auto_entry(rj, sj if os.path.exists(sj) else None), indent=1))
    except SystemExit as e:
        print(f"no entry: {e}")
    except Exception as e:
        print(f"no entry: {type(e).__name__}: {e}")
    return 0


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m bench.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--dry", action="store_true", help=f"tiny shapes {DRY} (CPU dry run of the whole flow)")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--h", type=int, default=None)
    ap.add_argument("--v", type=int, default=None)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    ap.add_argument("--regimes", default="random,peaked,masked", help="comma list of random,peaked,masked")
    ap.add_argument("--masked-n", type=int, default=2048, help="tokens of the masked case (<= N)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma list of registry backends to check")
    ap.add_argument("--filter-backends", default="triton", help="backends also checked with gradient filtering")
    ap.add_argument("--filter-eps", default="auto", help="auto (finfo(dtype).eps/32), a float, or none")
    ap.add_argument("--no-loss", action="store_true", help="skip the fused-loss rows")
    ap.add_argument("--seq-len", type=int, default=None, help="loss rows: tokens per sequence (default 1024; dry 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-seconds", type=float, default=None, help="skip rows that would start after this")
    ap.add_argument(
        "--poison-gib", type=float, default=16.0, help="NaN-fill this much of the CUDA cache before each run"
    )
    ap.add_argument("--out", default=None, help="JSON file (rewritten after every row)")
    ap.add_argument("--one", default=None, metavar="BACKEND", help="one small case (sanitizer / ncu driver)")
    ap.add_argument("--render", default=None, metavar="SWEEP_JSON", help="print the table of a sweep JSON")
    ap.add_argument("--finalize", default=None, metavar="DIR", help="bench/gpu_check.sh's last step on its folder")
    ap.add_argument(
        "--auto-entry",
        default=None,
        metavar="BENCH_RESULTS_JSON",
        help="print the measured auto-table entry from a GPU bench run (with --sweep)",
    )
    ap.add_argument(
        "--sweep", default=None, metavar="SWEEP_JSON", help="--auto-entry: sweep verdicts of the same device"
    )
    ap.add_argument("--source", default=None, help="--auto-entry: 'source' text (default: the JSON paths)")
    ap.add_argument("--write", default=None, metavar="TABLE_JSON", help="--auto-entry: merge the entry into this table")
    a = ap.parse_args(argv)
    if a.render or a.auto_entry or a.finalize:
        return a
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.one:
        base = dict(n=300, h=136, v=5003, dtype="bf16")
    else:
        base = DRY if (a.dry or torch.device(a.device).type != "cuda") else HEADLINE
    for k, val in base.items():
        if getattr(a, k) is None:
            setattr(a, k, val)
    a.seq_len = a.seq_len or (16 if a.n < 1024 else 1024)
    a.regimes = [r.strip() for r in a.regimes.split(",") if r.strip()]
    for r in a.regimes:
        if r not in ("random", "peaked", "masked"):
            ap.error(f"unknown regime {r!r}")
    a.backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    a.filter_backends = [b.strip() for b in a.filter_backends.split(",") if b.strip()]
    fe = str(a.filter_eps).lower()
    a.filter_eps = None if fe in ("none", "off", "0") else ("auto" if fe == "auto" else float(fe))
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.finalize:
        return finalize(a.finalize)
    if a.render:
        with open(a.render) as f:
            print(render(json.load(f)))
        return 0
    if a.auto_entry:
        res = auto_entry(a.auto_entry, a.sweep, a.source)
        print(json.dumps(res, indent=1))
        if a.write:
            write_table(a.write, res["arch"], res["entry"])
            print(f"wrote entry {res['arch']} into {a.write}")
        return 0
    if a.one:
        return one(a)
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False (use --dry on a CPU)")
    print(
        f"bench.sweep on {a.device}: N={a.n} H={a.h} V={a.v} {a.dtype}, regimes {a.regimes}, "
        f"backends {a.backends}, out {a.out}",
        flush=True,
    )
    res = Sweep(a).run()
    return 0 if res["summary"]["FAIL"] == 0 and res["summary"]["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
