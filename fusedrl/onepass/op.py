"""The one-pass schedule as one ``torch.library`` custom op (opaque to ``torch.compile``, traceable with
``fullgraph=True``) and its autograd: the forward forms the gradients, the backward only scales them by
the incoming scalar gradient and rounds once to the inputs' dtypes (a deferred plan, ``plan.defers_dw``:
the forward returns the du of every token and the backward runs GEMM 3, the gradient folded into x).

The op takes explicit arguments: the tensors, the per-token side inputs as a ``Tensor?[]`` in the fixed
order of :data:`SIDE`, and every :class:`fusedrl.PolicyLossConfig` field as an argument of its own type
(:data:`CONFIG_ARGS`, generated from the dataclass, so a new field cannot be forgotten); a
``stats_group`` crosses as its process-group name, resolved by torch.distributed's own registry.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
import warnings
from typing import Optional, Union

import torch

from ..backends import resolve, torch_backend
from ..backends.base import EpilogueHead
from ..backends.device import device_facts
from ..loss import PolicyLossConfig, RolloutCorrection, TokenHead, head_kind, metric_names
from ..loss.config import ENTROPY_CONTROL_FIELDS, entropy_control_args, entropy_control_fields
from ..loss.inputs import SIDE_INPUTS, flatten_batch
from ..loss.selection import random_keys
from ..ops import split_temperature
from ..replay.kept import Replay, replay_from_args, replay_metric_names, replay_metrics, replay_to_args
from .cost import Setting, du_row_stride
from .gemm import OutOfMemoryError, dw_from_du
from .gemm import path as gemm_path
from .plan import MIB, Plan, defers_dw, plan, smallest
from .replay import run_replay
from .run import epilogue_for, run_one_pass, run_two_pass

Tensor = torch.Tensor

log = logging.getLogger("fusedrl")

#: the per-token side inputs of the fused loss, in the op's order (the entropy is computed, not given)
SIDE = tuple(k for k in SIDE_INPUTS if k != "entropy")
_NORMALISERS = ("global_num_tokens", "global_num_seqs", "norm_len")
# config fields that do not cross as plain arguments: the generator (its draw is made before the op),
# the normalisers (a tensor or a number each), the rollout correction (its own fields), the group (its name)
# the entropy-control fields travel as two lists (the dispatcher takes at most 64 arguments)
_SPECIAL = ("generator", "stats_group", "rollout_correction") + _NORMALISERS + ENTROPY_CONTROL_FIELDS
_SCHEMA_TYPES = {"str": "str", "float": "float", "bool": "bool", "Optional[float]": "float?", "Optional[str]": "str?",
                 "Union[str, float, None]": "str?"}  # fmt: skip


def _fields(cls, skip=()) -> tuple[tuple[str, str], ...]:
    hints = {f.name: f.type if isinstance(f.type, str) else typing.get_type_hints(cls)[f.name] for f in
             dataclasses.fields(cls)}  # fmt: skip
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        t = hints[f.name]
        if t not in _SCHEMA_TYPES:
            raise TypeError(f"{cls.__name__}.{f.name}: annotation {t!r} has no op schema type (fusedrl.onepass.op)")
        out.append((f.name, _SCHEMA_TYPES[t]))
    return tuple(out)


#: ``(name, schema type)`` of the config's plain fields and of the rollout correction's (prefixed ``rc_``)
CONFIG_ARGS = _fields(PolicyLossConfig, _SPECIAL)
RC_ARGS = tuple(("rc_" + n, t) for n, t in _fields(RolloutCorrection))

_HEAD = (
    ("x", "Tensor"), ("w", "Tensor"), ("targets", "Tensor"), ("bias", "Tensor?"), ("old_logp", "Tensor"),
    ("advantages", "Tensor"), ("mask", "Tensor"), ("cu_seqlens", "Tensor?"), ("keys", "Tensor?"),
    ("side", "Tensor?[]"), ("temp_vec", "Tensor?"), ("norm_tensors", "Tensor?[]"), ("shape", "int[]"),
    ("temperature", "float"), ("softcap", "float?"), ("backend", "str"), ("budget_mb", "float"),
    ("need_dx", "bool"), ("need_dw", "bool"), ("need_db", "bool"), ("want_entropy", "bool"),
    ("grad_filter_eps", "float"), ("deterministic", "bool"), ("workspace_mb", "float"),
    ("norm_numbers", "float?[]"), ("stats_group", "str?"), ("has_rc", "bool"), ("ec_floats", "float?[]"),
    ("ec_strs", "str[]"), ("replay", "Tensor?[]"), ("replay_mode", "str?"),
)  # fmt: skip
ARGS = _HEAD + CONFIG_ARGS + RC_ARGS
_INDEX = {name: i for i, (name, _) in enumerate(ARGS)}
SCHEMA = "(" + ", ".join(f"{t} {n}" for n, t in ARGS) + ") -> (Tensor, Tensor, Tensor, Tensor, Tensor)"


def config_args(cfg: PolicyLossConfig) -> list:
    """The config as the op's trailing arguments (normalisers and group not included)."""
    out = [getattr(cfg, n) for n, _ in CONFIG_ARGS]
    rc = cfg.rollout_correction if cfg.rollout_correction is not None else RolloutCorrection()  # has_rc says which
    for n, t in RC_ARGS:
        v = getattr(rc, n[3:])
        out.append(str(v) if (t == "str?" and v is not None) else v)
    return out


def config_from_args(a: dict, norm_tensors, norm_numbers) -> PolicyLossConfig:
    """The config rebuilt (and validated) from the op's arguments."""
    kw = {n: a[n] for n, _ in CONFIG_ARGS}
    kw.update(entropy_control_fields(a["ec_floats"], a["ec_strs"]))
    if a["has_rc"]:
        kw["rollout_correction"] = RolloutCorrection(**{n[3:]: a[n] for n, _ in RC_ARGS})
    for name, t, num in zip(_NORMALISERS, norm_tensors, norm_numbers):
        kw[name] = t if t is not None else num
    if a["stats_group"] is not None:
        kw["stats_group"] = torch.distributed.distributed_c10d._resolve_process_group(a["stats_group"])
    return PolicyLossConfig(**kw)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _impl(*args):
    a = {name: args[i] for name, i in _INDEX.items()}
    x, w, targets, bias = a["x"], a["w"], a["targets"], a["bias"]
    cfg = config_from_args(a, a["norm_tensors"], a["norm_numbers"])
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    side = {k: t for k, t in zip(SIDE, a["side"]) if t is not None}
    shape = tuple(a["shape"])
    batch = flatten_batch("targets", shape, x.device, a["old_logp"], a["advantages"], a["mask"], a["cu_seqlens"],
                          side, check_inputs=False)  # fmt: skip
    head = TokenHead(batch, cfg, a["want_entropy"], cdt)
    n, h = x.shape
    seq_len = cu_host = None
    if head.kind == "sequence":
        if a["cu_seqlens"] is not None:
            cu_host = [int(c) for c in a["cu_seqlens"].tolist()]  # one small host read (packed sequence modes)
        else:
            seq_len = head.seg.T
    temperature = a["temp_vec"] if a["temp_vec"] is not None else a["temperature"]
    want_entropy = a["want_entropy"] or head.needs_entropy
    common = (x, w, targets, bias, head)
    flags = (a["need_dx"], a["need_dw"], a["need_db"], want_entropy)
    setting = run_setting(x, w, bias, head, a["backend"], temperature, a["softcap"], *flags)

    replay = replay_from_args(a["replay"], a["replay_mode"])

    def planned(budget: float, defer: Optional[bool] = None) -> Plan:  # replay's loop accumulates dW itself
        defer = False if replay is not None else defer
        return plan(n, h, w.shape[0], x.dtype, cfg, "one_pass", budget, seq_len, cu_host, setting, defer)

    pln = planned(a["budget_mb"] * MIB)
    log.debug("fusedrl fused_policy_loss: schedule %s (%s)", pln.schedule, pln.reason)
    opts = dict(grad_filter_eps=a["grad_filter_eps"], deterministic=a["deterministic"],
                workspace_mb=a["workspace_mb"] or None)  # fmt: skip
    two = (*common, temperature, a["softcap"], a["backend"], a["keys"], *flags, opts)
    extra = []
    if replay is not None:  # sampling replay: its own chunk loop (fusedrl.onepass.replay)
        out, logp, logp_full = run_replay(*common, pln, temperature, a["softcap"], replay, a["keys"], *flags)
        rm = replay_metrics(replay, batch.valid, logp, logp_full)
        extra = [rm[k] for k in replay_metric_names(replay)]
    elif pln.schedule == "two_pass":
        out = run_two_pass(*two)
    else:
        out = _run_or_replan(pln, planned, a["budget_mb"] * MIB, common, temperature, a["softcap"], a["backend"],
                             a["keys"], flags, two)  # fmt: skip
    names = metric_names(cfg, want_entropy, "ref_logp" in side)
    mvec = torch.stack([out.metrics[k].float() for k in names] + extra)
    return (
        out.loss.detach().to(cdt),
        mvec,
        out.dx if out.dx is not None else _empty(x),
        out.dw if out.dw is not None else _empty(w),
        out.db if out.db is not None else _empty(x if bias is None else bias),
    )


def run_setting(
    x: Tensor, w: Tensor, bias: Optional[Tensor], head: TokenHead, backend: str, temperature: Union[float, Tensor],
    softcap: Optional[float], need_dx: bool, need_dw: bool, need_db: bool, want_entropy: bool,
) -> Setting:  # fmt: skip
    """The planner's :class:`~fusedrl.onepass.cost.Setting` of a one-pass run: the row epilogue that runs
    (``run.epilogue_for``, as the run picks it), the device's rates, this torch's 16-bit GEMM path."""
    dev = x.device
    grads = need_dx or need_dw or need_db
    need_ent = want_entropy or head.entropy_has_grad
    emod = epilogue_for(backend, dev, x.dtype, EpilogueHead(head.kernel_codes(0, 0, need_ent) if grads else None,
                                                            None, need_ent))  # fmt: skip
    core = "torch" if backend == "reference" else resolve(backend, dev)
    low = x.dtype in (torch.float16, torch.bfloat16)
    per_token = isinstance(temperature, Tensor)
    transform = 3 if softcap is not None else (1 if per_token or (low and temperature != 1.0) else 0)
    return Setting(
        epilogue="torch" if emod is torch_backend else core, core=core, facts=device_facts(dev), dx=need_dx,
        dw=need_dw, db=need_db and bias is not None, ent=need_ent, ent_grad=head.entropy_has_grad,
        bias=bias is not None, transform=transform, gemm=gemm_path(dev, x.dtype),
        tf32=x.dtype == torch.float32 and dev.type == "cuda" and torch.get_float32_matmul_precision() != "highest",
    )  # fmt: skip


def _capturing(x: Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


_FALLBACK_WHY = (
    "the one-pass schedule ran out of memory in its own workspace twice (at the budget, then at half of it); "
    "this step runs {}. Pass a smaller memory_budget_mb, or schedule='recompute', to avoid the retries"
)
_TWO_PASS = "the two-pass form (the backend's recompute backward, its own bounded workspace)"
_SMALLEST = "the one-pass schedule in chunks of 64 rows (its gradient is the du of every token, deferred GEMM 3)"


def _run_or_replan(pln: Plan, planned, budget: float, common, temperature, softcap, backend, keys, flags, two):
    """The one-pass run; out of memory in it: once more at half the budget, then the two-pass form with one
    warning, never a failed step from the schedule's own workspace. A deferred plan (its output is the du of
    every token, which the two-pass form does not give) tries chunks of 64 rows last instead. The retries
    run outside the ``except`` blocks, so the failed attempt's buffers (held by its traceback) are free first."""
    try:
        return run_one_pass(*common, pln, temperature, softcap, backend, keys, *flags)
    except OutOfMemoryError:
        if _capturing(common[0]):  # an OOM inside a CUDA graph capture has invalidated it: nothing to retry
            raise
    half = planned(budget / 2, pln.deferred)  # the output's form is decided: the retry keeps it
    log.info("fusedrl fused_policy_loss: out of memory in the one-pass workspace; re-planned at half the "
             "budget: %s (%s)", half.schedule, half.reason)  # fmt: skip
    if half.schedule == "one_pass" and half.fits:
        try:
            return run_one_pass(*common, half, temperature, softcap, backend, keys, *flags)
        except OutOfMemoryError:
            pass
    if pln.deferred:
        warnings.warn(f"fusedrl: {_FALLBACK_WHY.format(_SMALLEST)}", UserWarning, stacklevel=2)
        return run_one_pass(*common, smallest(pln, common[0].shape[0]), temperature, softcap, backend, keys, *flags)
    warnings.warn(f"fusedrl: {_FALLBACK_WHY.format(_TWO_PASS)}", UserWarning, stacklevel=2)
    return run_two_pass(*two)


_op = torch.library.custom_op("fusedrl::policy_loss_one_pass", _impl, mutates_args=(), schema=SCHEMA)


@_op.register_fake
def _fake(*args):
    a = {name: args[i] for name, i in _INDEX.items()}
    x, w, bias = a["x"], a["w"], a["bias"]
    cfg = config_from_args(a, a["norm_tensors"], a["norm_numbers"])
    side = {k for k, t in zip(SIDE, a["side"]) if t is not None}
    want = a["want_entropy"] or cfg.entropy_coeff != 0 or cfg.top_entropy_quantile < 1
    m = len(metric_names(cfg, want, "ref_logp" in side))
    replay = replay_from_args(a["replay"], a["replay_mode"])
    m += 0 if replay is None else len(replay_metric_names(replay))
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, v = x.shape[0], w.shape[0]
    if replay is None and defers_dw(n, x.shape[1], v, x.dtype, head_kind(cfg), a["need_dw"], a["budget_mb"] * MIB,
                                    a["need_dx"]):  # fmt: skip
        dw = x.new_empty((n, du_row_stride(v)))  # the du of every token (fusedrl.onepass.plan.defers_dw)
    else:
        dw = w.new_empty(w.shape, dtype=cdt) if a["need_dw"] else _empty(w)
    return (
        x.new_empty((), dtype=cdt),
        x.new_empty(m, dtype=torch.float32),
        x.new_empty(x.shape, dtype=cdt) if a["need_dx"] else _empty(x),
        dw,
        bias.new_empty(bias.shape, dtype=cdt)
        if (a["need_db"] and bias is not None)
        else _empty(x if bias is None else bias),
    )


def _setup(ctx, inputs, output):
    _, _, dx, dw, db = output
    # a deferred run returned the 16-bit du of every token for dW (plan.defers_dw): the backward runs GEMM 3
    ctx.deferred = dw.dim() == 2 and dw.dtype not in (torch.float32, torch.float64)
    ctx.v = inputs[1].shape[0]
    ctx.save_for_backward(dx, dw, db, inputs[0] if ctx.deferred else None)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (inputs[0], inputs[1], inputs[3]))
    ctx.formed = tuple(inputs[_INDEX[k]] for k in ("need_dx", "need_dw", "need_db"))  # what the forward formed
    # autograd wants the backward's return in the inputs' structure, where a list made only of tensors (every
    # normaliser a tensor, every side input given, an empty list) is a list and any other argument one entry
    ctx.lists = tuple(
        len(v) if isinstance(v, list) and all(isinstance(e, torch.Tensor) for e in v) else None for v in inputs
    )
    ctx.mark_non_differentiable(output[1], dx, dw, db)
    # no zero tensors for the outputs nothing differentiates (dx, dw, db): materialised, they cost a second
    # copy of the gradients at the backward's peak
    ctx.set_materialize_grads(False)


def _scaled(t: Tensor, g: Tensor, dtype: torch.dtype, unit: bool) -> Tensor:
    """``g * t`` in ``t``'s (compute) dtype, rounded once to ``dtype``. One pass: the product is computed in
    fp32 and written to the 16-bit output (``g.to(dtype) * t`` would round g: a 2^16 GradScaler scale is
    inf in fp16, and 1/3 is off by 0.2% in bf16, a bias on every gradient)."""
    if unit:
        return t if t.dtype == dtype else t.to(dtype)
    g = g.to(t.dtype)
    if t.dtype == dtype:
        return t * g
    if torch.compiler.is_compiling():
        return (t * g).to(dtype)  # fused by the compiler
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    return torch.mul(t, g, out=out)


def _backward(ctx, g_loss, g_metrics, g_dx, g_dw, g_db):
    """The gradients were formed in the forward (in the compute dtype): scale them by the incoming scalar
    gradient and round once to the inputs' dtypes; a deferred dW is formed here, from the du of every
    token, in one GEMM."""
    # an upstream gradient of exactly 1 (loss.backward()) skips the multiply; the check is free on CPU only
    # (a GPU value check would synchronise, and the multiply there is cheap)
    unit = (
        type(g_loss) is torch.Tensor
        and not torch.compiler.is_compiling()
        and g_loss.device.type == "cpu"
        and bool(g_loss == 1)
    )  # traced backwards (fake / functional tensors) always multiply
    out = [None if k is None else [None] * k for k in ctx.lists]
    if g_loss is None:  # the loss itself was not differentiated (only a metric was)
        return tuple(out)
    grads = []
    wanted = (ctx.needs_input_grad[i] for i in (0, 1, 3))
    *saved, x = ctx.saved_tensors
    for i, (t, dtype, formed, want) in enumerate(zip(saved, ctx.dtypes, ctx.formed, wanted)):
        if not (formed and want):
            grads.append(None)
        elif i == 1 and ctx.deferred:  # GEMM 3, deferred: dW = du^T @ (g·x)
            grads.append(dw_from_du(t[:, : ctx.v], x, None if unit else g_loss))
        else:
            grads.append(_scaled(t, g_loss, dtype, unit))
    out[_INDEX["x"]], out[_INDEX["w"]], out[_INDEX["bias"]] = grads
    return tuple(out)


_op.register_autograd(_backward, setup_context=_setup)


def one_pass_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    bias: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    side: dict[str, Tensor],
    temperature,
    softcap: Optional[float],
    cfg: PolicyLossConfig,
    backend: str,
    budget_bytes: float,
    want_entropy: bool,
    core_opts: tuple[float, bool, float],
    replay: Optional[Replay] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The one-pass (or two-pass) schedule as one differentiable call on validated inputs
    (``fused_policy_loss`` checks everything first); ``targets`` hold 0 at masked positions. Returns
    ``(loss, metrics)`` as ``policy_loss``."""
    x = hidden.reshape(-1, hidden.shape[-1])
    grad_on = torch.is_grad_enabled()
    need_dx = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    need_db = grad_on and bias is not None and bias.requires_grad
    keys = None
    if cfg.loss_mode == "clip_cov":  # the same draw policy_loss makes (same generator -> same picks)
        keys = random_keys(old_logp.reshape(-1), cfg.generator)
    norm_t = [getattr(cfg, k) if isinstance(getattr(cfg, k), Tensor) else None for k in _NORMALISERS]
    norm_n = [None if isinstance(getattr(cfg, k), Tensor) else getattr(cfg, k) for k in _NORMALISERS]
    norm_n = [None if v is None else float(v) for v in norm_n]
    group = None if cfg.stats_group is None else cfg.stats_group.group_name
    t_float, t_vec = split_temperature(temperature)
    eps, det, ws = core_opts
    loss, mvec, _, _, _ = _op(
        x.contiguous(), weight.contiguous(), targets.reshape(-1).long().contiguous(),
        None if bias is None else bias.contiguous(), old_logp, advantages, mask, cu_seqlens, keys,
        [side.get(k) for k in SIDE], t_vec, norm_t, list(targets.shape), t_float,
        None if softcap is None else float(softcap), backend, float(budget_bytes) / MIB, need_dx, need_dw, need_db,
        bool(want_entropy), eps, det, ws, norm_n, group, cfg.rollout_correction is not None,
        *entropy_control_args(cfg), *replay_to_args(replay), *config_args(cfg),
    )  # fmt: skip
    has_entropy = want_entropy or cfg.top_entropy_quantile < 1 or cfg.entropy_coeff != 0
    names = metric_names(cfg, has_entropy, "ref_logp" in side)
    names += () if replay is None else replay_metric_names(replay)
    return loss, {k: mvec[i] for i, k in enumerate(names)}
