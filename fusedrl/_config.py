"""Every environment variable fusedrl reads, read here and nowhere else, through one parser.

Ten runtime variables change defaults; each has an argument that wins over it. The install-time
variables are read by ``setup.py`` through this module too (it loads this file by path: no torch
import here), and three variables of other tools (Triton's interpreter switch, the CUDA toolkit
location) are read here as well so that no other module touches ``os.environ``.

Other modules ask by short key (``get("backend")`` reads the backend override), so the variables'
names appear in this module only; :func:`name` gives a variable's name for messages. A malformed value
raises ``ValueError`` naming the variable and what it accepts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["VARS", "Var", "get", "is_set", "name", "runtime_table", "temporary_environ"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Var:
    """One environment variable: its short key, kind, default and what it does; fusedrl's own are named
    ``FUSEDRL_<KEY>``, other tools' by ``env``."""

    key: str
    kind: str  # "bool" | "choice" | "float" | "str"
    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    minimum: Optional[float] = None  # floats: smallest accepted value
    exclusive: bool = False  # floats: the minimum itself is refused
    scope: str = "runtime"  # "runtime" | "install" | "external"
    env: Optional[str] = None  # the variable's name when it is not FUSEDRL_<KEY>

    @property
    def name(self) -> str:
        return self.env or "FUSEDRL_" + self.key.upper()


VARS: dict[str, Var] = {
    v.key: v
    for v in (
        Var(
            "backend",
            "choice",
            None,
            'what `backend="auto"` resolves to (every layer: core op, loss-head kernels, one-pass epilogue)',
            choices=("auto", "torch", "triton", "cuda", "reference"),
        ),
        Var("schedule", "choice", "auto", 'what `schedule="auto"` takes', choices=("auto", "one_pass", "recompute")),
        Var(
            "memory_budget_mb",
            "float",
            None,
            "default `memory_budget_mb` of the fused loss (`inf`: no limit)",
            minimum=0.0,
            exclusive=True,
        ),
        Var("check_inputs", "bool", False, "host-syncing value checks on accelerators too (always on for CPU tensors)"),
        Var("deterministic", "bool", True, "default `deterministic`; 0 lets triton use its fp32-atomic backward"),
        Var(
            "grad_filter_eps",
            "float",
            0.0,
            "default `grad_filter_eps` (triton: skip backward vocabulary tiles with |dz| < eps)",
            minimum=0.0,
        ),
        Var("auto_table", "str", None, "another measured `auto` table file, or `off` for the static order"),
        Var(
            "triton_fp32_precision",
            "choice",
            "tf32x3",
            "`tl.dot` precision for fp32 inputs",
            choices=("ieee", "tf32x3", "tf32"),
        ),
        Var("triton_autotune", "bool", False, "autotune the triton kernels (GPU only)"),
        Var(
            "cpu_workspace_cache",
            "bool",
            True,
            "keep the one-pass CPU workspace between calls (`fusedrl.onepass.release_workspace()` frees it)",
        ),
        # read by setup.py
        Var("cuda_archs", "str", "80;90a", "CUDA architectures of the extension", scope="install"),
        Var("skip_cuda_build", "bool", False, "pure-Python install", scope="install"),
        Var(
            "require_cuda_build", "bool", False, "fail the install when the extension cannot be built", scope="install"
        ),
        Var("build_jobs", "str", None, "parallel compile jobs (else MAX_JOBS, else the CPU count)", scope="install"),
        Var("cmake_build_dir", "str", None, "CMake build tree (default build/cmake-<python tag>)", scope="install"),
        # other tools' variables
        Var(
            "triton_interpret",
            "bool",
            False,
            "Triton kernels run on CPU tensors in the interpreter",
            scope="external",
            env="TRITON_INTERPRET",
        ),
        Var("cuda_home", "str", None, "CUDA toolkit location (cuBLAS, nvcc)", scope="external", env="CUDA_HOME"),
        Var("cuda_path", "str", None, "CUDA toolkit location (cuBLAS, nvcc)", scope="external", env="CUDA_PATH"),
        Var("cudacxx", "str", None, "the nvcc to build with", scope="external", env="CUDACXX"),
        Var("max_jobs", "str", None, "parallel compile jobs", scope="external", env="MAX_JOBS"),
    )
}


def _bad(var: Var, raw: str, what: str) -> ValueError:
    return ValueError(f"environment variable {var.name}={raw!r}: {what}")


def _parse(var: Var, raw: str) -> Any:
    text = raw.strip()
    if var.kind == "bool":
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise _bad(var, raw, f"must be one of {_TRUE + _FALSE}")
    if var.kind == "choice":
        low = text.lower()
        if low not in var.choices:
            raise _bad(var, raw, f"must be one of {var.choices}")
        return low
    if var.kind == "float":
        try:
            value = float(text)
        except ValueError:
            raise _bad(var, raw, "must be a number") from None
        if math.isnan(value) or (
            var.minimum is not None and (value < var.minimum or (var.exclusive and value == var.minimum))
        ):
            sign = ">" if var.exclusive else ">="
            raise _bad(var, raw, f"must be a number {sign} {var.minimum:g}")
        return value
    return text


def name(key: str) -> str:
    """The environment variable's name (for messages)."""
    return VARS[key].name


def get(key: str) -> Any:
    """The parsed value of the variable ``key`` (its default when unset or empty). ``ValueError`` names
    the variable when its value is malformed."""
    var = VARS[key]
    raw = os.environ.get(var.name)
    if raw is None or not raw.strip():
        return var.default
    return _parse(var, raw)


def is_set(key: str) -> bool:
    """Whether the variable ``key`` holds a non-empty value."""
    raw = os.environ.get(VARS[key].name)
    return raw is not None and bool(raw.strip())


def runtime_table() -> list[Var]:
    """The documented runtime variables (README's table), in order."""
    return [v for v in VARS.values() if v.scope == "runtime"]


@contextmanager
def temporary_environ(**values: Optional[str]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables (by their full names) inside the block and restore
    them after: for spawned measurement children, which inherit the environment."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
