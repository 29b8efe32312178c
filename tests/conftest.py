"""Test configuration.

Without a GPU the triton backend runs in the interpreter: TRITON_INTERPRET must be set before any
module imports triton, which is why it happens here, at collection time.
"""

import os
import sys

import torch

# the shared helpers (_factory.py, _dist.py) live beside this file; the tests live in subdirectories
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _inductor_cache_dir() -> str:
    """A compile cache per state of fusedrl's sources: torch's FX graph cache does not key on a custom op's
    fake implementation, so compiled graphs cached before an op's outputs changed (e.g. a metric added to
    the one-pass op) would be reused and fail their size asserts."""
    import hashlib
    import tempfile

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fusedrl")
    h = hashlib.sha1()
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith(".py"):
                with open(os.path.join(d, f), "rb") as fh:
                    h.update(fh.read())
    return os.path.join(tempfile.gettempdir(), f"fusedrl-inductor-{h.hexdigest()[:12]}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache_dir())

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--aot-timeout", type=float, default=None, help="hang guard (s) of each AOT-gate worker")
    parser.addoption("--aot-dump", default=None, help="write the AOT gate's per-case table to this JSON file")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
