"""Public core ops: ``linear_logprob_entropy`` and ``logprob_entropy``.

Layering: each backend module (fusedrl/backends/*) holds kernels and launchers; this file wraps the
backend functions as ``torch.library.custom_op`` s (``fusedrl::*``, with fake implementations and
registered autograd) so ``torch.compile(fullgraph=True)`` can trace them, and exposes the typed
public entry points. The backend name travels as a string argument of the op; it is resolved
before the op is called (defaults from the environment come from ``fusedrl._config``, read here, in the
public functions), so the op itself never looks at environment variables.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import torch

from . import _config, reference
from ._validate import check_core, check_logits, want_checks
from .backends import ALL_NAMES, get_backend, resolve
from .backends.base import entropy_change
from .replay.kept import Replay, ReplayLogprob, check_replay, make_replay, slot_layout_for

Tensor = torch.Tensor

__all__ = ["linear_logprob_entropy", "logprob_entropy"]


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _out_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _temp(temperature: float, temp_vec: Optional[Tensor]):
    """The backends' temperature argument: the float, or the per-token fp32 [N] tensor when given."""
    return temperature if temp_vec is None else temp_vec


def _opts(grad_filter_eps: float, deterministic: bool, workspace_mb: float) -> dict:
    """The backend options every backend reads (``workspace_mb`` 0: the backend's default budget)."""
    return dict(grad_filter_eps=grad_filter_eps, deterministic=deterministic, workspace_mb=workspace_mb or None)


def check_entropy_change_flag(value) -> bool:
    """``return_entropy_change`` must be a bool (TypeError naming it otherwise)."""
    if not isinstance(value, bool):
        raise TypeError(f"return_entropy_change must be a bool, got {type(value).__name__}")
    return value


def _finish(logp: Tensor, ent: Optional[Tensor], stats: tuple, return_entropy: bool, dh: bool):
    """The forward custom ops' outputs ``(logp, ent or empty, lse, dH or empty)`` from a backend forward's
    ``stats`` (3-tuple, or 4-tuple ``(.., sq)`` with the entropy change's sums)."""
    lse = stats[0]
    d = entropy_change(logp, ent, stats[3]) if dh else _empty(logp)
    return logp, (ent if (return_entropy and ent is not None) else _empty(logp)), lse, d


def split_temperature(temperature) -> tuple[float, Optional[Tensor]]:
    """(float, per-token tensor or None) for the custom ops, whose schema has a float and an optional tensor."""
    if isinstance(temperature, torch.Tensor):
        return 1.0, temperature
    return float(temperature), None


# --------------------------------------------------------------------------------------------------
# custom op: hidden states + lm_head weight
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("fusedrl::linear_logprob_entropy_fwd", mutates_args=())
def _lle_fwd(
    x: Tensor,
    w: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    softcap: Optional[float],
    return_entropy: bool,
    backend: str,
    grad_filter_eps: float,
    deterministic: bool,
    workspace_mb: float,
    temp_vec: Optional[Tensor] = None,
    return_entropy_change: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    mod = get_backend(backend, x.device)
    dh = {"return_entropy_change": True} if return_entropy_change else {}  # the 3-tuple contract otherwise
    stats = mod.forward(
        x,
        w,
        targets,
        bias,
        _temp(temperature, temp_vec),
        softcap,
        return_entropy,
        **dh,
        **_opts(grad_filter_eps, deterministic, workspace_mb),
    )
    logp = stats[1] - stats[0]
    return _finish(logp, stats[2], stats, return_entropy, return_entropy_change)


@_lle_fwd.register_fake
def _(
    x,
    w,
    targets,
    bias,
    temperature,
    softcap,
    return_entropy,
    backend,
    grad_filter_eps,
    deterministic,
    workspace_mb,
    temp_vec=None,
    return_entropy_change=False,
):
    n = x.shape[0]
    dt = _out_dtype(x)
    return (
        x.new_empty(n, dtype=dt),
        x.new_empty(n if return_entropy else 0, dtype=dt),
        x.new_empty(n, dtype=dt),
        x.new_empty(n if return_entropy_change else 0, dtype=dt),
    )


@torch.library.custom_op("fusedrl::linear_logprob_entropy_bwd", mutates_args=())
def _lle_bwd(
    x: Tensor,
    w: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    softcap: Optional[float],
    lse: Tensor,
    ent: Optional[Tensor],
    g_lp: Tensor,
    g_H: Optional[Tensor],
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    backend: str,
    grad_filter_eps: float,
    deterministic: bool,
    workspace_mb: float,
    temp_vec: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    mod = get_backend(backend, x.device)
    dx, dw, db = mod.backward(
        x,
        w,
        targets,
        bias,
        _temp(temperature, temp_vec),
        softcap,
        lse,
        ent,
        g_lp,
        g_H,
        need_dx=need_dx,
        need_dw=need_dw,
        need_db=need_db,
        **_opts(grad_filter_eps, deterministic, workspace_mb),
    )
    return (
        dx if dx is not None else _empty(x),
        dw if dw is not None else _empty(w),
        db if db is not None else _empty(x if bias is None else bias),
    )


@_lle_bwd.register_fake
def _(
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
    need_dx,
    need_dw,
    need_db,
    backend,
    grad_filter_eps,
    deterministic,
    workspace_mb,
    temp_vec=None,
):
    return (
        torch.empty_like(x) if need_dx else _empty(x),
        torch.empty_like(w) if need_dw else _empty(w),
        torch.empty_like(bias) if (need_db and bias is not None) else _empty(x if bias is None else bias),
    )


def _lle_setup(ctx, inputs, output):
    x, w, targets, bias, temperature, softcap, return_entropy, backend, eps, det, ws, temp_vec, _ = inputs
    logp, ent, lse, dh = output
    ctx.save_for_backward(x, w, targets, bias, lse, ent if return_entropy else None, temp_vec)
    ctx.args = (temperature, softcap, backend, eps, det, ws)
    ctx.mark_non_differentiable(lse, dh)  # dH: a statistic of the policy, never differentiated


def _lle_backward(ctx, g_logp, g_ent, g_lse, g_dh):
    x, w, targets, bias, lse, ent, temp_vec = ctx.saved_tensors
    temperature, softcap, backend, eps, det, ws = ctx.args
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_db = bias is not None and ctx.needs_input_grad[3]
    if not (need_dx or need_dw or need_db):
        return (None,) * 13
    g_lp = g_logp if g_logp is not None else torch.zeros_like(lse)
    g_H = g_ent if (ent is not None and g_ent is not None and g_ent.numel()) else None
    dx, dw, db = _lle_bwd(
        x,
        w,
        targets,
        bias,
        temperature,
        softcap,
        lse,
        ent if g_H is not None else None,
        g_lp.contiguous(),
        None if g_H is None else g_H.contiguous(),
        need_dx,
        need_dw,
        need_db,
        backend,
        eps,
        det,
        ws,
        temp_vec,
    )
    return (dx if need_dx else None, dw if need_dw else None, None, db if need_db else None) + (None,) * 9


_lle_fwd.register_autograd(_lle_backward, setup_context=_lle_setup)


# --------------------------------------------------------------------------------------------------
# custom op: given logits
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("fusedrl::logprob_entropy_fwd", mutates_args=())
def _le_fwd(
    logits: Tensor,
    targets: Tensor,
    temperature: float,
    softcap: Optional[float],
    return_entropy: bool,
    backend: str,
    temp_vec: Optional[Tensor] = None,
    return_entropy_change: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    mod = get_backend(backend, logits.device)
    dh = {"return_entropy_change": True} if return_entropy_change else {}
    stats = mod.logits_forward(logits, targets, _temp(temperature, temp_vec), softcap, return_entropy, **dh)
    logp = stats[1] - stats[0]
    return _finish(logp, stats[2], stats, return_entropy, return_entropy_change)


@_le_fwd.register_fake
def _(logits, targets, temperature, softcap, return_entropy, backend, temp_vec=None, return_entropy_change=False):
    n = logits.shape[0]
    dt = _out_dtype(logits)
    return (
        logits.new_empty(n, dtype=dt),
        logits.new_empty(n if return_entropy else 0, dtype=dt),
        logits.new_empty(n, dtype=dt),
        logits.new_empty(n if return_entropy_change else 0, dtype=dt),
    )


@torch.library.custom_op("fusedrl::logprob_entropy_bwd", mutates_args=())
def _le_bwd(
    logits: Tensor,
    targets: Tensor,
    temperature: float,
    softcap: Optional[float],
    lse: Tensor,
    ent: Optional[Tensor],
    g_lp: Tensor,
    g_H: Optional[Tensor],
    backend: str,
    temp_vec: Optional[Tensor] = None,
) -> Tensor:
    mod = get_backend(backend, logits.device)
    return mod.logits_backward(
        logits, targets, _temp(temperature, temp_vec), softcap, lse, ent, g_lp, g_H, inplace=False
    )


@_le_bwd.register_fake
def _(logits, targets, temperature, softcap, lse, ent, g_lp, g_H, backend, temp_vec=None):
    return torch.empty_like(logits)


def _le_setup(ctx, inputs, output):
    logits, targets, temperature, softcap, return_entropy, backend, temp_vec, _ = inputs
    logp, ent, lse, dh = output
    ctx.save_for_backward(logits, targets, lse, ent if return_entropy else None, temp_vec)
    ctx.args = (temperature, softcap, backend)
    ctx.mark_non_differentiable(lse, dh)


def _le_backward(ctx, g_logp, g_ent, g_lse, g_dh):
    logits, targets, lse, ent, temp_vec = ctx.saved_tensors
    temperature, softcap, backend = ctx.args
    g_lp = g_logp if g_logp is not None else torch.zeros_like(lse)
    g_H = g_ent if (ent is not None and g_ent is not None and g_ent.numel()) else None
    d = _le_bwd(
        logits,
        targets,
        temperature,
        softcap,
        lse,
        ent if g_H is not None else None,
        g_lp.contiguous(),
        None if g_H is None else g_H.contiguous(),
        backend,
        temp_vec,
    )
    return d, None, None, None, None, None, None, None


_le_fwd.register_autograd(_le_backward, setup_context=_le_setup)


class _InplaceLogprobEntropy(torch.autograd.Function):
    """Memory-lean variant: backward overwrites the caller's logits buffer with dlogits."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, softcap, return_entropy, backend, return_entropy_change=False):
        mod = get_backend(backend, logits.device)
        dh = {"return_entropy_change": True} if return_entropy_change else {}
        stats = mod.logits_forward(logits, targets, temperature, softcap, return_entropy, **dh)
        logp, ent, lse, d = _finish(stats[1] - stats[0], stats[2], stats, return_entropy, return_entropy_change)
        ctx.save_for_backward(logits, targets, lse, ent if return_entropy else None)
        ctx.args = (temperature, softcap, backend)
        ctx.mark_non_differentiable(d)
        return logp, ent, d

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_dh):
        logits, targets, lse, ent = ctx.saved_tensors
        temperature, softcap, backend = ctx.args
        mod = get_backend(backend, logits.device)
        g_lp = g_logp if g_logp is not None else torch.zeros_like(lse)
        g_H = g_ent if (ent is not None and g_ent is not None and g_ent.numel()) else None
        d = mod.logits_backward(
            logits.detach(),
            targets,
            temperature,
            softcap,
            lse,
            ent if g_H is not None else None,
            g_lp.contiguous(),
            None if g_H is None else g_H.contiguous(),
            inplace=True,
        )
        return d, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def core_options(
    grad_filter_eps: Optional[float], deterministic: Optional[bool], workspace_mb: Optional[float]
) -> tuple[float, bool, float]:
    """Checked backend options with the environment's defaults (``fusedrl._config``): ``(grad_filter_eps,
    deterministic, workspace_mb)``; ``workspace_mb`` 0.0 means the backend's default budget."""
    from ._validate import as_number, is_real

    eps = _config.get("grad_filter_eps") if grad_filter_eps is None else as_number("grad_filter_eps", grad_filter_eps)
    if not is_real(eps) or not eps >= 0 or eps != eps:
        raise ValueError(f"grad_filter_eps must be a number >= 0, got {grad_filter_eps!r}")
    if deterministic is None:
        det = bool(_config.get("deterministic"))
    elif isinstance(deterministic, bool):
        det = deterministic
    else:
        raise TypeError(f"deterministic must be a bool or None, got {type(deterministic).__name__}")
    ws = 0.0
    if workspace_mb is not None:
        ws = as_number("workspace_mb", workspace_mb)
        if not is_real(ws) or not ws > 0 or ws != ws:
            raise ValueError(
                f"workspace_mb must be a positive number of MiB (inf: no limit) or None, got {workspace_mb!r}"
            )
    return float(eps), det, float(ws)


class CoreCall(NamedTuple):
    """The checked arguments of one core-op call (:func:`prepare_core`), shared by the fused loss so that
    both take the same values and raise the same errors."""

    hidden: Tensor  # as given ([..., H]), for autograd
    weight: Tensor
    targets: Tensor  # as given
    bias: Optional[Tensor]
    temperature: Union[float, Tensor]  # a float, or per-token [N] (fp32; fp64 for fp64 inputs)
    softcap: Optional[float]
    backend: str  # resolved ("reference" stays; vocab-parallel keeps the local backend's name)
    grad_filter_eps: float
    deterministic: bool
    workspace_mb: float  # 0.0: the backend's default
    process_group: Any
    tp_reduce_dx: Optional[bool]
    device: torch.device
    lead: torch.Size  # the per-token shape
    replay: Optional[Replay] = None  # sampling replay (fusedrl.replay): the kept sets or truncation


def prepare_core(
    hidden,
    weight,
    targets,
    bias=None,
    temperature=1.0,
    softcap=None,
    backend: str = "auto",
    process_group=None,
    grad_filter_eps: Optional[float] = None,
    deterministic: Optional[bool] = None,
    check_inputs: Optional[bool] = None,
    tp_reduce_dx: Optional[bool] = None,
    workspace_mb: Optional[float] = None,
    resolve_backend: bool = True,
    replay_args: Optional[dict] = None,
) -> CoreCall:
    """Validate the core op's arguments (errors name the argument) and resolve the backend. ``replay_args``:
    ``sampling_mask``, ``top_k``, ``top_p``, ``min_p``, ``entropy_support`` and ``need_entropy`` (whether the
    entropy is computed), ``valid`` (the tokens that count, or None: all)."""
    if not isinstance(backend, str) or backend not in ALL_NAMES:
        raise ValueError(f"backend must be one of {ALL_NAMES}, got {backend!r}")
    vocab_total = None
    if process_group is not None:
        from .distributed import global_vocab_size

        vocab_total = global_vocab_size(weight, process_group)
    temperature, softcap, dev = check_core(
        hidden, weight, targets, bias, temperature, softcap, check_inputs, vocab_total=vocab_total
    )
    if targets.requires_grad:
        raise ValueError("targets must not require grad")
    if tp_reduce_dx is not None and not isinstance(tp_reduce_dx, bool):
        raise TypeError(f"tp_reduce_dx must be a bool or None, got {type(tp_reduce_dx).__name__}")
    eps, det, ws = core_options(grad_filter_eps, deterministic, workspace_mb)
    name = resolve(backend, dev) if resolve_backend else backend
    replay = None
    if replay_args is not None:
        replay = _prepare_replay(replay_args, targets, weight, vocab_total, process_group, dev, check_inputs)
    return CoreCall(hidden, weight, targets, bias, temperature, softcap, name, eps, det, ws, process_group,
                    tp_reduce_dx, dev, hidden.shape[:-1], replay)  # fmt: skip


def _prepare_replay(a: dict, targets, weight, vocab_total, process_group, dev, check_inputs) -> Optional[Replay]:
    """The checked :class:`~fusedrl.replay.Replay` of the replay arguments (None: no replay)."""
    vocab = int(vocab_total if vocab_total is not None else weight.shape[0])
    kept, trunc, support = check_replay(a.get("sampling_mask"), a.get("top_k"), a.get("top_p"), a.get("min_p"),
                                        a.get("entropy_support", "full"), tuple(targets.shape), vocab, dev,
                                        want_checks(check_inputs, dev))  # fmt: skip
    if trunc is not None and process_group is not None:
        raise ValueError(
            "top_k / top_p / min_p: recomputing the truncation needs whole logit rows, which a vocabulary-parallel "
            "lm_head (process_group) splits; pass the sampler's kept sets as sampling_mask="
        )
    return make_replay(kept, trunc, support, bool(a.get("need_entropy")), vocab, a.get("valid"),
                       slot_layout_for(weight))  # fmt: skip


def run_replay_core(c: CoreCall, return_entropy: bool):
    """The core op on kept sets: ``(logp, entropy or None, logp_full or None)`` in the per-token shape
    (``logp_full``: the full-vocabulary log-prob, where the full path ran; not differentiable)."""
    x = c.hidden.reshape(-1, c.hidden.shape[-1])
    t = c.targets.reshape(-1).long()
    shard = None
    if c.process_group is not None:
        from .distributed import replay_shard

        shard = replay_shard(c.weight, c.process_group, c.tp_reduce_dx)
    logp, ent, full = ReplayLogprob.apply(x, c.weight, c.bias, t, c.replay, c.temperature, c.softcap,
                                          bool(return_entropy), shard)  # fmt: skip
    ent = ent.reshape(c.lead) if return_entropy else None
    return logp.reshape(c.lead), ent, (full.reshape(c.lead) if full.numel() == logp.numel() else None)


def run_core(c: CoreCall, return_entropy: bool, return_entropy_change: bool = False):
    """The core op on checked arguments: ``(logp, entropy or None)`` in the per-token shape, and ``dH``
    (no gradient) as a third output with ``return_entropy_change``."""
    dh = check_entropy_change_flag(return_entropy_change)
    if c.replay is not None:
        if dh:
            raise ValueError("return_entropy_change is not computed under sampling replay (sampling_mask / top_k / "
                             "top_p / min_p): the entropy change is a full-vocabulary statistic")  # fmt: skip
        return run_replay_core(c, return_entropy)[:2]
    extra = {"return_entropy_change": True} if dh else {}
    if c.process_group is not None:
        from .distributed import tp_linear_logprob_entropy

        return tp_linear_logprob_entropy(
            c.hidden,
            c.weight,
            c.targets,
            c.bias,
            c.temperature,
            c.softcap,
            return_entropy,
            c.backend,
            c.process_group,
            grad_filter_eps=c.grad_filter_eps,
            deterministic=c.deterministic,
            reduce_dx=c.tp_reduce_dx,
            workspace_mb=c.workspace_mb,
            **extra,
        )
    if c.backend == "reference":
        return reference.linear_logprob_entropy(
            c.hidden, c.weight, c.targets, c.bias, c.temperature, c.softcap, return_entropy, **extra
        )
    x = c.hidden.reshape(-1, c.hidden.shape[-1]).contiguous()
    t_float, t_vec = split_temperature(c.temperature)
    out = _lle_fwd(
        x,
        c.weight.contiguous(),
        c.targets.reshape(-1).long().contiguous(),
        None if c.bias is None else c.bias.contiguous(),
        t_float,
        c.softcap,
        bool(return_entropy),
        c.backend,
        c.grad_filter_eps,
        c.deterministic,
        c.workspace_mb,
        t_vec,
        *((True,) if dh else ()),  # the op's default otherwise: the call the op always had
    )
    logp, ent = out[0].reshape(c.lead), (out[1].reshape(c.lead) if return_entropy else None)
    return (logp, ent, out[3].reshape(c.lead)) if dh else (logp, ent)


def linear_logprob_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    temperature: Union[float, Tensor] = 1.0,
    softcap: Optional[float] = None,
    return_entropy: bool = True,
    backend: str = "auto",
    process_group=None,
    *,
    grad_filter_eps: Optional[float] = None,
    deterministic: Optional[bool] = None,
    check_inputs: Optional[bool] = None,
    tp_reduce_dx: Optional[bool] = None,
    workspace_mb: Optional[float] = None,
    return_entropy_change: bool = False,
    sampling_mask=None,
    entropy_support: str = "full",
    top_k=None,
    top_p=None,
    min_p=None,
):
    """Per-token log-prob of ``targets`` and entropy of ``softmax(z)``, ``z = softcap(hidden @ weight.T + bias) / T``,
    without materialising the ``[tokens, vocab]`` logits.

    Args:
        hidden: ``[..., H]`` bf16 / fp16 / fp32 (fp64 for gradcheck) last hidden states.
        weight: ``[V, H]`` lm_head weight, same dtype as ``hidden``. Under ``process_group`` this
            rank's vocabulary shard ``[V_local, H]``.
        targets: ``[...]`` integer token ids (same leading shape as ``hidden``), global ids in ``[0, V)``.
        bias: optional ``[V]`` lm_head bias (any float dtype).
        temperature: float > 0 (the rollout temperature), or a tensor of per-token temperatures (shape of
            ``targets``) or, for ``[B, T]`` targets, per-sequence temperatures ``[B]``; values > 0.
        softcap: optional float c > 0: ``u -> c * tanh(u / c)`` before the temperature (Gemma-2 style).
        return_entropy: False skips all entropy work and returns ``None`` for it.
        backend: ``"auto" | "triton" | "cuda" | "torch" | "reference"``; the environment may override
            ``auto`` (docs/robustness.md lists the variables).
        process_group: vocab-parallel group (weight is this rank's shard); see docs/scale-out.md.
        grad_filter_eps: skip backward vocab tiles whose ``|dz| < eps`` for every token (0 = exact;
            default from the environment, else 0). Honoured by the triton backend.
        deterministic: bitwise-reproducible backward (default True; False may use atomics).
        check_inputs: run host-syncing value checks (target range). Default: on for CPU tensors, off
            elsewhere unless the environment turns them on.
        tp_reduce_dx: under ``process_group``, all-reduce ``dx`` inside the op (default True); False
            returns this rank's partial ``dx`` (Megatron style).
        workspace_mb: the backend's working-memory budget in MiB (default: the backend's own, e.g. 64 MiB
            for torch, sized from free memory on a GPU; ``inf``: no limit).
        return_entropy_change: also return ``dH``, the first-order change of each token's entropy when its
            logits move along the gradient of its own log-prob: ``dH = d/deta H(softmax(z + eta (e_a - p)))``
            at 0 ``= sum_v p_v^2 (log p_v + H) - p_a (log p_a + H)`` (docs/backends.md, "The entropy change
            dH"). Two more row sums in the forward, only when asked.
        sampling_mask: sampling replay (docs/replay.md): the sampler's kept set per token, packed ``(ids,
            counts)`` (ids int ``[sum(counts)]``, counts ``[...]`` or ``[N]``; count 0: no replay there) or padded
            ``[..., K]`` int with ``-1`` fill. ``logp`` is then normalised over the kept set (the target always
            counted in it), ``z_a - log sum_{v in S} e^{z_v}``; gradients reach the kept logits only.
        entropy_support: ``"full"`` (default) or ``"kept"``: the entropy returned under replay. With ``"kept"``
            (or no entropy) and a set on every token, the cost follows the sets' size instead of ``V``.
        top_k, top_p, min_p: recompute the kept sets with vLLM's sampler rule (temperature, min-p, top-k with
            ties, top-p), for when the masks were not captured; numbers, or tensors per token / per sequence.

    Returns:
        ``(logp, entropy)``: fp32 (fp64 for fp64 inputs) tensors of shape ``[...]``; entropy is
        ``None`` when ``return_entropy=False``. Differentiable w.r.t. hidden, weight and bias. With
        ``return_entropy_change=True``: ``(logp, entropy, dH)``, ``dH`` of the same shape and dtype,
        without gradient.
    """
    check_entropy_change_flag(return_entropy_change)
    replay = dict(sampling_mask=sampling_mask, top_k=top_k, top_p=top_p, min_p=min_p,
                  entropy_support=entropy_support, need_entropy=bool(return_entropy))  # fmt: skip
    c = prepare_core(hidden, weight, targets, bias, temperature, softcap, backend, process_group, grad_filter_eps,
                     deterministic, check_inputs, tp_reduce_dx, workspace_mb, replay_args=replay)  # fmt: skip
    return run_core(c, return_entropy, return_entropy_change)


def logprob_entropy(
    logits: Tensor,
    targets: Tensor,
    temperature: Union[float, Tensor] = 1.0,
    softcap: Optional[float] = None,
    return_entropy: bool = True,
    backend: str = "auto",
    *,
    inplace_backward: bool = False,
    check_inputs: Optional[bool] = None,
    return_entropy_change: bool = False,
):
    """Same outputs as :func:`linear_logprob_entropy` when the model already produced logits.

    Args:
        logits: ``[..., V]`` any float dtype. targets: ``[...]`` integer ids in ``[0, V)``.
        temperature, softcap, return_entropy, backend, check_inputs, return_entropy_change: as in
            :func:`linear_logprob_entropy` (with ``return_entropy_change``: ``(logp, entropy, dH)``).
        inplace_backward: memory-lean backward that overwrites ``logits`` with ``dlogits`` (only when
            the caller never reads ``logits`` again). Not traceable by torch.compile.

    Returns:
        ``(logp, entropy)`` fp32 ``[...]`` (entropy ``None`` when not asked); the forward keeps only
        LSE and entropy per token besides the caller's logits.
    """
    dh = check_entropy_change_flag(return_entropy_change)
    temperature, softcap, dev = check_logits(logits, targets, temperature, softcap, check_inputs)
    if targets.requires_grad:
        raise ValueError("targets must not require grad")
    name = resolve(backend, dev)
    if name == "reference":
        extra = {"return_entropy_change": True} if dh else {}
        return reference.logprob_entropy(logits, targets, temperature, softcap, return_entropy, **extra)
    lead = logits.shape[:-1]
    z = logits.reshape(-1, logits.shape[-1])
    if not z.is_contiguous():
        z = z.contiguous()
    t = targets.reshape(-1).long().contiguous()
    if inplace_backward:
        if z.data_ptr() != logits.data_ptr():
            raise ValueError("inplace_backward needs contiguous logits (the buffer that will be overwritten)")
        logp, ent, d = _InplaceLogprobEntropy.apply(z, t, temperature, softcap, bool(return_entropy), name, dh)
    else:
        t_float, t_vec = split_temperature(temperature)
        logp, ent, _, d = _le_fwd(z, t, t_float, softcap, bool(return_entropy), name, t_vec, *((True,) if dh else ()))
    out = logp.reshape(lead), (ent.reshape(lead) if return_entropy else None)
    return out + (d.reshape(lead),) if dh else out
