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
