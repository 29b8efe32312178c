"""``python -m bench.onepass_model``: the one-pass planner's cost model, printed and calibrated.

* default: the modeled table at the headline shape (N=8192, H=4096, V=151936, bf16) per row epilogue,
  with the terms that make it up, at an architecture's constants (``--arch``, default ``sm_90``: the
  review's H100 figures, cuBLAS ~700 TFLOP/s bf16 and 3.35 TB/s). Modeled, not measured.
* ``--calibrate`` (a GPU; bench/gpu_check.sh runs it): per available epilogue, the planner's choices
  and, per stage, the modeled time against the time measured with CUDA events around every GEMM and
  epilogue (``fusedrl.onepass.run.run_one_pass``'s ``timer`` hook), the backward's finish, the three
  floor GEMMs and the fused loss end to end on both schedules; then the constants that make the model
  fit (achieved GEMM TFLOP/s, each epilogue's share of the bandwidth, the streaming bandwidth). Also
  the planner's choices over N = 8k, 32k, 64k at this device's default budget. ``--merge-into F``
  stores the result under ``--key`` in an existing JSON file (gpu_check.sh: sweep.json, to stay within
  the device tool's eight returned files); ``--out F`` writes it alone. ``--dry``: a tiny CPU run.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the triton backend runs in its interpreter on CPU (dry runs)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Optional  # noqa: E402

import fusedrl  # noqa: E402
from fusedrl.backends import available_backends  # noqa: E402
from fusedrl.backends.device import ARCH_FACTS, DeviceFacts, device_facts  # noqa: E402
from fusedrl.loss import PolicyLossConfig, TokenHead  # noqa: E402
from fusedrl.loss.inputs import flatten_batch  # noqa: E402

P = importlib.import_module("fusedrl.onepass.plan")  # the module (fusedrl.onepass.plan is also a function)
C = importlib.import_module("fusedrl.onepass.cost")
OP = importlib.import_module("fusedrl.onepass.op")
RUN = importlib.import_module("fusedrl.onepass.run")
GEMM = importlib.import_module("fusedrl.onepass.gemm")

HEADLINE = dict(n=8192, h=4096, v=151936)
DRY = dict(n=96, h=32, v=1003)
GIB = 2**30

# the epilogues of the table: (label, Setting fields, whether GEMM 3 may be deferred to the backward)
TABLE_ROWS = (
    ("triton, lean, GEMM 3 deferred", dict(epilogue="triton", core="triton", du32=False), True),
    ("triton, lean, dW32 accumulated", dict(epilogue="triton", core="triton", du32=False), False),
    ("triton, fp32 du stored, dW32 accumulated", dict(epilogue="triton", core="triton", du32=True), False),
    ("cuda, lean, GEMM 3 deferred", dict(epilogue="cuda", core="cuda", du32=False), True),
    ("cuda, lean, dW32 accumulated", dict(epilogue="cuda", core="cuda", du32=False), False),
    ("torch epilogue (every config), deferred", dict(epilogue="torch", core="cuda"), True),
    ("torch epilogue, entropy bonus, deferred", dict(epilogue="torch", core="cuda", ent=True, ent_grad=True), True),
)


def modeled_rows(facts: DeviceFacts, n: int, h: int, v: int, dtype: torch.dtype, budget: float) -> list[dict]:
    """The planner's choice and modeled terms per epilogue (vanilla PPO, no bias, dx and dW formed)."""
    cfg = PolicyLossConfig()
    out = []
    for label, kw, defer in TABLE_ROWS:
        s = C.Setting(facts=facts, **kw)
        pln = P.plan(n, h, v, dtype, cfg, "one_pass", budget, setting=s, defer=defer)
        m = pln.model
        rows = max(b - a for a, b, _ in pln.chunks)
        terms = dict(m.terms)
        backward = terms["finish"] + (terms["gemm3"] if pln.deferred else 0.0)
        out.append(
            dict(
                epilogue=label,
                chunks=len(pln.chunks),
                rows=rows,
                ring_rows=pln.ring_rows,
                gemm3_calls=-(-n // pln.ring_rows),
                deferred=pln.deferred,
                epilogue_bytes_per_element=C.epilogue_bytes_per_element(s, 4, dtype != torch.float32, False),
                terms_ms=terms,
                total_ms=m.total_ms,
                forward_ms=m.total_ms - backward,
                floor_ms=m.floor_ms,
                x_floor=m.total_ms / m.floor_ms,
                x_floor_forward=(m.total_ms - backward) / m.floor_ms,
                recompute_ms=m.recompute_ms,
                memory_gib=m.memory_bytes / GIB,
            )
        )
    return out


def render(rows: list[dict], facts: DeviceFacts, n: int, h: int, v: int, budget: float) -> str:
    head = (
        f"Modeled (not measured): N={n} H={h} V={v} bf16, {facts.name} constants "
        f"({facts.gemm16:g} TFLOP/s 16-bit GEMMs, {facts.hbm:g} TB/s, {facts.launch_us:g} us per kernel), "
        f"budget {budget / GIB:g} GiB, vanilla PPO, dx and dW formed. Floor = three GEMMs "
        f"= {rows[0]['floor_ms']:.2f} ms. Deferred: GEMM 3 runs once in the backward (counted under GEMMs).\n\n"
    )
    lines = [
        "| epilogue | chunks x rows | GEMM 3 calls | epilogue B/elem | GEMMs 1+2+3 | epilogue | finish (bwd) "
        "| other | total | x floor | recompute (modeled) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["terms_ms"]
        gemms = t["gemm1"] + t["gemm2"] + t["gemm3"]
        other = r["total_ms"] - gemms - t["epilogue"] - t["finish"]
        lines.append(
            f"| {r['epilogue']} | {r['chunks']} x {r['rows']} | {r['gemm3_calls']}{' (bwd)' * r['deferred']} | "
            f"{r['epilogue_bytes_per_element']:g} | {gemms:.2f} | {t['epilogue']:.2f} | {t['finish']:.2f} | "
            f"{other:.2f} | {r['total_ms']:.2f} ms | **{r['x_floor']:.3f}x** | "
            f"{r['recompute_ms']:.1f} ms |"
        )
    return head + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# calibration (a GPU; --dry: CPU, tiny)
# --------------------------------------------------------------------------------------------------


class StageTimer:
    """``run_one_pass``'s ``timer``: CUDA events (CPU: perf_counter) at every stage boundary; totals per
    stage name after one synchronisation."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def __call__(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def totals(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for (name, a), (_, b) in zip(self.marks, self.marks[1:]):
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[name] = out.get(name, 0.0) + ms
        out.pop("end", None)
        return out


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, dev, repeats: int, warmup: int = 1) -> float:
    """Median ms of ``fn()`` (CUDA events / perf_counter)."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(repeats):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def _inputs(n, h, v, dtype, dev, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(n, h, generator=g) / h**0.25).to(dtype).to(dev)
    w = (torch.randn(v, h, generator=g) / h**0.25).to(dtype).to(dev)
    t = torch.randint(0, v, (n,), generator=g).to(dev)
    old = (torch.randn(n, generator=g) * 0.2 - 11.0).to(dev)
    adv = torch.randn(n, generator=g).to(dev)
    mask = torch.ones(n, dtype=torch.bool, device=dev)
    return x, w, t, old, adv, mask


def _floor(x, w, n, h, v, dtype, dev, repeats) -> dict:
    """The three floor GEMMs (16-bit in, fp32 out where this torch can) and the backward's finish (dW32,
    dx32 scaled and rounded once: a plain streaming op's bandwidth)."""
    mm = importlib.import_module("fusedrl.onepass.gemm").mm_f32
    du = torch.randn(n, v, device=dev).to(dtype)
    u = torch.empty(n, v, dtype=torch.float32, device=dev)
    dxo = torch.empty(n, h, dtype=torch.float32, device=dev)
    dwo = torch.empty(v, h, dtype=torch.float32, device=dev)
    floor = {
        "gemm1": _time(lambda: mm(x, w.t(), u), dev, repeats),
        "gemm2": _time(lambda: mm(du, w, dxo), dev, repeats),
        "gemm3": _time(lambda: mm(du.t(), x, dwo), dev, repeats),
    }
    g = torch.full((), 0.5, device=dev)
    d16w, d16x = torch.empty(v, h, dtype=dtype, device=dev), torch.empty(n, h, dtype=dtype, device=dev)
    fin = _time(lambda: (torch.mul(dwo, g, out=d16w), torch.mul(dxo, g, out=d16x)), dev, repeats)
    return dict(
        floor_ms=floor,
        measured_gemm16_tflops=3 * 2 * n * h * v / sum(floor.values()) / 1e9,
        finish_ms=fin,
        measured_stream_tbps=(v * h + n * h) * (4 + dtype.itemsize) / fin / 1e9,
    )


@contextlib.contextmanager
def _no_deferral():
    """GEMM 3 never deferred (``plan.defers_dw`` off in the planner and the op's fake): the accumulating run on
    the same shapes, for the measured comparison."""
    saved = P.defers_dw, OP.defers_dw
    P.defers_dw = OP.defers_dw = lambda *a, **k: False
    try:
        yield
    finally:
        P.defers_dw, OP.defers_dw = saved


def calibrate(dev: torch.device, n: int, h: int, v: int, dtype: torch.dtype, repeats: int, budget_mb: Optional[float],
              save=None):  # fmt: skip
    """Modeled vs measured per stage for every available epilogue (see the module docstring); ``save(res)``
    after each epilogue (a cut-off run keeps what it measured)."""
    x, w, t, old, adv, mask = _inputs(n, h, v, dtype, dev)
    cfg = PolicyLossConfig(loss_mode="vanilla")
    budget = P.budget_bytes(budget_mb, dev)
    facts = device_facts(dev)
    cdt = torch.float32
    batch = flatten_batch("targets", (n,), dev, old, adv, mask, None, {}, check_inputs=False)
    res = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", facts=facts._asdict(),
               shape=dict(n=n, h=h, v=v, dtype=str(dtype)), budget_bytes=budget, torch=torch.__version__,
               gemm_path=OP.gemm_path(dev, dtype), runs=[])  # fmt: skip
    res.update(_floor(x, w, n, h, v, dtype, dev, repeats))
    gemm_flops = 2 * n * h * v
    for name in ("triton", "cuda", "torch"):
        if name not in available_backends(dev):
            continue
        head = TokenHead(batch, cfg, False, cdt)
        setting = OP.run_setting(x, w, None, head, name, 1.0, None, True, True, False, False)
        pln = P.plan(n, h, v, dtype, cfg, "one_pass", budget, setting=setting)

        def once(timer=None, pln=pln, name=name, head=head, v=v):
            out = RUN.run_one_pass(x, w, t, None, head, pln, 1.0, None, name, None, True, True, False, False,
                                   timer=timer)  # fmt: skip
            if pln.deferred:  # GEMM 3 as the backward runs it (with g = 0.5: the scaled-x path)
                if timer is not None:
                    timer("gemm3")
                GEMM.dw_from_du(out.dw[:, :v], x, torch.full((), 0.5, device=dev))
                if timer is not None:
                    timer("end")
            return out

        for _ in range(2):
            once()
        per_stage = []
        for _ in range(repeats):
            tm = StageTimer(dev)
            once(tm)
            per_stage.append(tm.totals())
        measured = {k: sorted(d.get(k, 0.0) for d in per_stage)[len(per_stage) // 2] for k in per_stage[0]}
        m = pln.model
        modeled = dict(m.terms)
        row = dict(epilogue=setting.epilogue, backend=name, setting={k: str(v) for k, v in setting._asdict().items()},
                   plan=dict(chunks=len(pln.chunks), rows=max(b - a for a, b, _ in pln.chunks),
                             ring_rows=pln.ring_rows, reason=pln.reason, memory=dict(m.memory)),
                   modeled_ms=modeled, measured_ms=measured, modeled_recompute_ms=m.recompute_ms)  # fmt: skip
        e_bytes = C.epilogue_bytes_per_element(setting, 4, dtype != torch.float32, pln.ring_rows > row["plan"]["rows"])
        if measured.get("epilogue"):
            row["epilogue_efficiency"] = n * v * e_bytes / (measured["epilogue"] * facts.hbm * 1e9)
        gm = sum(measured.get(k, 0.0) for k in ("gemm1", "gemm2", "gemm3"))
        if gm:
            row["gemm_tflops"] = 3 * gemm_flops / gm / 1e9
        # end to end through the public call: one-pass and recompute, forward + backward
        # ("one_pass_accumulated": the same with GEMM 3 not deferred, the deferral's effect measured)
        steps = (("one_pass", "one_pass"), ("one_pass", "one_pass_accumulated"), ("recompute", "recompute"))
        for sched, label in steps:
            xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()

            def step(sched=sched, xl=xl, wl=wl, name=name):
                loss, _ = fusedrl.fused_policy_loss(xl, wl, t, old, adv, mask, config=cfg, backend=name,
                                                    schedule=sched, memory_budget_mb=budget / 2**20)  # fmt: skip
                loss.backward()
                xl.grad = wl.grad = None

            try:
                with _no_deferral() if label == "one_pass_accumulated" else contextlib.nullcontext():
                    row[f"{label}_step_ms"] = _time(step, dev, max(1, repeats // 2))
            except torch.OutOfMemoryError as e:
                row[f"{label}_step_ms"] = f"OOM: {str(e).splitlines()[0]}"
        res["runs"].append(row)
        if save is not None:
            save(res)
        print(f"  {name}: plan {row['plan']['chunks']} x {row['plan']['rows']} ring {pln.ring_rows}; "
              f"modeled {m.total_ms:.2f} ms, measured stages {sum(measured.values()):.2f} ms", flush=True)  # fmt: skip
    effs = {r["backend"]: r.get("epilogue_efficiency") for r in res["runs"]}
    res["suggested"] = dict(gemm16=res["measured_gemm16_tflops"], hbm=res["measured_stream_tbps"],
                            epilogue_efficiency=effs)  # fmt: skip
    # the planner's choices at this device's default budget over N (plan only)
    choices = []
    for nn in (8192, 32768, 65536):
        for name in [b for b in ("triton", "cuda", "torch") if b in available_backends(dev)]:
            s = C.Setting(epilogue=name, core=name, facts=facts, gemm=res["gemm_path"])
            for sched in ("auto", "one_pass"):
                p = P.plan(nn, h, v, dtype, cfg, sched, budget, setting=s)
                choices.append(dict(n=nn, epilogue=name, schedule=sched, chose=p.schedule, reason=p.reason,
                                    ring_rows=p.ring_rows, model=p.model.as_dict() if p.model else None))  # fmt: skip
    res["planner_choices"] = choices
    return res


def _store(result: dict, out: Optional[str], merge_into: Optional[str], key: str) -> str:
    if merge_into and os.path.exists(merge_into):
        with open(merge_into) as f:
            data = json.load(f)
        data[key] = result
        with open(merge_into + ".tmp", "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(merge_into + ".tmp", merge_into)
        return f"{merge_into} [{key}]"
    path = out or (os.path.join(os.path.dirname(merge_into), key + ".json") if merge_into else "onepass_model.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return path


def summary(path: str, key: str = "onepass_model") -> str:
    """A few lines for gpu_check.sh's summary: per epilogue, the plan and modeled vs measured stage times."""
    with open(path) as f:
        data = json.load(f)
    res = data.get(key, data if "runs" in data else None)
    if not res:
        return ""
    out = [
        f"--- one-pass model vs measured ({res.get('device')}, {res.get('shape')}, GEMM path {res.get('gemm_path')})",
        f"floor GEMMs {res.get('floor_ms')}; finish {res.get('finish_ms', 0):.2f} ms",
        f"suggested constants {res.get('suggested')}",
    ]
    for r in res.get("runs", []):
        mod, mea = r["modeled_ms"], r["measured_ms"]
        parts = " ".join(f"{k} {mod.get(k, 0):.2f}/{mea.get(k, 0):.2f}" for k in ("gemm1", "epilogue", "gemm2", "db",
                                                                                  "gemm3"))  # fmt: skip
        p = r["plan"]
        out.append(f"{r['backend']:>7}: {p['chunks']} x {p['rows']} ring {p['ring_rows']}; modeled/measured ms: "
                   f"{parts}; step one_pass {r.get('one_pass_step_ms')} (accumulated dW: "
                   f"{r.get('one_pass_accumulated_step_ms')}) recompute {r.get('recompute_step_ms')} "
                   f"(modeled {r.get('modeled_recompute_ms', 0):.1f})")  # fmt: skip
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90", choices=sorted(ARCH_FACTS), help="constants of the modeled table")
    ap.add_argument("--budget-mb", type=float, default=4096.0, help="budget of the modeled table (MiB)")
    ap.add_argument("--calibrate", action="store_true", help="measure on this machine's GPU")
    ap.add_argument("--dry", action="store_true", help="calibrate on a tiny CPU shape (no GPU figures)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge-into", default=None)
    ap.add_argument("--key", default="onepass_model")
    ap.add_argument("--json", action="store_true", help="print the modeled table as JSON")
    ap.add_argument("--summary", default=None, help="print the calibration summary stored in this JSON file")
    a = ap.parse_args(argv)
    if a.summary:
        print(summary(a.summary, a.key))
        return 0
    if not (a.calibrate or a.dry):
        f = ARCH_FACTS[a.arch]
        rows = modeled_rows(f, **HEADLINE, dtype=torch.bfloat16, budget=a.budget_mb * 2**20)
        print(json.dumps(rows, indent=1) if a.json else render(rows, f, **HEADLINE, budget=a.budget_mb * 2**20))
        return 0
    dev = torch.device("cuda" if (torch.cuda.is_available() and not a.dry) else "cpu")
    shape = HEADLINE if dev.type == "cuda" else DRY
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    print(f"one-pass model calibration on {dev} at {shape} {dtype}", flush=True)
    table = modeled_rows(ARCH_FACTS["sm_90"], **HEADLINE, dtype=torch.bfloat16, budget=4 * GIB)

    def save(res):
        return _store(dict(res, modeled_table_h100=table), a.out, a.merge_into, a.key)

    res = calibrate(dev, **shape, dtype=dtype, repeats=a.repeats if dev.type == "cuda" else 2,
                    budget_mb=None if dev.type == "cuda" else 64.0, save=save)  # fmt: skip
    print("stored in", save(res))
    print(json.dumps(res["suggested"], indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
