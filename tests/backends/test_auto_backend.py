"""backend="auto" on CUDA: measured table per compute capability, else the unmeasured static order.

CPU only: the device capability and each backend's availability are mocked, so these run in CI and
pin the selection logic itself (fusedrl/backends/__init__.py, fusedrl/backends/auto_table.json).
"""

import json

import pytest
import torch

import fusedrl
from fusedrl import backends as B

CUDA = torch.device("cuda")
ALL = ("torch", "triton", "cuda")
AUTO_TABLE_ENV = "FUSEDRL_AUTO_TABLE"  # read through fusedrl._config ("auto_table")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("FUSEDRL_BACKEND", raising=False)
    monkeypatch.delenv(AUTO_TABLE_ENV, raising=False)
    B.clear_auto_cache()
    yield
    B.clear_auto_cache()


def _mock(monkeypatch, capability=(9, 0), available=ALL):
    """Pretend to be on a GPU of `capability` where the backends in `available` can run. Returns the
    list of capability queries made (to check caching)."""
    calls = []

    def cap(device=None):
        calls.append(device)
        if isinstance(capability, Exception):
            raise capability
        return capability

    def avail(name, device):
        if name == "reference":
            return True, ""
        if name not in B.BACKENDS:
            raise ValueError(f"backend must be one of {B.ALL_NAMES}, got {name!r}")
        return (name in available), ("" if name in available else f"{name} mocked unavailable")

    monkeypatch.setattr(torch.cuda, "get_device_capability", cap)
    monkeypatch.setattr(B, "availability", avail)
    return calls


def _table(tmp_path, entries, raw=None):
    p = tmp_path / "auto_table.json"
    p.write_text(raw if raw is not None else json.dumps({"schema": 1, "entries": entries}))
    return str(p)


ENTRY = {
    "order": ["triton", "cuda", "torch"],
    "source": "bench/results/gpu-test/results.json",
    "device": "NVIDIA H200",
    "date": "2026-01-01",
}


# --------------------------------------------------------------------------------------------------
# static order (no measurement)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "available, want",
    [
        (ALL, "cuda"),  # cuBLAS-backed schedule first
        (("torch", "triton"), "triton"),  # extension not built
        (("torch",), "torch"),
        ((), "torch"),  # nothing available: the portable name (resolve never fails for auto)
    ],
)
def test_static_order_without_table_entry(monkeypatch, tmp_path, available, want):
    monkeypatch.setenv(AUTO_TABLE_ENV, _table(tmp_path, {}))
    _mock(monkeypatch, (9, 0), available)
    assert B.resolve("auto", CUDA) == want
    order, src = B.auto_order(CUDA)
    assert order == B.STATIC_AUTO_ORDER["cuda"] == ("cuda", "triton", "torch")
    assert src.startswith("unmeasured") and "sm_90" in src


def test_cpu_auto_is_torch(monkeypatch):
    _mock(monkeypatch, (9, 0), ALL)
    assert B.resolve("auto", torch.device("cpu")) == "torch"
    assert B.auto_order(torch.device("cpu"))[0] == ("torch",)


def test_capability_query_failure_falls_back_to_static(monkeypatch, tmp_path):
    monkeypatch.setenv(AUTO_TABLE_ENV, _table(tmp_path, {"sm_90": ENTRY}))
    _mock(monkeypatch, RuntimeError("no driver"), ALL)
    assert B.arch_key(CUDA) is None
    assert B.resolve("auto", CUDA) == "cuda"
    assert B.auto_order(CUDA)[1].startswith("unmeasured")


# --------------------------------------------------------------------------------------------------
# measured table
# --------------------------------------------------------------------------------------------------
def test_measured_entry_for_the_arch_wins(monkeypatch, tmp_path):
    monkeypatch.setenv(AUTO_TABLE_ENV, _table(tmp_path, {"sm_90": ENTRY}))
    _mock(monkeypatch, (9, 0), ALL)
    assert B.resolve("auto", CUDA) == "triton"
    order, src = B.auto_order(CUDA)
    assert order == ("triton", "cuda", "torch")
    assert src.startswith("measured (sm_90)") and ENTRY["source"] in src
    info = B.auto_choice(CUDA)
    assert info["measured"] and info["arch"] == "sm_90" and info["choice"] == "triton"


def test_measured_entry_falls_through_unavailable_and_appends_unlisted(monkeypatch, tmp_path):
    entry = dict(ENTRY, order=["triton"])  # only one backend measured: the rest follow in static order
    monkeypatch.setenv(AUTO_TABLE_ENV, _table(tmp_path, {"sm_90": entry}))
    _mock(monkeypatch, (9, 0), ("torch", "cuda"))
    assert B.auto_order(CUDA)[0] == ("triton", "cuda", "torch")
    assert B.resolve("auto", CUDA) == "cuda"


def test_other_arch_uses_static_order(monkeypatch, tmp_path):
    monkeypatch.setenv(AUTO_TABLE_ENV, _table(tmp_path, {"sm_90": ENTRY}))
    _mock(monkeypatch, (8, 0), ALL)
    assert B.arch_key(CUDA) == "sm_80"
    assert B.resolve("auto", CUDA) == "cuda"
    assert "no measured entry for sm_80" in B.auto_order(CUDA)[1]


def test_env_override_beats_the_table(monkeypatch, tmp_path):
    monkeypatch.setenv(AUTO_TABLE_ENV, _table(tmp_path, {"sm_90": ENTRY}))
    _mock(monkeypatch, (9, 0), ("torch", "triton"))
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    assert B.resolve("auto", CUDA) == "torch"
    assert B.auto_choice(CUDA)["env_override"] == "torch"
    monkeypatch.setenv("FUSEDRL_BACKEND", "cuda")  # an explicit choice is checked: no quiet fallback
    with pytest.raises(B.BackendUnavailable, match="cuda"):
        B.resolve("auto", CUDA)
    assert B.auto_choice(CUDA)["choice"].startswith("error:")
    monkeypatch.setenv("FUSEDRL_BACKEND", "auto")  # 'auto' in the variable means: no override
    assert B.resolve("auto", CUDA) == "triton"


@pytest.mark.parametrize(
    "raw, entries, needle",
    [
        ("{not json", None, "cannot read"),
        (None, {"sm_90": dict(ENTRY, order=["triton", "flash"])}, "unknown backend"),
        (None, {"sm_90": dict(ENTRY, order=[])}, "non-empty list"),
        (None, {"sm_90": {"order": ["triton"]}}, "'source'"),
        (None, {"hopper": ENTRY}, "compute capability"),
        (None, {"sm_90": dict(ENTRY, order=["triton", "triton"])}, "repeats"),
    ],
)
def test_bad_table_is_ignored_with_the_reason(monkeypatch, tmp_path, raw, entries, needle):
    monkeypatch.setenv(AUTO_TABLE_ENV, _table(tmp_path, entries, raw))
    _mock(monkeypatch, (9, 0), ALL)
    assert B.resolve("auto", CUDA) == "cuda"  # never raises: the static order stands
    order, src = B.auto_order(CUDA)
    assert order == B.STATIC_AUTO_ORDER["cuda"] and needle in src


def test_table_can_be_switched_off_or_missing(monkeypatch, tmp_path):
    _mock(monkeypatch, (9, 0), ALL)
    monkeypatch.setenv(AUTO_TABLE_ENV, "off")
    assert B.resolve("auto", CUDA) == "cuda" and "disables" in B.auto_order(CUDA)[1]
    B.clear_auto_cache()
    monkeypatch.setenv(AUTO_TABLE_ENV, str(tmp_path / "missing.json"))
    assert B.resolve("auto", CUDA) == "cuda" and "no table" in B.auto_order(CUDA)[1]


def test_resolve_is_cheap_after_the_first_call(monkeypatch, tmp_path):
    monkeypatch.setenv(AUTO_TABLE_ENV, _table(tmp_path, {"sm_90": ENTRY}))
    calls = _mock(monkeypatch, (9, 0), ALL)
    for _ in range(5):
        assert B.resolve("auto", CUDA) == "triton"
    assert len(calls) == 1  # one driver query per device, then the cached order
    assert len(B._tables) == 1


def test_committed_table_is_valid():
    """fusedrl/backends/auto_table.json parses and every entry names known backends and a source."""
    with open(B.AUTO_TABLE_PATH) as f:
        data = json.load(f)
    assert isinstance(data.get("entries"), dict)
    for arch, entry in data["entries"].items():
        assert B.validate_table_entry(arch, entry) == "", (arch, entry)
    entries, problems = B.load_auto_table(B.AUTO_TABLE_PATH)
    assert problems == "" and set(entries) == set(data["entries"])


# --------------------------------------------------------------------------------------------------
# traceability: resolve stays a trace-time constant under torch.compile
# --------------------------------------------------------------------------------------------------
def test_resolve_auto_under_torch_compile(monkeypatch, tmp_path):
    monkeypatch.setenv(AUTO_TABLE_ENV, _table(tmp_path, {"sm_90": ENTRY}))

    def f(x):
        name = B.resolve("auto", x.device)  # file read + availability checks run at trace time only
        return x * (2.0 if name == "torch" else 3.0)

    x = torch.randn(4)
    out = torch.compile(f, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(out, x * 2.0)
    lp, _ = torch.compile(lambda h, w, t: fusedrl.linear_logprob_entropy(h, w, t), backend="eager", fullgraph=True)(
        torch.randn(3, 8), torch.randn(11, 8), torch.tensor([0, 5, 10])
    )
    assert lp.shape == (3,) and torch.isfinite(lp).all()


# --------------------------------------------------------------------------------------------------
# the measured entry: bench/sweep.py --auto-entry turns a GPU bench run + its sweep into a table entry
# --------------------------------------------------------------------------------------------------
def _bench_json(tmp_path, capability="9.0", ms=None):
    ms = ms or {"cuda": 80.0, "triton": 60.0, "torch": 900.0}
    rows = []
    for regime in ("random", "peaked"):
        for b, t in ms.items():
            rows.append(
                dict(
                    provider=f"fusedrl-{b}", task="core", mode="train", status="ok", regime=regime, total={"median": t}
                )
            )
        rows.append(
            dict(
                provider="fusedrl-triton+filter",
                task="core",
                mode="train",
                status="ok",
                regime=regime,
                total={"median": 1.0},
            )
        )  # filtered rows never rank
    res = dict(
        meta=dict(
            device=dict(type="cuda", name="NVIDIA H200", capability=capability),
            date="2026-12-01T00:00:00+00:00",
            fusedrl_commit="abc",
            config=dict(n=[8192], h=4096, v=[151936], dtype="bf16"),
        ),
        rows=rows,
    )
    p = tmp_path / "results.json"
    p.write_text(json.dumps(res))
    return str(p)


def _sweep_json(tmp_path, verdicts, arch="sm_90"):
    rows = [dict(part="core", regime="random", impl=b, backend=b, verdict=v) for b, v in verdicts.items()]
    p = tmp_path / "sweep.json"
    p.write_text(json.dumps(dict(meta=dict(device=dict(arch=arch)), rows=rows)))
    return str(p)


def _sweep_module():
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import sweep

    return sweep


def test_auto_entry_ranks_passing_backends_and_round_trips(monkeypatch, tmp_path):
    sweep = _sweep_module()
    bench = _bench_json(tmp_path)
    sw = _sweep_json(tmp_path, {"cuda": "pass", "triton": "FAIL", "torch": "pass"})
    res = sweep.auto_entry(bench, sw, source="bench/results/gpu-test/results.json")
    assert res["arch"] == "sm_90"
    e = res["entry"]
    assert e["order"] == ["cuda", "torch"]  # triton is faster but failed the sweep
    assert "triton" in e["excluded"] and e["measured_ms"]["cuda"] == 160.0
    table = tmp_path / "table.json"
    sweep.write_table(str(table), res["arch"], e)
    monkeypatch.setenv(AUTO_TABLE_ENV, str(table))
    _mock(monkeypatch, (9, 0), ALL)
    assert B.resolve("auto", CUDA) == "cuda"
    assert B.auto_order(CUDA)[0] == ("cuda", "torch", "triton")


def test_auto_entry_refuses_cpu_runs_and_mismatched_devices(tmp_path):
    sweep = _sweep_module()
    bench = _bench_json(tmp_path)
    with pytest.raises(SystemExit, match="same device"):
        sweep.auto_entry(bench, _sweep_json(tmp_path, {"cuda": "pass"}, arch="sm_80"))
    res = json.loads(open(bench).read())
    res["meta"]["device"] = {"type": "cpu", "name": "AMD EPYC"}
    (tmp_path / "results.json").write_text(json.dumps(res))
    with pytest.raises(SystemExit, match="not a CUDA run"):
        sweep.auto_entry(bench, None)
