"""Benchmark providers: one object per implementation of the same computation.

Two tasks:

* ``core``: per-token logp + entropy from (hidden [N, H], weight [V, H], targets [N]); training step =
  forward, then backward with random upstream grads (g_lp, g_H) on logp and entropy; scoring =
  no-grad forward.
* ``loss``: a GRPO-style scalar loss (:func:`bench.cases.grpo_loss`: PPO clip + dual clip, token-mean,
  entropy bonus) from the same inputs viewed as [B, T] sequences; training step = forward + backward.

A provider whose package is missing or that cannot run on the device is reported as skipped with the
reason; it is never silently dropped. Peers are imported lazily, only when asked for.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import types
from typing import Callable, Optional

import torch

from .cases import (
    CLIP_COV_LOSS,
    DEFAULT_LOSS,
    KL_COV_LOSS,
    Case,
    CaseSpec,
    LossSemantics,
    _pad_bt,
    build_case,
    grpo_loss,
)

Tensor = torch.Tensor


class Provider:
    name: str = ""
    task: str = "core"  # "core" | "loss"
    has_entropy: bool = True  # core: returns entropy (its grads include the entropy term)
    can_score: bool = True  # core: has a no-grad forward worth timing
    semantics: LossSemantics = DEFAULT_LOSS  # loss task: what the loss computes
    note: str = ""
    family: str = ""  # for plotting / grouping

    def available(self, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        return True, ""

    # core: returns (logp [N] fp32, entropy [N] or None); loss: returns a scalar loss
    def forward(self, case: Case):
        raise NotImplementedError

    def backward(self, case: Case, out) -> None:
        if self.task == "loss":
            out.backward()
            return
        logp, ent = out
        if ent is not None and self.has_entropy:
            torch.autograd.backward([logp, ent], [case.g_lp, case.g_H])
        else:
            torch.autograd.backward([logp], [case.g_lp])

    def score(self, case: Case):
        with torch.no_grad():
            return self.forward(case)


# --------------------------------------------------------------------------------------------------
# eager PyTorch and torch.compile of it
# --------------------------------------------------------------------------------------------------
from fusedrl._measure import eager_logp_entropy  # noqa: E402  (shared with python -m fusedrl)


def eager_grpo(x_bt, w, t_bt, old, adv_bt, mask, sem: LossSemantics = DEFAULT_LOSS):
    B, T, H = x_bt.shape
    logp, ent = eager_logp_entropy(x_bt.reshape(B * T, H), w, t_bt.reshape(B * T))
    return grpo_loss(logp.reshape(B, T), ent.reshape(B, T), old, adv_bt, mask, sem)


class Eager(Provider):
    name, family = "eager", "eager"
    note = "logits in input dtype -> .float() -> log_softmax -> gather; entropy -sum p log p"

    def forward(self, case):
        return eager_logp_entropy(case.x, case.w, case.targets)


def _compile_ok(device: torch.device) -> tuple[bool, str]:
    if not hasattr(torch, "compile"):
        return False, "torch.compile not in this torch"
    if device.type == "cpu":
        import shutil

        if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
            return False, "no C++ compiler for inductor's CPU backend"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401  (inductor's CUDA code generator)
        except Exception as e:
            return False, f"inductor needs triton on CUDA: {e}"
    return True, ""


@functools.cache
def _compiled(kind: str):
    fn = eager_logp_entropy if kind == "core" else eager_grpo
    return torch.compile(fn, dynamic=False)


class Compiled(Provider):
    name, family = "compile", "compile"
    note = "torch.compile(eager) (default mode, dynamic=False); compile time excluded (warm-up)"

    def available(self, device, dtype):
        return _compile_ok(device)

    def forward(self, case):
        return _compiled("core")(case.x, case.w, case.targets)


class EagerGRPO(Provider):
    name, family, task = "eager-grpo", "eager", "loss"
    note = "eager logits + log_softmax + gather + entropy + GRPO-style loss"

    def forward(self, case):
        return eager_grpo(case.x_bt(), case.w, case.targets_bt(), case.old_logp, case.adv_bt(), case.mask)


class CompiledGRPO(Provider):
    name, family, task = "compile-grpo", "compile", "loss"
    note = "torch.compile of eager-grpo; compile time excluded"

    def available(self, device, dtype):
        return _compile_ok(device)

    def forward(self, case):
        return _compiled("loss")(case.x_bt(), case.w, case.targets_bt(), case.old_logp, case.adv_bt(), case.mask)


# --------------------------------------------------------------------------------------------------
# fusedrl
# --------------------------------------------------------------------------------------------------
def filter_eps_for(dtype: torch.dtype) -> float:
    """'auto' gradient-filter threshold, the CCE rule: machine epsilon of the dtype / 32."""
    return torch.finfo(dtype).eps / 32


class FusedRL(Provider):
    family = "fusedrl"

    def __init__(self, backend: str, filter_eps: Optional[float] = None):
        self.backend = backend
        self.filter_eps = filter_eps  # None: exact; float or "auto"
        self.name = f"fusedrl-{backend}" + ("+filter" if filter_eps is not None else "")
        self.note = f"fusedrl.linear_logprob_entropy(backend={backend!r})" + (
            f", grad_filter_eps={filter_eps}" if filter_eps is not None else ""
        )

    def _eps(self, dtype) -> float:
        if self.filter_eps is None:
            return 0.0
        return filter_eps_for(dtype) if self.filter_eps == "auto" else float(self.filter_eps)

    def available(self, device, dtype):
        try:
            from fusedrl.backends import availability
        except Exception as e:
            return False, f"cannot import fusedrl: {e}"
        if device.type == "cpu" and self.backend == "triton":
            return False, "triton on CPU is the interpreter (tests only), not a benchmark provider"
        ok, why = availability(self.backend, device)
        return ok, why

    def forward(self, case):
        import fusedrl

        return fusedrl.linear_logprob_entropy(
            case.x, case.w, case.targets, backend=self.backend, grad_filter_eps=self._eps(case.dtype)
        )


_LOSS_TAGS = {"vanilla": "grpo", "kl_cov": "klcov", "clip_cov": "clipcov"}


class FusedRLLoss(FusedRL):
    """fusedrl.fused_policy_loss with a schedule (``auto`` = one-pass where it fits, ``recompute``)."""

    task, family = "loss", "fusedrl"
    can_score = False

    def __init__(self, backend: str, filter_eps=None, schedule: str = "auto", semantics: LossSemantics = DEFAULT_LOSS):
        super().__init__(backend, filter_eps)
        self.schedule = schedule
        self.semantics = semantics
        self.name = (
            f"fusedrl-{_LOSS_TAGS[semantics.loss_mode]}-{backend}"
            + ("+filter" if filter_eps is not None else "")
            + ("-recompute" if schedule == "recompute" else "")
        )
        self.note = f"fusedrl.fused_policy_loss(backend={backend!r}, schedule={schedule!r}): {semantics.describe()}"

    def available(self, device, dtype):
        ok, why = super().available(device, dtype)
        if not ok:
            return ok, why
        try:
            import fusedrl

            fusedrl.fused_policy_loss, fusedrl.PolicyLossConfig  # noqa: B018
        except Exception as e:
            return False, f"fusedrl.fused_policy_loss not importable yet: {type(e).__name__}: {e}"
        return True, ""

    def forward(self, case):
        import fusedrl

        cfg = self.semantics.policy_config()
        kw = {}
        if self.filter_eps is not None:
            kw["grad_filter_eps"] = self._eps(case.dtype)
        loss, _metrics = fusedrl.fused_policy_loss(
            case.x_bt(),
            case.w,
            case.targets_bt(),
            case.old_logp,
            case.adv_bt(),
            case.mask,
            config=cfg,
            backend=self.backend,
            schedule=self.schedule,
            **kw,
        )
        return loss


class FusedRLReplayLoss(FusedRLLoss):
    """fusedrl.fused_policy_loss on the sampler's kept sets (sampling replay, kept entropy): ``topk20`` (the top
    20 logits of each token) or ``topp95`` (top_p=0.95 under top_k=512, vLLM's rule). The sets are derived from
    the case's own logits once, in row chunks, outside the timed calls (the first, warm-up call)."""

    oracle = False  # a kept-set loss: the full-vocabulary fp64 oracle does not apply (tests check its parity)

    def __init__(self, backend: str, kept: str, semantics: LossSemantics = DEFAULT_LOSS):
        super().__init__(backend, semantics=semantics)
        self.kept = kept
        self.name = f"fusedrl-{_LOSS_TAGS[semantics.loss_mode]}-{backend}-{kept}"
        what = {"topk20": "top-20 kept sets", "topp95": "top_p=0.95 (top_k=512) kept sets"}[kept]
        self.note = f"fusedrl.fused_policy_loss(backend={backend!r}, sampling_mask=<{what}>, " \
                    f"entropy_support='kept'): {semantics.describe()}"  # fmt: skip
        self._sets: dict[int, torch.Tensor] = {}

    def _kept_sets(self, case) -> torch.Tensor:
        key = id(case.x)
        if key not in self._sets:
            from fusedrl.replay import check_truncation, keep_mask

            rows = []
            with torch.no_grad():
                for a in range(0, case.x.shape[0], 256):
                    z = case.x[a : a + 256].float() @ case.w.float().t()
                    if self.kept == "topk20":
                        rows.append(z.topk(20, -1).indices)
                        continue
                    m = keep_mask(z, check_truncation(512, 0.95, None, (z.shape[0],), z.device, False))
                    srt = m.to(torch.int8).sort(dim=-1, descending=True, stable=True)
                    rows.append(torch.where(srt.values[:, :512] > 0, srt.indices[:, :512], -1))
            ids = torch.cat(rows)
            width = max(int((ids >= 0).sum(-1).max()), 1)
            self._sets = {key: ids[:, :width].contiguous()}
        return self._sets[key]

    def forward(self, case):
        import fusedrl

        mask_bt = _pad_bt(self._kept_sets(case), case.B, case.T)  # padding rows: masked tokens
        loss, _metrics = fusedrl.fused_policy_loss(
            case.x_bt(), case.w, case.targets_bt(), case.old_logp, case.adv_bt(), case.mask,
            config=self.semantics.policy_config(), backend=self.backend, schedule=self.schedule,
            sampling_mask=mask_bt, entropy_support="kept",
        )  # fmt: skip
        return loss


class FusedRLEntropyChange(FusedRL):
    """fusedrl.linear_logprob_entropy(..., return_entropy_change=True): the forward with ``dH`` (two more row
    sums), against the same call without it."""

    def __init__(self, backend: str):
        super().__init__(backend)
        self.name = f"fusedrl-{backend}+dh"
        self.note = (
            f"fusedrl.linear_logprob_entropy(backend={backend!r}, return_entropy_change=True); its forward and "
            f"scoring also timed against fusedrl-{backend}'s inside the same repeats"
        )
        # the row's cost is a ratio to the same call without dH: both run in every timed repeat (paired)
        self.paired_base = FusedRL(backend)

    def forward(self, case):
        import fusedrl

        logp, ent, _dh = fusedrl.linear_logprob_entropy(case.x, case.w, case.targets, backend=self.backend,
                                                        return_entropy_change=True)  # fmt: skip
        return logp, ent


#: the entropy-control rows: config fields over the default PPO + entropy bonus, and their per-token inputs
METHODS = {
    "steer": "loss_mode='steer' (linear weights 0.8-1.2 over the batch: two passes) + old_entropy",
    "bapo": "loss_mode='bapo', bounds searched over [0.6, 0.9] x [1.2, 3.0] in steps of 0.05 on the device",
    "rlplus": "loss_mode='rl_plus' + external_mask (one sequence in eight), gamma 0.5",
    "segment": "importance_sampling_level='segment' (SSPO), segments of 32 tokens",
}


class FusedRLMethodLoss(FusedRLLoss):
    """fusedrl.fused_policy_loss with an entropy-control method (docs/entropy-control.md)."""

    oracle = False  # not the GRPO loss of the fp64 oracle: the tests check these against the authors' code

    def __init__(self, backend: str, method: str):
        super().__init__(backend)
        self.method = method
        self.name = f"fusedrl-{method}-{backend}"
        self.note = f"fusedrl.fused_policy_loss(backend={backend!r}): {METHODS[method]}; {DEFAULT_LOSS.describe()}"

    def _config_and_side(self, case):
        import dataclasses

        cfg = self.semantics.policy_config()
        B, T = case.B, case.T
        g = torch.Generator().manual_seed(3)
        if self.method == "steer":
            cfg = dataclasses.replace(cfg, loss_mode="steer")
            return cfg, {"old_entropy": torch.rand(B, T, generator=g).to(case.x.device) * 3}
        if self.method == "bapo":
            return dataclasses.replace(cfg, loss_mode="bapo", bapo_ratio_lower_start=0.6, bapo_ratio_lower_max=0.9,
                                       bapo_ratio_upper_start=1.2, bapo_ratio_upper_max=3.0), {}  # fmt: skip
        if self.method == "rlplus":
            ext = torch.zeros(B, T, dtype=torch.bool, device=case.x.device)
            ext[::8] = True
            return dataclasses.replace(cfg, loss_mode="rl_plus", clip_ratio_c=None), {"external_mask": ext}
        seg = (torch.arange(T, device=case.x.device) // 32).expand(B, T)
        return dataclasses.replace(cfg, importance_sampling_level="segment"), {"segment_ids": seg}

    def forward(self, case):
        import fusedrl

        cfg, side = self._config_and_side(case)
        loss, _metrics = fusedrl.fused_policy_loss(
            case.x_bt(), case.w, case.targets_bt(), case.old_logp, case.adv_bt(), case.mask, config=cfg,
            backend=self.backend, schedule=self.schedule, **side,
        )  # fmt: skip
        return loss


# --------------------------------------------------------------------------------------------------
# peers (optional)
# --------------------------------------------------------------------------------------------------
def _try_import(mod: str):
    try:
        return importlib.import_module(mod), ""
    except Exception as e:
        return None, f"{mod} not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def _has_peer_attr(module: str, attr: str, hint: str = "") -> tuple[bool, str]:
    """(True, "") when ``module`` imports and has ``attr``; else (False, why)."""
    mod, why = _try_import(module)
    if mod is None:
        return False, why
    if not hasattr(mod, attr):
        return False, f"{module} has no {attr}{hint}"
    return True, ""


def _verl_module(sub: str):
    """Import a verl submodule. verl's package __init__ pulls ray/tensordict/...; when that fails, the
    two pure-torch/triton modules we need are loaded behind stub parent packages (no other verl code
    runs)."""
    mod, why = _try_import(f"verl.{sub}")
    if mod is not None:
        return mod, ""
    spec = importlib.util.find_spec("verl") if "verl" not in sys.modules else None
    if spec is None and "verl" not in sys.modules:
        return None, "verl not installed"
    if spec is not None and spec.origin:
        root = os.path.dirname(spec.origin)
        for name, rel in (("verl", ""), ("verl.utils", "utils")):
            if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
                m = types.ModuleType(name)
                m.__path__ = [os.path.join(root, rel)] if rel else [root]
                sys.modules[name] = m
    try:
        return importlib.import_module(f"verl.{sub}"), ""
    except Exception as e:
        return None, f"verl.{sub} not importable ({type(e).__name__}: {e}) [{why}]"


class VerlTriton(Provider):
    name, family = "verl", "verl"
    note = "verl.utils.kernel.linear_cross_entropy (fused Triton logp+entropy, reduction='none')"

    def available(self, device, dtype):
        if device.type != "cuda":
            return False, "verl's fused linear_cross_entropy kernel needs CUDA"
        mod, why = _verl_module("utils.kernel.linear_cross_entropy")
        if mod is None:
            return False, why
        return True, ""

    def forward(self, case):
        mod, _ = _verl_module("utils.kernel.linear_cross_entropy")
        import inspect

        params = (
            inspect.signature(mod.linear_cross_entropy).parameters
            if not hasattr(mod.linear_cross_entropy, "__self__")
            else inspect.signature(mod.LinearCrossEntropy.forward).parameters
        )
        if "temperature" in params:
            return mod.linear_cross_entropy(case.x, case.w, case.targets, 1.0, "none")
        return mod.linear_cross_entropy(case.x, case.w, case.targets, "none")  # older verl: no temperature


class VerlTorch(Provider):
    name, family = "verl-torch", "verl"
    note = "verl.utils.experimental.torch_functional.FusedLinearForPPO (token chunks of 512, torch)"

    def available(self, device, dtype):
        mod, why = _verl_module("utils.experimental.torch_functional")
        return (mod is not None), why

    def forward(self, case):
        mod, _ = _verl_module("utils.experimental.torch_functional")
        try:
            f = mod.FusedLinearForPPO(chunk_size=512, impl_backend="torch")
        except TypeError:
            f = mod.FusedLinearForPPO(chunk_size=512)
        return f(case.x, case.w, case.targets, 1.0)


class Liger(Provider):
    name, family = "liger", "liger"
    note = (
        "liger_kernel.ops.LigerFusedLinearScaledCrossEntropyFunction(return_entropy=True): "
        "SM90 CuTe kernel on H100, chunked torch fallback elsewhere"
    )

    def available(self, device, dtype):
        ok, why = _has_peer_attr(
            "liger_kernel.ops", "LigerFusedLinearScaledCrossEntropyFunction", " (needs liger-kernel >= 0.8.3)"
        )
        if not ok:
            return False, why
        if device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0):
            # on sm90 liger dispatches to a CuTe-DSL kernel that needs nvidia-cutlass-dsl
            sm90, why = _try_import("liger_kernel.ops.cutedsl.ops.fused_scaled_cross_entropy_sm90")
            if sm90 is None:
                return False, f"liger's sm90 kernel is not importable: {why}"
        return True, ""

    def forward(self, case):
        from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction as F

        nll, ent = F.apply(case.x, case.w, case.targets, 1.0, -100, 1, True)
        return -nll, ent


class LigerGRPO(Provider):
    name, family, task = "liger-grpo", "liger", "loss"
    can_score = False
    semantics = LossSemantics(clip_c=None, entropy_coeff=0.0)
    note = (
        "liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss(loss_type='bnpo', beta=0): no entropy term, "
        "no dual clip (Liger's GRPO); backward runs inside its forward"
    )

    def available(self, device, dtype):
        return _has_peer_attr("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")

    @functools.cached_property
    def _mod(self):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        return LigerFusedLinearGRPOLoss(
            beta=0.0, use_ref_model=False, loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.2, compiled=True
        )

    def forward(self, case):
        out = self._mod(
            case.x_bt(), case.w, case.targets_bt(), case.mask, case.adv_seq, old_per_token_logps=case.old_logp
        )
        return out[0] if isinstance(out, (tuple, list)) else out


class CCE(Provider):
    name, family = "cce", "cce"
    has_entropy = False
    note = "cut_cross_entropy.linear_cross_entropy(reduction='none') = -logp; no entropy; filter_eps='auto'"

    def available(self, device, dtype):
        mod, why = _try_import("cut_cross_entropy")
        if mod is None:
            return False, why
        if device.type != "cuda":
            return False, "CCE's Triton kernels need CUDA"
        return True, ""

    def forward(self, case):
        from cut_cross_entropy import linear_cross_entropy

        return -linear_cross_entropy(case.x, case.w, case.targets, reduction="none"), None


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------
FUSEDRL_BACKENDS = ("torch", "triton", "cuda")
FILTER_BACKENDS = ("triton", "cuda")


def all_providers(filter_eps="auto") -> list[Provider]:
    """Every provider the suite knows, in table order (availability is checked later)."""
    out: list[Provider] = [Eager(), Compiled()]
    for b in FUSEDRL_BACKENDS:
        out += [FusedRL(b), FusedRLEntropyChange(b)]
        if b in FILTER_BACKENDS and filter_eps is not None:
            out.append(FusedRL(b, filter_eps))
    out += [Liger(), VerlTriton(), VerlTorch(), CCE()]
    out += [EagerGRPO(), CompiledGRPO()]
    for b in FUSEDRL_BACKENDS:  # the headline rows of every backend first (a time budget cuts the tail)
        out += [
            FusedRLLoss(b),
            FusedRLLoss(b, schedule="recompute"),
            FusedRLLoss(b, semantics=KL_COV_LOSS),
            FusedRLLoss(b, semantics=CLIP_COV_LOSS),
        ]
    # sampling replay runs torch GEMMs and torch row math whatever the backend: one row each
    out += [FusedRLReplayLoss("torch", "topk20"), FusedRLReplayLoss("torch", "topp95")]
    for b in FUSEDRL_BACKENDS:
        out += [FusedRLMethodLoss(b, m) for m in METHODS]
    out.append(LigerGRPO())
    return out


def by_name(name: str, filter_eps="auto") -> Provider:
    for p in all_providers(filter_eps):
        if p.name == name:
            return p
    raise KeyError(name)


def select(tokens: Optional[list[str]], tasks: list[str], filter_eps="auto") -> list[Provider]:
    """Providers whose name starts with one of ``tokens`` (all when None or only exclusions), minus those
    named by a ``!name`` token, restricted to ``tasks``."""
    tokens = list(tokens or [])
    excl = [t[1:] for t in tokens if t.startswith("!")]
    incl = [t for t in tokens if not t.startswith("!")]
    out = []
    for p in all_providers(filter_eps):
        if p.task not in tasks or any(p.name == t for t in excl):
            continue
        if not incl or any(p.name == t or p.name.startswith(t) for t in incl):
            out.append(p)
    return out


# --------------------------------------------------------------------------------------------------
# CPU peak-memory child factory (runs in a spawned process: rebuilds everything from plain data)
# --------------------------------------------------------------------------------------------------
def memory_factory(provider: str, spec: dict, mode: str, filter_eps="auto") -> Callable[[], object]:
    # the one-pass CPU workspace kept between calls would sit in the baseline RSS (measured after a
    # warm-up run) and vanish from the peak: measure with fresh allocations instead
    os.environ["FUSEDRL_CPU_WORKSPACE_CACHE"] = "0"
    p = by_name(provider, filter_eps)
    case = build_case(CaseSpec(**spec), requires_grad=(mode == "train"))

    if mode == "score":

        def run():
            return p.score(case)
    else:

        def run():
            case.zero_grads()
            out = p.forward(case)
            p.backward(case, out)
            del out
            return (case.x.grad, case.w.grad)

    run.reset = case.zero_grads
    return run


GEMM_NAMES = ("x@W^T [N,V]", "dz@W [N,H]", "dz^T@x [V,H]")
