"""The backend contract: what every backend module provides, the kernel code tables, the one-pass head.

A backend (``torch_backend``, the ``triton`` and ``cuda`` packages) is a module satisfying
:class:`Backend`: the core op's forward / backward over hidden states and weight, the same over given
logits, and the one-pass schedule's row epilogue. The registry (``fusedrl/backends/__init__.py``)
loads them by name; ``backend=`` picks one for every layer at once.

The code tables (:data:`HEAD_MODES`, :data:`KL_TYPES`, :data:`LOSS_MODE_HEADS`) and the log-ratio
clamp :data:`LOG_RATIO_CLAMP` are defined here once for Python and Triton; ``csrc/head_math.h``
holds the same enums for CUDA (a test reads the header and compares).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Protocol, Union, runtime_checkable

import torch

Tensor = torch.Tensor

#: log-ratio clamp of every importance ratio ``exp(clamp(logp - old, -20, 20))`` (verl's bound)
LOG_RATIO_CLAMP = 20.0

#: ``workspace_mb=inf`` (no limit) in bytes: above any buffer, still an integer the tile plans divide
NO_LIMIT_BYTES = 2**62


def workspace_bytes(workspace_mb: float) -> int:
    """The ``workspace_mb`` option (MiB, > 0) in bytes; ``inf`` is no limit (:data:`NO_LIMIT_BYTES`)."""
    return NO_LIMIT_BYTES if workspace_mb == float("inf") else min(NO_LIMIT_BYTES, int(workspace_mb * 2**20))


#: ``OnePassHead.mode`` codes (csrc/head_math.h ``PgMode``; ``triton/row_math.py`` ``MODE_*``): clipped surrogate
#: (vanilla / Clip-Cov unselected), gpg, cispo, unclipped ``-A r`` (KL-Cov unselected)
HEAD_MODES = {"clipped": 0, "gpg": 1, "cispo": 2, "unclipped": 3}
#: ``OnePassHead.kl_type`` codes (csrc/head_math.h ``KlType``; ``triton/row_math.py`` ``KL_*``)
KL_TYPES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}
#: the kernel head of each loss mode the kernels compute (the selection modes: their unselected terms)
LOSS_MODE_HEADS = {"vanilla": "clipped", "clip_cov": "clipped", "gpg": "gpg", "cispo": "cispo", "kl_cov": "unclipped"}


class OnePassHead(NamedTuple):
    """Per-chunk loss head of the one-pass epilogue (docs/one-pass.md, "Head coefficients").

    ``mode``: 0 clipped surrogate (vanilla; Clip-Cov unselected with ``dual=False``), 1 gpg, 2 cispo,
    3 unclipped ``-A r`` (KL-Cov unselected), or a name of :data:`HEAD_MODES`.
    ``clip_lo = 1 - clip_ratio_low``, ``clip_hi = 1 + clip_ratio_high``; ``clip_c`` the dual-clip bound
    (read iff ``dual``). ``ent_coef``: entropy bonus (``g_H = -w ent_coef``). ``kl_coef``, ``kl_type``
    (0 k1, 1 abs, 2 k2, 3 k3, or a name of :data:`KL_TYPES`), ``kl_st`` (straight-through ``+``
    variants: the k2 gradient). ``old``, ``adv``, ``weight``: ``[Nc]`` float tensors (``weight`` = the
    aggregation weight, 0 at masked tokens, where ``old`` / ``adv`` / ``ref`` are never read). ``ref``:
    ``[Nc]`` or None (needed iff ``kl_coef != 0``). ``need_ent``: return the entropy even when
    ``ent_coef == 0``.
    """

    mode: Union[int, str]
    clip_lo: float
    clip_hi: float
    clip_c: Optional[float]
    dual: bool
    ent_coef: float
    kl_coef: float
    kl_type: Union[int, str]
    kl_st: bool
    old: Tensor
    adv: Tensor
    weight: Tensor
    ref: Optional[Tensor]
    need_ent: bool


class EpilogueArgs(NamedTuple):
    """:func:`check_epilogue`'s normalised arguments (every tensor contiguous, on u's device)."""

    n: int  # rows Nc
    v: int  # columns V
    targets: Tensor  # int64 [n]
    bias: Optional[Tensor]  # [v], fp32 (or its own dtype with bias_dtype=None)
    temperature: float  # the scalar T (1.0 when per-token)
    temp_vec: Optional[Tensor]  # fp32 [n] per-token T, or None
    softcap: Optional[float]
    mode: int  # HEAD_MODES code
    clip_lo: float
    clip_hi: float
    clip_c: float  # the bound when dual, else 1.0 (never read)
    dual: bool
    ent_coef: float
    kl_coef: float
    kl_type: int  # KL_TYPES code
    kl_st: bool
    old: Tensor  # fp32 [n]
    adv: Tensor  # fp32 [n]
    weight: Tensor  # fp32 [n]
    ref: Optional[Tensor]  # fp32 [n] iff kl_coef != 0
    has_ent: bool  # entropy computed and returned (need_ent or an entropy bonus)
    du16: Optional[Tensor]  # as given (bf16 / fp16 [n, v], unit column stride)


_WHERE = "onepass_epilogue"


def check_temperature(temperature, n: int, device: torch.device, where: str) -> tuple[float, Optional[Tensor]]:
    """``(scalar, per_row)`` of a backend ``temperature`` argument: a number > 0 gives ``(T, None)``; a
    tensor (one temperature per row: 1-D, length ``n``, on ``device``, a real dtype) gives
    ``(1.0, its detached fp32 contiguous copy)``. Per-row values are not checked for > 0 here (that
    would be a host sync; the public ops check them): a non-positive one gives inf / NaN in its row."""
    if isinstance(temperature, Tensor):
        t = temperature
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"{where}: temperature tensor must be real (fp32), got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(
                f"{where}: per-token temperature must have shape [{n}] (one per row), got {tuple(t.shape)}"
            )
        if t.device != device:
            raise ValueError(f"{where}: temperature is on {t.device}, the rows on {device}")
        return 1.0, t.detach().to(torch.float32).contiguous()
    try:
        v = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: temperature must be a float > 0 or a tensor of shape [{n}], got {type(temperature).__name__}"
        ) from None
    if not v > 0:
        raise ValueError(f"{where}: temperature must be > 0, got {temperature!r}")
    return v, None


def head_code(value, names: dict, what: str) -> int:
    """The integer code of ``head.<what>`` given as a name of ``names`` or as a code."""
    code = names.get(value) if isinstance(value, str) else value
    if isinstance(code, bool) or not isinstance(code, int) or code not in names.values():
        raise ValueError(f"{_WHERE}: head.{what} must be one of {names} (name or code), got {value!r}")
    return int(code)


def _vec(name: str, t, n: int, dev: torch.device, dtype: torch.dtype, keep_dtype: bool = False) -> Tensor:
    """A ``[n]`` tensor on ``dev`` as a contiguous ``dtype`` copy (a view when it already is one);
    ``keep_dtype``: contiguous in its own dtype (of ``dtype``'s kind)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{_WHERE}: {name} must be a tensor [{n}], got {type(t).__name__}")
    if tuple(t.shape) != (n,):
        raise ValueError(f"{_WHERE}: {name} must have shape [{n}], got {tuple(t.shape)}")
    if t.device != dev:
        raise ValueError(f"{_WHERE}: {name} is on {t.device}, the workspace u on {dev}")
    want_float = dtype.is_floating_point
    if t.dtype == torch.bool or t.is_complex() or t.dtype.is_floating_point != want_float:
        kind = "floating point" if want_float else "integer"
        raise TypeError(f"{_WHERE}: {name} must be {kind}, got {t.dtype}")
    return t.detach().contiguous() if keep_dtype else t.detach().to(dtype).contiguous()


def check_epilogue(
    u: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature,
    softcap: Optional[float],
    head,
    du16: Optional[Tensor] = None,
    bias_dtype: Optional[torch.dtype] = torch.float32,
) -> EpilogueArgs:
    """Validate the one-pass epilogue's arguments (docs/one-pass.md, "The row epilogue contract") and
    return them normalised. Bad input raises TypeError (wrong type / dtype) or ValueError (shape, device,
    value), naming the argument. ``head``: an :class:`OnePassHead` or any object with its fields.
    ``bias_dtype``: the returned bias's dtype; None keeps the caller's (a kernel that upcasts on load)."""
    if not isinstance(u, Tensor) or u.dtype != torch.float32 or u.dim() != 2:
        raise TypeError(
            f"{_WHERE}: u must be a 2-D float32 tensor, got "
            f"{getattr(u, 'dtype', type(u).__name__)} of shape {tuple(getattr(u, 'shape', ()))}"
        )
    n, v = u.shape
    if v == 0:
        raise ValueError(f"{_WHERE}: u must have at least one column (V > 0)")
    if n > 0 and v > 1 and u.stride(1) != 1:
        raise ValueError(f"{_WHERE}: u must have unit column stride, got strides {tuple(u.stride())}")
    dev = u.device
    t_scalar, t_vec = check_temperature(temperature, n, dev, _WHERE)
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"{_WHERE}: softcap must be > 0 or None, got {softcap!r}")
    missing = [f for f in OnePassHead._fields if not hasattr(head, f)]
    if missing:
        raise TypeError(
            f"{_WHERE}: head must be an OnePassHead (fusedrl.backends.base), got "
            f"{type(head).__name__} lacking fields {missing}"
        )
    mode = head_code(head.mode, HEAD_MODES, "mode")
    kl_type = head_code(head.kl_type, KL_TYPES, "kl_type")
    dual = bool(head.dual)
    if dual and head.clip_c is None:
        raise ValueError(f"{_WHERE}: head.dual needs head.clip_c (the dual-clip bound)")
    kl_coef, ent_coef = float(head.kl_coef), float(head.ent_coef)
    if kl_coef != 0.0 and head.ref is None:
        raise ValueError(f"{_WHERE}: head.kl_coef != 0 needs head.ref (reference log-probs)")
    tg = _vec("targets", targets, n, dev, torch.int64)
    old, adv, weight = (_vec(f"head.{k}", getattr(head, k), n, dev, torch.float32) for k in ("old", "adv", "weight"))
    ref = _vec("head.ref", head.ref, n, dev, torch.float32) if kl_coef != 0.0 else None
    b = (
        _vec("bias", bias, v, dev, bias_dtype or torch.float32, keep_dtype=bias_dtype is None)
        if bias is not None
        else None
    )
    if du16 is not None:
        if not isinstance(du16, Tensor) or du16.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(
                f"{_WHERE}: du16 must be a float16 or bfloat16 tensor, got "
                f"{getattr(du16, 'dtype', type(du16).__name__)}"
            )
        if tuple(du16.shape) != (n, v) or du16.device != dev:
            raise ValueError(f"{_WHERE}: du16 must be [{n}, {v}] on {dev}, got {tuple(du16.shape)} on {du16.device}")
        if n > 0 and v > 1 and du16.stride(1) != 1:
            raise ValueError(f"{_WHERE}: du16 must have unit column stride, got strides {tuple(du16.stride())}")
    return EpilogueArgs(
        n=n,
        v=v,
        targets=tg,
        bias=b,
        temperature=t_scalar,
        temp_vec=t_vec,
        softcap=float(softcap) if softcap is not None else None,
        mode=mode,
        clip_lo=float(head.clip_lo),
        clip_hi=float(head.clip_hi),
        clip_c=float(head.clip_c) if dual else 1.0,
        dual=dual,
        ent_coef=ent_coef,
        kl_coef=kl_coef,
        kl_type=kl_type,
        kl_st=bool(head.kl_st),
        old=old,
        adv=adv,
        weight=weight,
        ref=ref,
        has_ent=bool(head.need_ent) or ent_coef != 0.0,
        du16=du16,
    )


# --------------------------------------------------------------------------------------------------
# The contract
# --------------------------------------------------------------------------------------------------


class EpilogueHead(NamedTuple):
    """What the one-pass row epilogue needs from the loss head for one chunk.

    ``codes``: the head as the kernels' formula set (:class:`OnePassHead`), or None when the loss
    config has none (then only the torch epilogue can serve it). ``grads``: the head as torch
    autograd, ``grads(logp, entropy) -> (g_lp, g_H or None)`` for the chunk's rows; the torch epilogue
    calls it. ``need_ent``: the entropy is computed (returned or read by the head). ``need_dh``: the
    entropy change :func:`entropy_change` is returned in ``EpilogueOut.dh`` (its two row sums are only
    accumulated when asked; the entropy is then computed and returned too).
    """

    codes: Optional[OnePassHead]
    grads: Optional[Callable[[Tensor, Optional[Tensor]], tuple[Tensor, Optional[Tensor]]]]
    need_ent: bool
    need_dh: bool = False


class _EpilogueFields(NamedTuple):
    logp: Tensor
    ent: Optional[Tensor]
    lse: Tensor
    g_lp: Optional[Tensor]
    g_H: Optional[Tensor]
    du: Optional[Tensor]  # the buffer holding du (``u`` for the kernels, or ``du16`` alone under the lean
    # store ``store_du32=False``; None when no gradient was formed)


class EpilogueOut(_EpilogueFields):
    """A row epilogue's per-row outputs (``[Nc]``; fp32, the torch epilogue fp64 for fp64 inputs); ``u``
    then holds ``du`` (the kernel epilogues' lean store for 16-bit inputs writes it to ``du16`` only).
    ``g_lp`` / ``g_H``: the head's per-row gradients (``g_H`` None without entropy).

    ``dh``: the entropy change (:func:`entropy_change`) when ``EpilogueHead.need_dh``, else None. An
    attribute beside the six tuple fields ``(logp, ent, lse, g_lp, g_H, du)``, so that code unpacking
    those six keeps working; ``EpilogueOut(logp, ent, lse, g_lp, g_H, du, dh)`` builds one.
    """

    dh: Optional[Tensor] = None  # the default of instances built by _make / _replace

    def __new__(cls, logp, ent, lse, g_lp, g_H, du, dh: Optional[Tensor] = None):
        out = super().__new__(cls, logp, ent, lse, g_lp, g_H, du)
        out.dh = dh
        return out


def wants_dh(head) -> bool:
    """Whether an epilogue ``head`` (an :class:`EpilogueHead`, or a bare :class:`OnePassHead`: never) asks
    for the entropy change."""
    return bool(getattr(head, "need_dh", False))


# --------------------------------------------------------------------------------------------------
# The entropy change (docs/backends.md, "The entropy change dH")
# --------------------------------------------------------------------------------------------------


def entropy_change(logp: Tensor, ent: Tensor, sq: Tensor) -> Tensor:
    """``dH = d/deta H(softmax(z + eta (e_a - p)))|_0 = sum_v p_v^2 (log p_v + H) - p_a (log p_a + H)``
    per row: the first-order change of the full-vocabulary entropy when the row's logits move along the
    gradient of its own log-prob (``a`` the target).

    ``logp``, ``ent``: ``[N]`` (log p_a, H); ``sq``: ``[2, N]`` the row sums a backend's forward returns
    with ``return_entropy_change=True``: ``sq[0] = sum_v p_v^2``, ``sq[1] = sum_v p_v^2 (log p_v + H)``.
    A target of probability 0 (a ``-inf`` logit) contributes 0, never ``0 * inf``. Same dtype as ``logp``.
    """
    p = torch.exp(logp)
    own = torch.where(p > 0, p * (logp + ent), torch.zeros_like(p))
    return sq[1] - own


@runtime_checkable
class Backend(Protocol):
    """A backend module. Shapes: ``x [N, H]``, ``w [V, H]``, ``targets [N]`` int64, ``bias [V]`` or
    None; ``temperature`` a float > 0 or a per-row fp32 ``[N]`` tensor; ``softcap`` a float or None.
    Outputs and per-row statistics are fp32 (fp64 for fp64 inputs)."""

    def is_available(self, device: torch.device) -> tuple[bool, str]:
        """``(usable here, why not)``."""

    def forward(
        self,
        x,
        w,
        targets,
        bias,
        temperature,
        softcap,
        return_entropy,
        vocab_start=0,
        return_entropy_change=False,
        **opts,
    ):
        """``(lse, z_target, entropy or None)`` per row, logits never stored. ``vocab_start``: this
        shard's first global id (vocab-parallel); targets outside the shard read a target logit of 0.

        ``return_entropy_change=True``: ``(lse, z_target, entropy, sq)``, the entropy always computed and
        ``sq [2, N]`` (the stats dtype) the two extra row sums of the entropy change over this shard's own
        softmax: ``sq[0] = sum_v p_v^2``, ``sq[1] = sum_v p_v^2 (log p_v + H)``. They merge across vocab
        shards (``fusedrl.distributed.merge_shard_stats``); on the full vocabulary
        ``entropy_change(z_target - lse, entropy, sq)`` is ``dH`` (:func:`entropy_change`). The sums are
        accumulated only when asked: False costs nothing and returns the 3-tuple, bitwise as before."""

    def backward(
        self,
        x,
        w,
        targets,
        bias,
        temperature,
        softcap,
        lse,
        ent,
        g_lp,
        g_H,
        vocab_start=0,
        need_dx=True,
        need_dw=True,
        need_db=True,
        **opts,
    ):
        """``(dx, dw, db)`` (None where not needed) for upstream ``g_lp`` and ``g_H`` (None: no entropy
        term), logits recomputed."""

    def logits_forward(
        self, logits, targets, temperature, softcap, return_entropy, return_entropy_change=False, **opts
    ):
        """``forward`` over given logits ``[N, V]`` (``return_entropy_change`` as there)."""

    def logits_backward(self, logits, targets, temperature, softcap, lse, ent, g_lp, g_H, inplace=False, **opts):
        """``dlogits`` (written over ``logits`` when ``inplace``)."""

    def onepass_epilogue(
        self, u, targets, bias, temperature, softcap, head: EpilogueHead, du16=None, **opts
    ) -> EpilogueOut:
        """The one-pass row epilogue over the workspace ``u [Nc, V]`` of raw logits ``x_c W^T`` (plus
        ``bias`` when given; the schedule may fold the bias into the GEMM and pass None): row statistics,
        the head's per-row gradients and ``du`` (in ``EpilogueOut.du``, a buffer the backend owns for the
        call; for 16-bit inputs also written into ``du16``, the operand of the gradient GEMMs; the kernel
        epilogues' ``store_du32=False`` writes ``du16`` alone, when no bias gradient reads the fp32 ``du``);
        ``EpilogueOut.dh`` the entropy change when ``head.need_dh``."""

    def onepass_supports(self, head: EpilogueHead, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        """Whether :meth:`onepass_epilogue` computes this head on ``device`` for inputs of ``dtype``."""
