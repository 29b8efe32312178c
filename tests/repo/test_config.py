"""Environment variables: one module reads them, one parser whose errors name the variable, at most ten
documented runtime variables, and the README documents exactly those."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

import fusedrl
from fusedrl import _config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_at_most_ten_runtime_variables_all_documented():
    names = [v.name for v in _config.runtime_table()]
    assert len(names) <= 10
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(FUSEDRL_[A-Z0-9_]+)`", readme, re.M))
    assert documented == set(names), documented ^ set(names)


@pytest.mark.parametrize(
    "key, raw",
    [
        ("backend", "bogus"),
        ("schedule", "fast"),
        ("memory_budget_mb", "abc"),
        ("memory_budget_mb", "-5"),
        ("memory_budget_mb", "0"),
        ("memory_budget_mb", "nan"),
        ("check_inputs", "maybe"),
        ("deterministic", "2"),
        ("grad_filter_eps", "-1"),
        ("triton_fp32_precision", "fp16"),
        ("cpu_workspace_cache", "sometimes"),
    ],
)
def test_malformed_value_names_the_variable(monkeypatch, key, raw):
    name = _config.name(key)
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=re.escape(name)):
        _config.get(key)


def test_values_parse(monkeypatch):
    monkeypatch.setenv("FUSEDRL_MEMORY_BUDGET_MB", "inf")
    assert _config.get("memory_budget_mb") == float("inf")
    monkeypatch.setenv("FUSEDRL_CHECK_INPUTS", " On ")
    assert _config.get("check_inputs") is True
    monkeypatch.setenv("FUSEDRL_SCHEDULE", "RECOMPUTE")
    assert _config.get("schedule") == "recompute"
    monkeypatch.setenv("FUSEDRL_SCHEDULE", "")
    assert _config.get("schedule") == "auto"  # empty = unset


def test_errors_at_use_name_the_variable(monkeypatch):
    """A bad variable surfaces where it is read, naming it (not as an unrelated argument error)."""
    x, w, t = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    monkeypatch.setenv("FUSEDRL_GRAD_FILTER_EPS", "-1")
    with pytest.raises(ValueError, match="FUSEDRL_GRAD_FILTER_EPS"):
        fusedrl.linear_logprob_entropy(x, w, t)
    monkeypatch.delenv("FUSEDRL_GRAD_FILTER_EPS")
    monkeypatch.setenv("FUSEDRL_BACKEND", "cuda")  # a valid name that cannot run here
    if torch.cuda.is_available():
        pytest.skip("needs a machine where the cuda backend is unavailable")
    with pytest.raises(fusedrl.BackendUnavailable, match="FUSEDRL_BACKEND"):
        fusedrl.linear_logprob_entropy(x, w, t)
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    monkeypatch.setenv("FUSEDRL_MEMORY_BUDGET_MB", "zero")
    old, adv, mask = torch.zeros(4), torch.ones(4), torch.ones(4, dtype=torch.bool)
    xr = x.clone().requires_grad_()
    with pytest.raises(ValueError, match="FUSEDRL_MEMORY_BUDGET_MB"):
        fusedrl.fused_policy_loss(xr, w, t, old, adv, mask)


def test_setup_reads_through_config():
    text = (ROOT / "setup.py").read_text()
    assert "os.environ" not in text and "os.getenv" not in text
