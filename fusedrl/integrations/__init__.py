"""Trainer integrations: Hugging Face models (:mod:`.hf`), TRL (:mod:`.trl`), verl (:mod:`.verl`).

Each submodule imports its framework lazily: ``import fusedrl.integrations.trl`` works without TRL
installed (the classes / functions that need it import it when first used).
"""

from __future__ import annotations

import importlib

__all__ = ["hf", "trl", "verl"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
