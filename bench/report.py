"""Derived figures, markdown table, JSON and PNG plot for ``python -m bench``."""

from __future__ import annotations

import json
import math
import os
from typing import Optional

MIB = 2**20

EAGER_OF = {"core": "eager", "loss": "eager-grpo"}


def _key(r) -> tuple:
    return (r["regime"], r["n"], r["v"])


def _case(result, r) -> Optional[dict]:
    for c in result["cases"]:
        if (c["regime"], c["n"], c["v"]) == _key(r):
            return c
    return None


def _floor(c: dict):
    f = [c["floor"][k]["median"] for k in c["floor"]]
    return f[0], f[1] + f[2], sum(f)


def _peak(r) -> Optional[float]:
    m = r.get("mem") or {}
    return m.get("peak_bytes") if m.get("ok") else None


def derive(result: dict) -> None:
    """Add ratios to the GEMM floor, TFLOP/s, comparisons with eager (in place)."""
    for r in result["rows"]:
        if r.get("status") != "ok":
            continue
        c = _case(result, r)
        if c is None:
            continue
        nhv = float(r["n"]) * r["h"] * r["v"]
        g1, g23, g123 = _floor(c)
        d = {}
        if r["mode"] == "train":
            d["tflops_fwd"] = 2 * nhv / (r["fwd"]["median"] * 1e9)
            d["tflops_bwd"] = 4 * nhv / (r["bwd"]["median"] * 1e9)
            d["tflops"] = 6 * nhv / (r["total"]["median"] * 1e9)
            d["x_floor_fwd"] = r["fwd"]["median"] / g1
            d["x_floor_bwd"] = r["bwd"]["median"] / g23
            d["x_floor"] = r["total"]["median"] / g123
            pf = r.get("paired_floor")
            if pf:  # the floor GEMMs ran inside the same repeats: per-repeat ratios are the robust figure
                d["x_floor_fwd"], d["x_floor_bwd"], d["x_floor"] = pf["x_floor_fwd"], pf["x_floor_bwd"], pf["x_floor"]
                d["x_floor_pooled"] = r["total"]["median"] / g123
            pk = _peak(r)
            if pk is not None:
                d["peak_minus_grads_bytes"] = pk - c["grad_bytes"]
        else:
            d["tflops"] = 2 * nhv / (r["fwd"]["median"] * 1e9)
            d["x_floor"] = r["fwd"]["median"] / g1
        eager = EAGER_OF.get(r["task"])
        e = next(
            (
                x
                for x in result["rows"]
                if x["provider"] == eager and x.get("status") == "ok" and x["mode"] == r["mode"] and _key(x) == _key(r)
            ),
            None,
        )
        if e is not None:
            tk = "total" if r["mode"] == "train" else "fwd"
            d["speedup_vs_eager"] = e[tk]["median"] / r[tk]["median"]
            pe, pr = _peak(e), _peak(r)
            if pe and pr is not None:
                d["mem_vs_eager"] = pr / pe
        r["derived"] = d


# --------------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------------
def _num(m: float) -> str:
    if m != m:
        return "nan"
    if abs(m) >= 100:
        return f"{m:.0f}"
    if abs(m) >= 10:
        return f"{m:.1f}"
    return f"{m:.3g}"


def _ms(t: Optional[dict]) -> str:
    if not t:
        return "-"
    return _num(t["median"])


def _ms_iqr(t: Optional[dict]) -> str:
    if not t:
        return "-"
    return f"{_num(t['median'])} ({_num(t['q1'])}-{_num(t['q3'])})"


def _f(x, fmt="{:.2f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)


def _e(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.1e}"


def _mib(b) -> str:
    return "-" if b is None else f"{b / MIB:.1f}"


def one_line(r: dict, c: Optional[dict] = None) -> str:
    if r.get("status") != "ok":
        return f"  {r['provider']:<24} {r.get('status')}: {r.get('reason', '')}"
    if r["mode"] == "train":
        s = f"  {r['provider']:<24} train fwd {_ms(r['fwd'])} bwd {_ms(r['bwd'])} total {_ms(r['total'])} ms"
    else:
        s = f"  {r['provider']:<24} score fwd {_ms(r['fwd'])} ms"
    pk = _peak(r)
    s += f", peak {_mib(pk)} MiB"
    if not (r.get("mem") or {}).get("ok"):
        s += f" ({(r.get('mem') or {}).get('error', '')[:80]})"
    err = r.get("err") or {}
    if err:
        s += ", err " + " ".join(f"{k}={_e(v)}" for k, v in err.items())
    return s


def _header(result: dict) -> list[str]:
    m = result["meta"]
    dev = m["device"]
    if dev["type"] == "cuda":
        dline = f"{dev.get('name')} (sm {dev.get('capability')}, {dev.get('memory_gib')} GiB, CUDA {dev.get('cuda')})"
    else:
        dline = (
            f"{dev.get('name')}, {dev.get('cores')} cores, {dev.get('torch_threads')} torch threads, "
            f"{dev.get('memory_gib')} GiB RAM (no GPU)"
        )
    v = m["versions"]
    vers = ", ".join(f"{k} {v[k]}" for k in v if v[k])
    cfg = m["config"]
    load = ""
    if dev["type"] != "cuda" and m.get("loadavg_start") is not None:
        load = (
            f"; load average (1/5/15 min) at start {m['loadavg_start']}, at end {m.get('loadavg_end')} "
            "(anything else running on these cores slows every row)"
        )
    return [
        "# fusedrl benchmark",
        "",
        f"- device: {dline}{load}",
        f"- versions: {vers}",
        f"- fusedrl commit: `{m.get('fusedrl_describe') or m.get('fusedrl_commit') or 'unknown'}`; date {m['date']}",
        f"- command: `python -m bench {' '.join(m['argv'] or [])}`",
        f"- shapes: N={cfg['n']} H={cfg['h']} V={cfg['v']} {cfg['dtype']}; repeats {cfg['repeats']} "
        f"(+{cfg['warmup']} warm-up)",
        f"- {m['methods']['time']}",
        f"- {m['methods']['memory']}",
        f"- accuracy: {m['methods']['accuracy']}",
        f"- GEMM floor: {m['methods']['floor']}; measured before and after each shape's providers, pooled "
        f"(median)"
        + (
            "; training-step 'x floor' columns are paired: the three floor GEMMs also ran inside every "
            "timed repeat, right after the step, and the ratio is the median of the per-repeat ratios "
            "(the GEMM floor row shows the separate pooled measurement)"
            if cfg.get("paired_floor")
            else ""
        )
        + f"; TFLOP/s {m['methods']['flops']}",
        "",
    ]


def _order(result) -> dict[str, int]:
    return {p: i for i, p in enumerate(result.get("provider_order") or [])}


def _case_rows(result, c, task, mode):
    rows = [
        r
        for r in result["rows"]
        if r["task"] == task
        and r["mode"] == mode
        and r.get("status") in ("ok", "oom", "error")
        and _key(r) == (c["regime"], c["n"], c["v"])
    ]
    o = _order(result)
    return sorted(rows, key=lambda r: o.get(r["provider"], 999))


def markdown(result: dict) -> str:
    L = _header(result)
    for c in result["cases"]:
        g1, g23, g123 = _floor(c)
        nhv = float(c["n"]) * c["h"] * c["v"]
        L.append(
            f"## {c['regime']} regime, N={c['n']}, H={c['h']}, V={c['v']}, {c['dtype']}: "
            f"mean entropy {c['mean_entropy']:.3f} nats"
        )
        L.append("")
        L.append(f"Inputs {_mib(c['input_bytes'])} MiB, gradients dx+dW {_mib(c['grad_bytes'])} MiB.")
        L.append("")
        core = _case_rows(result, c, "core", "train")
        if core:
            L.append(
                "Training step: per-token logp + entropy, forward then backward with random upstream grads "
                "(times in ms, median; fwd+bwd with IQR)."
            )
            L.append("")
            L.append(
                "| provider | fwd | bwd | fwd+bwd (IQR) | TFLOP/s | x floor fwd / bwd / total | speedup vs eager "
                "| peak MiB above inputs (minus grads) | mem vs eager | err logp | err entropy | err dx | err dW |"
            )
            L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            L.append(
                f"| GEMM floor (3 GEMMs) | {_num(g1)} | {_num(g23)} | {_num(g123)} | {6 * nhv / (g123 * 1e9):.2f} "
                "| 1 / 1 / 1 | | | | | | | |"
            )
            for r in core:
                L.append(_train_line(r, loss=False))
            L.append("")
            L += _vs_base_lines(core, "forward")
        loss = _case_rows(result, c, "loss", "train")
        if loss:
            L.append(
                "GRPO-style loss step (scalar loss, forward + backward; the loss each row computes is in "
                "its note below)."
            )
            L.append("")
            L.append(
                "| provider | fwd | bwd | fwd+bwd (IQR) | TFLOP/s | x floor fwd / bwd / total | speedup vs eager "
                "| peak MiB above inputs (minus grads) | mem vs eager | err loss | err dx | err dW |"
            )
            L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for r in loss:
                L.append(_train_line(r, loss=True))
            L.append("")
        score = _case_rows(result, c, "core", "score")
        if score:
            L.append("Scoring (no-grad forward: old / reference log-probs).")
            L.append("")
            L.append(
                "| provider | ms (IQR) | TFLOP/s | x 1 GEMM | speedup vs eager | peak MiB above inputs "
                "| mem vs eager | err logp | err entropy |"
            )
            L.append("|---|---|---|---|---|---|---|---|---|")
            L.append(f"| GEMM floor (x@W^T) | {_num(g1)} | {2 * nhv / (g1 * 1e9):.2f} | 1 | | | | | |")
            for r in score:
                d = r.get("derived", {})
                err = r.get("err") or {}
                L.append(
                    f"| {r['provider']} | {_ms_iqr(r['fwd'])} | {_f(d.get('tflops'))} | {_f(d.get('x_floor'))} "
                    f"| {_f(d.get('speedup_vs_eager'))} | {_mib(_peak(r))} | {_f(d.get('mem_vs_eager'), '{:.3f}')} "
                    f"| {_e(err.get('logp'))} | {_e(err.get('entropy'))} |"
                )
            L.append("")
            L += _vs_base_lines(score, "scoring forward")
        bad = [r for r in result["rows"] if r.get("status") not in ("ok",) and _key(r) == (c["regime"], c["n"], c["v"])]
        for r in bad:
            L.append(f"- {r['provider']}: **{r['status']}**: {r.get('reason', '')}")
        if bad:
            L.append("")
    notes = {}
    for r in result["rows"]:
        notes.setdefault(r["provider"], r.get("note", ""))
    if notes:
        L.append("## Providers")
        L.append("")
        for k, v in notes.items():
            L.append(f"- `{k}`: {v}")
        L.append("")
    if result.get("skipped"):
        L.append("## Skipped")
        L.append("")
        for s in result["skipped"]:
            L.append(f"- `{s['provider']}` ({s['task']}): skipped: {s['reason']}")
        L.append("")
    return "\n".join(L)


def _vs_base_lines(rows, what: str) -> list[str]:
    """The rows timed against another provider inside the same repeats: the median per-repeat ratio."""
    out = [
        f"- `{r['provider']}` {what} / `{r['vs_base']['provider']}` {what}, both in every timed repeat (median "
        f"of the per-repeat ratios): {r['vs_base']['x_fwd']:.3f}x"
        for r in rows
        if r.get("status") == "ok" and r.get("vs_base")
    ]
    return out + [""] if out else []


def _train_line(r, loss: bool) -> str:
    if r.get("status") != "ok":
        return f"| {r['provider']} | {r.get('status')} | | | | | | | | | | |" + ("" if loss else " |")
    d = r.get("derived", {})
    err = r.get("err") or {}
    pk = _peak(r)
    pm = d.get("peak_minus_grads_bytes")
    peak = f"{_mib(pk)} ({_mib(pm)})" if pk is not None else "-"
    xf = f"{_f(d.get('x_floor_fwd'))} / {_f(d.get('x_floor_bwd'))} / {_f(d.get('x_floor'))}"
    head = (
        f"| {r['provider']} | {_ms(r['fwd'])} | {_ms(r['bwd'])} | {_ms_iqr(r['total'])} | {_f(d.get('tflops'))} "
        f"| {xf} | {_f(d.get('speedup_vs_eager'))} | {peak} | {_f(d.get('mem_vs_eager'), '{:.3f}')} "
    )
    if loss:
        return head + f"| {_e(err.get('loss'))} | {_e(err.get('dx'))} | {_e(err.get('dw'))} |"
    return head + f"| {_e(err.get('logp'))} | {_e(err.get('entropy'))} | {_e(err.get('dx'))} | {_e(err.get('dw'))} |"


def write_markdown(result: dict, out_dir: str, quiet: bool = False) -> str:
    md = markdown(result)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md + "\n")
    return md


def write_json(result: dict, out_dir: str) -> None:
    path = os.path.join(out_dir, "results.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------------
def _save_plot(fig, plt, result: dict, shape: str, out_dir: str) -> str:
    """Title (device | shape | commit | date), write plot.png into out_dir, close the figure."""
    m = result["meta"]
    fig.suptitle(
        f"fusedrl bench: {m['device'].get('name')} | {shape} | {m.get('fusedrl_describe') or ''} | {m['date'][:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    path = os.path.join(out_dir, "plot.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written: {path}"


def plot(result: dict, out_dir: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"plot skipped: matplotlib is not installed ({type(e).__name__}); pip install matplotlib"
    rows = [r for r in result["rows"] if r.get("status") == "ok" and r["mode"] == "train"]
    if not rows:
        return "plot skipped: no successful training rows"
    regimes = sorted({r["regime"] for r in rows}, key=lambda s: (s != "random", s))
    ns = sorted({r["n"] for r in rows})
    vs = sorted({r["v"] for r in rows})
    if len(ns) == 1 and len(vs) == 1:
        return _plot_bars(result, rows, regimes, out_dir, plt)
    xkey = "n" if (len(ns) > 1 or len(vs) == 1) else "v"
    other = "v" if xkey == "n" else "n"
    fig, axes = plt.subplots(2, len(regimes), figsize=(6.5 * len(regimes), 8.5), squeeze=False)
    provs = _provs(result, rows)
    cmap = plt.get_cmap("tab20")
    colors = {p: cmap(i % 20) for i, p in enumerate(provs)}
    for j, reg in enumerate(regimes):
        ax_t, ax_m = axes[0][j], axes[1][j]
        # GEMM floor
        for ov in sorted({c[other] for c in result["cases"] if c["regime"] == reg}):
            cs = sorted([c for c in result["cases"] if c["regime"] == reg and c[other] == ov], key=lambda c: c[xkey])
            if cs:
                lab = "GEMM floor (3 GEMMs)" + (
                    f" {other.upper()}={ov}" if len({c[other] for c in result["cases"]}) > 1 else ""
                )
                ax_t.plot([c[xkey] for c in cs], [_floor(c)[2] for c in cs], "k--", marker="x", label=lab)
        for p in provs:
            for ov in sorted({r[other] for r in rows if r["provider"] == p and r["regime"] == reg}):
                pts = sorted(
                    [r for r in rows if r["provider"] == p and r["regime"] == reg and r[other] == ov],
                    key=lambda r: r[xkey],
                )
                if not pts:
                    continue
                style = "-" if pts[0]["task"] == "core" else ":"
                lab = p + (f" {other.upper()}={ov}" if len({r[other] for r in rows}) > 1 else "")
                xs = [r[xkey] for r in pts]
                ax_t.plot(xs, [r["total"]["median"] for r in pts], style, marker="o", color=colors[p], label=lab)
                ax_t.fill_between(
                    xs, [r["total"]["q1"] for r in pts], [r["total"]["q3"] for r in pts], color=colors[p], alpha=0.15
                )
                mp = [(r[xkey], _peak(r) / MIB) for r in pts if _peak(r) is not None]
                if mp:
                    ax_m.plot([a for a, _ in mp], [b for _, b in mp], style, marker="o", color=colors[p], label=lab)
        ent = [c["mean_entropy"] for c in result["cases"] if c["regime"] == reg]
        ttl = f"{reg} regime (mean entropy {min(ent):.2f}-{max(ent):.2f} nats)" if ent else reg
        ax_t.set_title(f"training step time: {ttl}", fontsize=10)
        ax_m.set_title(f"peak memory above inputs: {reg} regime", fontsize=10)
        for ax in (ax_t, ax_m):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N" if xkey == "n" else "vocabulary V")
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_ylabel("fwd+bwd ms (median, IQR band)")
        ax_m.set_ylabel("MiB")
        ax_t.legend(fontsize=7)
        ax_m.legend(fontsize=7)
    cfg = result["meta"]["config"]
    return _save_plot(fig, plt, result, f"H={cfg['h']} {cfg['dtype']}", out_dir)


def _provs(result, rows) -> list[str]:
    o = _order(result)
    provs = []
    for r in sorted(rows, key=lambda r: o.get(r["provider"], 999)):
        if r["provider"] not in provs:
            provs.append(r["provider"])
    return provs


def _plot_bars(result, rows, regimes, out_dir, plt) -> str:
    """One shape: horizontal bars of training-step time (with the GEMM floor) and peak memory."""
    provs = _provs(result, rows)
    fig, axes = plt.subplots(2, len(regimes), figsize=(6.5 * len(regimes), 2.2 + 0.75 * len(provs)), squeeze=False)
    for j, reg in enumerate(regimes):
        c = next(c for c in result["cases"] if c["regime"] == reg)
        ax_t, ax_m = axes[0][j], axes[1][j]
        g123 = _floor(c)[2]
        names, times, lo, hi, mems, ratios = [], [], [], [], [], []
        for p in provs:
            r = next((r for r in rows if r["provider"] == p and r["regime"] == reg), None)
            if r is None:
                continue
            names.append(p)
            times.append(r["total"]["median"])
            ratios.append((r.get("derived") or {}).get("x_floor", r["total"]["median"] / g123))
            lo.append(r["total"]["median"] - r["total"]["q1"])
            hi.append(r["total"]["q3"] - r["total"]["median"])
            pk = _peak(r)
            mems.append(pk / MIB if pk is not None else 0.0)
        y = list(range(len(names)))
        ax_t.barh(y, times, xerr=[lo, hi], color=["C0" if n.startswith("fusedrl") else "C7" for n in names])
        ax_t.axvline(g123, color="k", ls="--", label=f"GEMM floor (3 GEMMs) {g123:.4g} ms")
        for yi, t, h, q in zip(y, times, hi, ratios):
            ax_t.text(t + h, yi, f" {q:.2f}x", va="center", fontsize=8)
        ax_m.barh(y, mems, color=["C0" if n.startswith("fusedrl") else "C7" for n in names])
        for yi, m in zip(y, mems):
            ax_m.text(m, yi, f" {m:.0f}", va="center", fontsize=8)
        gb = c["grad_bytes"] / MIB
        ax_m.axvline(gb, color="k", ls=":", label=f"dx + dW themselves ({gb:.0f} MiB)")
        for ax in (ax_t, ax_m):
            ax.set_yticks(y)
            ax.set_yticklabels(names, fontsize=8)
            ax.invert_yaxis()
            ax.grid(True, axis="x", alpha=0.3)
            ax.legend(fontsize=7, loc="best", framealpha=0.9)
        paired = result["meta"]["config"].get("paired_floor")
        ax_t.set_title(
            f"{reg} regime (mean entropy {c['mean_entropy']:.2f} nats): fwd+bwd ms, "
            f"x GEMM floor{' (paired per repeat)' if paired else ''}",
            fontsize=9,
        )
        ax_m.set_title(f"{reg} regime: peak MiB above inputs (training step)", fontsize=9)
    cfg = result["meta"]["config"]
    return _save_plot(fig, plt, result, f"N={cfg['n'][0]} H={cfg['h']} V={cfg['v'][0]} {cfg['dtype']}", out_dir)
