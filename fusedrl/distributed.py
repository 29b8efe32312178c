"""Scale-out: vocabulary-parallel (tensor-parallel) lm_head for the fused core op.

Under tensor parallelism the lm_head weight ``[V, H]`` is split by rows: rank ``r`` of the group holds
the contiguous global rows ``[start_r, start_r + V_r)`` with ``start_r = sum_{q<r} V_q`` (uneven
shards allowed). Every backend computes, for its shard only, the per-token local statistics
``(lse_r, zt_r, ent_r)`` (``zt_r`` is the target logit when the target lies in the shard, else 0);
this module merges them into the global log-prob and entropy and runs the backward with the global
statistics. See README "Scale-out" for the user-facing description.

Collectives (per call):

* forward: ONE ``all_gather`` of a packed ``[k*N + 2]`` tensor per rank (``k = 3`` with entropy:
  lse, zt, ent; ``k = 2`` without; ``k = 5`` with the entropy change: its two row sums), plus two
  scalars (the rank's assumed shard start and its size, used to detect a stale cached layout). Every
  rank then merges the ``[W, k*N]`` block locally in the same order, so logp / entropy are **bitwise
  identical on every rank** (the loss head, which runs replicated on those, then produces identical
  losses, metrics and upstream gradients).
  Chosen over "all_reduce(MAX lse) + all_reduce(SUM of 3 packed rows)": that is two dependent
  latency-bound collectives instead of one, and the rescaled sums ``sum_r exp(lse_r - M) (...)``
  would be reduced in whatever order the collective library picks. The gather's payload is
  ``W * k * N`` floats (W = 8, N = 8192: 0.8 MB), negligible next to the ``N*H*V/W`` GEMM.
* backward: each rank recomputes its shard's logits with the GLOBAL ``LSE`` and ``H`` and produces
  its exact ``dW`` shard (and ``db`` shard) plus a *partial* ``dx`` (the sum over its vocab rows).
  The full ``dx`` is the sum of the partials over the group. By default the op all-reduces (SUM)
  ``dx`` itself — one ``all_reduce`` of ``[N, H]`` in the input dtype — so that a plain user whose
  ``hidden`` is replicated on every rank gets ``hidden.grad`` = gradient of the global loss. With
  ``reduce_dx=False`` (or inside :func:`partial_dx`) the op returns
  the partial ``dx`` and the caller's parallel layer must reduce it, as Megatron's
  ``copy_to_tensor_model_parallel_region`` (all-reduce in backward) or, with sequence parallelism,
  ``gather_from_sequence_parallel_region`` (reduce-scatter in backward) does.

Merge math (fp32, fp64 for fp64 inputs), with ``M = max_r lse_r``:
``LSE = M + log sum_r exp(lse_r - M)``; ``w_r = exp(lse_r - LSE)``;
``H = sum_r w_r (LSE - lse_r + ent_r)`` (both terms >= 0: no cancellation);
``logp = sum_r zt_r - LSE``. The entropy change (``return_entropy_change``; each shard's backend returns
``q_r = sum_{v in r} p_{v|r}^2`` and ``c_r = sum_{v in r} p_{v|r}^2 (log p_{v|r} + ent_r)`` over its own
softmax, two more gathered rows): ``p_v = w_r p_{v|r}``, so ``sum_v p_v^2 (log p_v + H) = sum_r w_r^2 (c_r +
(lse_r - LSE + H - ent_r) q_r)``, and ``dH`` follows from it, ``logp`` and ``H``
(``fusedrl.backends.base.entropy_change``).

Shard layout: the offsets need the sizes of every rank, exchanged once by an ``all_gather`` of
``V_local`` and cached per ``(group, V_local)``; the forward's gather re-checks the cached layout for
free (each rank ships the start it assumed), so a stale layout is detected on *all* ranks at once
(raise when input checks are on — the CPU default —, NaN outputs otherwise; the stale entry is
dropped). Caveat: if you reshard so that one rank keeps its local size while another changes it,
the ranks disagree about whether to fetch the layout (mismatched collectives): call
:func:`clear_vocab_layout_cache` on every rank after resharding.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Optional

import torch
import torch.distributed as dist

from . import reference
from ._validate import want_checks
from .backends.base import entropy_change
from .replay.kept import Shard

Tensor = torch.Tensor

__all__ = [
    "tp_linear_logprob_entropy",
    "global_vocab_size",
    "vocab_shard_range",
    "vocab_layout",
    "clear_vocab_layout_cache",
    "partial_dx",
    "merge_shard_stats",
]

# ------------------------------------------------------------------------------------------------
# shard layout
# ------------------------------------------------------------------------------------------------
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # group -> {V_local: sizes}
_LAYOUT_LOCK = threading.Lock()


def _group_key(group):
    return dist.group.WORLD if group is None else group


def _rank_and_size(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialised")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process_group")
    return rank, dist.get_world_size(group)


def _all_gather(inp: Tensor, world: int, group) -> Tensor:
    """``[world, *inp.shape]``: every rank's ``inp`` in rank order (one collective)."""
    fn = getattr(dist, "all_gather_single", None)  # torch >= 2.13; all_gather_into_tensor before
    if fn is None:
        fn = dist.all_gather_into_tensor
    out = inp.new_empty(world * inp.numel())  # flat (concatenation form): every c10d backend takes it
    fn(out, inp.reshape(-1), group=group)
    return out.view(world, *inp.shape)


def clear_vocab_layout_cache(group=None) -> None:
    """Forget the cached shard sizes (of ``group``, or of every group when None). Call it on every
    rank after resharding the lm_head."""
    with _LAYOUT_LOCK:
        if group is None:
            _LAYOUTS.clear()
        else:
            _LAYOUTS.pop(_group_key(group), None)


def vocab_layout(weight_or_rows, group) -> tuple[tuple[int, ...], int]:
    """``(sizes, rank)``: the shard size ``V_r`` of every rank of ``group`` (rank order) and this
    process's rank. Collective on a cache miss (all ranks must call it together)."""
    v_local = int(weight_or_rows.shape[0]) if isinstance(weight_or_rows, Tensor) else int(weight_or_rows)
    rank, world = _rank_and_size(group)
    key = _group_key(group)
    with _LAYOUT_LOCK:
        sizes = _LAYOUTS.get(key, {}).get(v_local)
    if sizes is not None and len(sizes) == world:
        return sizes, rank
    dev = weight_or_rows.device if isinstance(weight_or_rows, Tensor) else torch.device("cpu")
    if dev.type == "cpu" and dist.get_backend(group) == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
    out = _all_gather(torch.tensor([v_local], dtype=torch.int64, device=dev), world, group)
    sizes = tuple(int(s) for s in out.reshape(-1).tolist())
    if sizes[rank] != v_local:  # pragma: no cover - collective library misbehaving
        raise RuntimeError(f"vocab layout exchange returned {sizes} but this rank holds {v_local} rows")
    with _LAYOUT_LOCK:
        _LAYOUTS.setdefault(key, {})[v_local] = sizes
    return sizes, rank


def _drop_layout(group, v_local: int) -> None:
    with _LAYOUT_LOCK:
        _LAYOUTS.get(_group_key(group), {}).pop(v_local, None)


def global_vocab_size(weight, group) -> int:
    """Total vocabulary ``sum_r V_r`` of the row-sharded lm_head (``weight`` is this rank's shard)."""
    sizes, _ = vocab_layout(weight, group)
    return sum(sizes)


def vocab_shard_range(weight, group) -> tuple[int, int]:
    """``(start, end)``: the global rows held by this rank."""
    sizes, rank = vocab_layout(weight, group)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


# ------------------------------------------------------------------------------------------------
# dx semantics
# ------------------------------------------------------------------------------------------------
_DX_MODE = threading.local()


@contextlib.contextmanager
def partial_dx(enabled: bool = True):
    """Within this context, TP calls return the PARTIAL ``dx`` (no all-reduce inside the op); the
    caller's parallel layer (e.g. Megatron's ``copy_to_tensor_model_parallel_region``) reduces it.
    Decided at forward time (the backward may run after the context has exited)."""
    prev = getattr(_DX_MODE, "partial", None)
    _DX_MODE.partial = bool(enabled)
    try:
        yield
    finally:
        _DX_MODE.partial = prev


def _want_reduce_dx(reduce_dx: Optional[bool]) -> bool:
    if reduce_dx is not None:
        return bool(reduce_dx)
    partial = getattr(_DX_MODE, "partial", None)
    return True if partial is None else not partial


# ------------------------------------------------------------------------------------------------
# the "reference" backend on one shard: eager, materialised local logits
# ------------------------------------------------------------------------------------------------
class _ReferenceShard:
    """Backend-contract forward/backward for one vocab shard with materialised fp32 logits."""

    @staticmethod
    def forward(
        x, w, targets, bias, temperature, softcap, return_entropy, vocab_start=0, return_entropy_change=False, **opts
    ):
        v = w.shape[0]
        z = reference.linear_logits(x, w, bias, temperature, softcap)  # [N, V_local]
        lse = torch.logsumexp(z, dim=-1)
        loc = targets - vocab_start
        hit = (loc >= 0) & (loc < v)
        zt = torch.where(hit, z.gather(1, loc.clamp(0, v - 1)[:, None]).squeeze(1), torch.zeros_like(lse))
        ent = None
        if return_entropy or return_entropy_change:
            zl = z - lse[:, None]
            p = zl.exp()
            zl = torch.where(p > 0, zl, torch.zeros_like(zl))
            ent = -(p * zl).sum(-1)
        if not return_entropy_change:
            return lse, zt, ent
        p2 = p * p  # the entropy change's sums over this shard's softmax (Backend.forward's contract)
        return lse, zt, ent, torch.stack((p2.sum(-1), (p2 * (zl + ent[:, None])).sum(-1)))

    @staticmethod
    def backward(
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
        v = w.shape[0]
        need_db = need_db and bias is not None
        with torch.enable_grad():
            xd = x.detach().requires_grad_(need_dx)
            wd = w.detach().requires_grad_(need_dw)
            bd = None if bias is None else bias.detach().requires_grad_(need_db)
            z = reference.linear_logits(xd, wd, bd, temperature, softcap)
            zl = z.detach() - lse.to(z.dtype)[:, None]
            p = zl.exp()
            dz = p * (-g_lp.to(z.dtype))[:, None]
            if g_H is not None:
                dz = dz - (g_H.to(z.dtype)[:, None] * p) * (zl + ent.to(z.dtype)[:, None])
            loc = targets - vocab_start
            hit = (loc >= 0) & (loc < v)
            dz = dz.scatter_add(
                1,
                loc.clamp(0, v - 1)[:, None],
                torch.where(hit, g_lp.to(z.dtype), torch.zeros_like(lse, dtype=z.dtype))[:, None],
            )
            inputs = [t for t, need in ((xd, need_dx), (wd, need_dw), (bd, need_db)) if need]
            grads = list(torch.autograd.grad(z, inputs, dz)) if inputs else []
        dx = grads.pop(0) if need_dx else None
        dw = grads.pop(0) if need_dw else None
        db = grads.pop(0) if need_db else None
        return dx, dw, db


def _backend_module(name: str, device: torch.device):
    if name == "reference":
        return _ReferenceShard
    from .backends import get_backend

    return get_backend(name, device)


# ------------------------------------------------------------------------------------------------
# merge of per-shard statistics
# ------------------------------------------------------------------------------------------------
def merge_shard_stats(lse: Tensor, zt: Tensor, ent: Optional[Tensor], sq: Optional[Tensor] = None):
    """Merge per-shard statistics ``[W, N]`` (rank order) into global ``(LSE, logp, H)`` ``[N]``.

    ``LSE = M + log sum_r e^(lse_r - M)``, ``logp = sum_r zt_r - LSE``,
    ``H = sum_r w_r (LSE - lse_r + ent_r)`` with ``w_r = e^(lse_r - LSE)``.
    ``sq``: the shards' entropy-change sums ``[W, 2, N]`` (``Backend.forward(return_entropy_change=True)``;
    needs ``ent``): then ``(LSE, logp, H, dH)`` with ``dH`` the global entropy change (module docstring).
    """
    m = lse.amax(dim=0)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    LSE = m_safe + torch.log(torch.exp(lse - m_safe).sum(dim=0))
    logp = zt.sum(dim=0) - LSE
    H = None
    if ent is not None:
        wts = torch.exp(lse - LSE)
        # a shard holding none of the row's columns (lse_r = -inf: sampling replay) adds nothing, never 0 * inf
        H = torch.where(wts > 0, wts * ((LSE - lse) + ent), torch.zeros_like(wts)).sum(dim=0)
    if sq is None:
        return LSE, logp, H
    # a shard of probability 0 (all its logits -inf) adds nothing, never 0 * NaN
    w2 = wts * wts
    zero = torch.zeros_like(w2)
    q = torch.where(wts > 0, w2 * sq[:, 0], zero).sum(dim=0)
    c = torch.where(wts > 0, w2 * (sq[:, 1] + ((lse - LSE) + (H - ent)) * sq[:, 0]), zero).sum(dim=0)
    return LSE, logp, H, entropy_change(logp, H, torch.stack((q, c)))


def _tp_forward(
    x, w, targets, bias, temperature, softcap, return_entropy, mod, group, vocab_start, sizes, rank, opts, dh=False
):
    """Local backend forward + one all_gather + merge. Returns (logp, H|None, LSE, dH|None); ``dh``: the
    entropy change too (two more gathered rows; H is then computed)."""
    n = x.shape[0]
    world = len(sizes)
    return_entropy = return_entropy or dh
    extra = {"return_entropy_change": True} if dh else {}
    stats = mod.forward(
        x, w, targets, bias, temperature, softcap, return_entropy, vocab_start=vocab_start, **extra, **opts
    )
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    k = (3 if return_entropy else 2) + (2 if dh else 0)
    buf = torch.empty(k * n + 2, dtype=cdt, device=x.device)
    buf[0:n] = stats[0]
    buf[n : 2 * n] = stats[1]
    if return_entropy:
        buf[2 * n : 3 * n] = stats[2]
    if dh:
        buf[3 * n : 5 * n] = stats[3].reshape(-1)
    buf[k * n] = float(vocab_start)
    buf[k * n + 1] = float(w.shape[0])
    gathered = _all_gather(buf, world, group)
    merged = merge_shard_stats(
        gathered[:, 0:n],
        gathered[:, n : 2 * n],
        gathered[:, 2 * n : 3 * n] if return_entropy else None,
        gathered[:, 3 * n : 5 * n].reshape(world, 2, n) if dh else None,
    )
    LSE, logp, H = merged[:3]
    dH = merged[3] if dh else None
    # Layout check (no extra collective): rank r assumed start_r; consistent iff start_r == sum_{q<r} V_q.
    starts, rows = gathered[:, k * n], gathered[:, k * n + 1]
    expect = torch.cumsum(rows, 0) - rows
    if sum(sizes) < 2**24 or cdt == torch.float64:  # the scalars are exact in the stats dtype
        bad = (starts != expect).any()
        if want_checks(None, x.device):
            if bool(bad):
                _drop_layout(group, int(w.shape[0]))
                raise RuntimeError(
                    "fusedrl: the vocab-shard layout cached for this process group is stale (shards were "
                    f"resized: ranks hold {[int(r) for r in rows.tolist()]} rows); call "
                    "fusedrl.distributed.clear_vocab_layout_cache() on every rank after resharding"
                )
        else:  # no host sync: poison the outputs instead of raising
            nan = torch.full_like(LSE, float("nan"))
            logp = torch.where(bad, nan, logp)
            H = None if H is None else torch.where(bad, nan, H)
            dH = None if dH is None else torch.where(bad, nan, dH)
    return logp, H, LSE, dH


class _TPLinearLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        w,
        targets,
        bias,
        temperature,
        softcap,
        return_entropy,
        backend,
        group,
        opts,
        vocab_start,
        sizes,
        rank,
        reduce_dx,
        dh,
    ):
        mod = _backend_module(backend, x.device)
        logp, H, LSE, dH = _tp_forward(
            x, w, targets, bias, temperature, softcap, return_entropy, mod, group, vocab_start, sizes, rank, opts, dh
        )
        if not return_entropy:
            H = None  # computed for dH only
        ctx.save_for_backward(x, w, targets, bias, LSE, H)
        ctx.args = (temperature, softcap, backend, group, opts, vocab_start, reduce_dx, return_entropy)
        if H is None:
            H = logp.new_empty(0)
            ctx.mark_non_differentiable(H)
        dH = logp.new_empty(0) if dH is None else dH
        ctx.mark_non_differentiable(dH)  # a statistic, never differentiated
        return logp, H, dH

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_dh):
        x, w, targets, bias, LSE, H = ctx.saved_tensors
        temperature, softcap, backend, group, opts, vocab_start, reduce_dx, return_entropy = ctx.args
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[3]
        if not (need_dx or need_dw or need_db):
            return (None,) * 15
        g_lp = (g_logp if g_logp is not None else torch.zeros_like(LSE)).to(LSE.dtype).contiguous()
        g_H = None
        if return_entropy and g_ent is not None and g_ent.numel():
            g_H = g_ent.to(LSE.dtype).contiguous()
        mod = _backend_module(backend, x.device)
        dx, dw, db = mod.backward(
            x,
            w,
            targets,
            bias,
            temperature,
            softcap,
            LSE,
            H if g_H is not None else None,
            g_lp,
            g_H,
            vocab_start=vocab_start,
            need_dx=need_dx,
            need_dw=need_dw,
            need_db=need_db,
            **opts,
        )
        if need_dx and reduce_dx:
            dx = dx.contiguous()
            dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=group)
        return (
            dx if need_dx else None,
            dw if need_dw else None,
            None,
            db if need_db else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


@torch.compiler.disable  # eager collectives; runs as a graph break under torch.compile
def tp_linear_logprob_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    softcap: Optional[float],
    return_entropy: bool,
    backend_name: str,
    process_group,
    *,
    grad_filter_eps: float = 0.0,
    deterministic: bool = True,
    reduce_dx: Optional[bool] = None,
    workspace_mb: float = 0.0,
    return_entropy_change: bool = False,
):
    """Vocab-parallel :func:`fusedrl.linear_logprob_entropy` (inputs already validated).

    Args:
        hidden: ``[..., H]``, the same on every rank of ``process_group``.
        weight: ``[V_local, H]`` this rank's contiguous row shard (rank order, uneven allowed).
        targets: ``[...]`` global token ids. bias: ``[V_local]`` shard or None.
        backend_name: a resolved backend ("torch" | "triton" | "cuda" | "reference").
        process_group: the tensor-parallel group (None = the default group).
        reduce_dx: all-reduce ``dx`` over the group inside the op (default True, or False inside
            :func:`partial_dx`); False returns this rank's partial ``dx``.

    Returns:
        ``(logp, entropy)`` fp32 (fp64 for fp64) of shape ``[...]``, identical on every rank;
        entropy None when not asked. ``return_entropy_change``: ``(logp, entropy, dH)``, ``dH`` the global
        entropy change (no gradient). Every rank must run the backward (it may all-reduce ``dx``),
        with the same upstream gradients (the loss head is replicated).
    """
    lead = hidden.shape[:-1]
    x = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    w = weight.contiguous()
    t = targets.reshape(-1).long().contiguous()
    b = None if bias is None else bias.contiguous()
    sizes, rank = vocab_layout(w, process_group)
    vocab_start = sum(sizes[:rank])
    opts = {
        "grad_filter_eps": float(grad_filter_eps),
        "deterministic": bool(deterministic),
        "workspace_mb": float(workspace_mb) or None,
    }
    return_entropy = bool(return_entropy)
    dh = bool(return_entropy_change)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
    if needs_grad:
        logp, ent, d = _TPLinearLogprobEntropy.apply(
            x,
            w,
            t,
            b,
            temperature,
            softcap,
            return_entropy,
            backend_name,
            process_group,
            opts,
            vocab_start,
            sizes,
            rank,
            _want_reduce_dx(reduce_dx),
            dh,
        )
    else:  # scoring (no_grad / frozen weights): forward only, nothing saved
        mod = _backend_module(backend_name, x.device)
        logp, ent, _, d = _tp_forward(
            x, w, t, b, temperature, softcap, return_entropy, mod, process_group, vocab_start, sizes, rank, opts, dh
        )
    out = logp.reshape(lead), (ent.reshape(lead) if return_entropy else None)
    return out + (d.reshape(lead),) if dh else out


def replay_shard(weight: Tensor, group, reduce_dx: Optional[bool]) -> Shard:
    """This rank's :class:`fusedrl.replay.kept.Shard` for sampling replay on a vocabulary-parallel lm_head: its
    first global row, the merge of the shards' row statistics (one ``all_gather`` of ``[k, N]`` and
    :func:`merge_shard_stats`, the core op's merge), and the ``dx`` all-reduce (``reduce_dx`` as
    :func:`tp_linear_logprob_entropy`'s)."""
    sizes, rank = vocab_layout(weight, group)
    world = len(sizes)

    def merge(lse: Tensor, zt: Tensor, ent: Optional[Tensor]):
        rows = [lse, zt] + ([] if ent is None else [ent])
        got = _all_gather(torch.stack(rows), world, group)  # [W, k, N]
        return merge_shard_stats(got[:, 0], got[:, 1], None if ent is None else got[:, 2])

    def reduce(dx: Tensor) -> None:
        dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=group)

    return Shard(sum(sizes[:rank]), merge, reduce if _want_reduce_dx(reduce_dx) else None)
