"""One table of kernel codes: the Python table (fusedrl.backends.base) is what the CUDA header's enums and
the Triton constants say, and the log-ratio clamp is the same number in every language."""

from __future__ import annotations

import pathlib
import re

from fusedrl.backends import base
from fusedrl.loss import LOSS_MODES

ROOT = pathlib.Path(__file__).resolve().parents[2]
HEADER = (ROOT / "csrc" / "head_math.h").read_text()


def _enum(name: str) -> dict[str, int]:
    m = re.search(r"enum\s+" + name + r"\s*:\s*int\s*\{([^}]*)\}", HEADER)
    assert m, f"enum {name} not found in csrc/head_math.h"
    out = {}
    for item in m.group(1).split(","):
        key, val = (s.strip() for s in item.split("="))
        out[key] = int(val)
    return out


def test_mode_codes_match_the_cuda_header():
    cuda = _enum("PgMode")
    names = {"kClipped": "clipped", "kGpg": "gpg", "kCispo": "cispo", "kUnclipped": "unclipped"}
    assert {names[k]: v for k, v in cuda.items()} == base.HEAD_MODES


def test_kl_codes_match_the_cuda_header():
    cuda = _enum("KlType")
    names = {"kK1": "k1", "kAbs": "abs", "kK2": "k2", "kK3": "k3"}
    assert {names[k]: v for k, v in cuda.items()} == base.KL_TYPES


def test_log_ratio_clamp_is_one_number():
    m = re.search(r"kLogRatioClamp\s*=\s*([0-9.]+)f", HEADER)
    assert m and float(m.group(1)) == base.LOG_RATIO_CLAMP


def test_triton_constants_come_from_the_table():
    from fusedrl.backends.triton import row_math

    assert (row_math.MODE_CLIPPED, row_math.MODE_GPG, row_math.MODE_CISPO, row_math.MODE_UNCLIPPED) == tuple(
        base.HEAD_MODES[k] for k in ("clipped", "gpg", "cispo", "unclipped")
    )
    assert (row_math.KL_K1, row_math.KL_ABS, row_math.KL_K2, row_math.KL_K3) == tuple(
        base.KL_TYPES[k] for k in ("k1", "abs", "k2", "k3")
    )


def test_loss_mode_heads_name_known_modes():
    assert set(base.LOSS_MODE_HEADS) <= set(LOSS_MODES)
    assert set(base.LOSS_MODE_HEADS.values()) <= set(base.HEAD_MODES)
