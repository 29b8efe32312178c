"""The trainer classes: :class:`FusedGRPOMixin` (mix into any ``GRPOTrainer`` subclass) and the
``FusedGRPOTrainer`` built on TRL's ``GRPOTrainer`` on first use (TRL is imported only then)."""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Optional

import torch

from ...control import EntropyHistory
from .. import hf
from .config import FusedRLUnsupported
from .entropy import check_entropy_control
from .loss import autocast_for, fused_grpo_loss, static_unsupported_reason
from .replay import check_replay_options, padded_rollout_masks, replay_kwargs


# --------------------------------------------------------------------------------------------------
# trainer classes
# --------------------------------------------------------------------------------------------------
class FusedGRPOMixin:
    """Mix into a ``trl.GRPOTrainer`` (sub)class: ``class T(FusedGRPOMixin, GRPOTrainer)``.

    Extra constructor keyword arguments:
        fusedrl_backend: fusedrl backend (``"auto"``).
        fusedrl_entropy_coeff: entropy bonus coefficient; overrides ``GRPOConfig.entropy_coef`` (it is
            written into the trainer's ``entropy_coef``, so TRL's own loss applies the same bonus on a
            fallback step).
        fusedrl_fallback: ``"warn"`` (default: use TRL's own loss for what :data:`TRL_FALLBACKS` lists,
            warning once) or ``"error"``.
        fusedrl_score: also score old / reference log-probs with fusedrl (default True).
        fusedrl_entropy_control: a dict of :class:`fusedrl.PolicyLossConfig` entropy-control fields set on the
            mapped config (``loss_mode="steer" | "bapo" | "rl_plus"``, ``importance_sampling_level="segment"``,
            ``clip_ratio_c``, ``steer_*``, ``bapo_*``, ``rl_plus_*``, ``entropy_corridor[_coeff]``;
            docs/entropy-control.md); the per-token inputs come from the batch (see
            ``fusedrl.integrations.trl.entropy.entropy_control_side``).
        fusedrl_segment_boundary_ids: SSPO's sentence-ending token ids (segments split after them).
        fusedrl_entropy_history: the :class:`fusedrl.control.EntropyHistory` of the entropy corridor's reference
            (default: a new one, updated with each training micro-batch).
        fusedrl_sampling_replay: ``"auto"`` (default: with vLLM and ``top_k`` / ``top_p`` / ``min_p`` sampling),
            True or False: normalise every log-prob (old, reference, current) over the sampler's kept set, as
            vLLM's processed log-probs are (``fusedrl.integrations.trl.replay``; docs/replay.md).
        fusedrl_entropy_support: ``"full"`` (default) or ``"kept"``: the entropy under replay.

    The configuration is checked when the trainer is built: a static setting the fused loss does not
    reproduce warns (or raises, with ``fusedrl_fallback="error"``) there, not at the first step.
    """

    def __init__(
        self,
        *args,
        fusedrl_backend: str = "auto",
        fusedrl_entropy_coeff: Optional[float] = None,
        fusedrl_fallback: str = "warn",
        fusedrl_score: bool = True,
        fusedrl_entropy_control: Optional[dict] = None,
        fusedrl_segment_boundary_ids=None,
        fusedrl_entropy_history=None,
        fusedrl_sampling_replay="auto",
        fusedrl_entropy_support: str = "full",
        **kwargs,
    ):
        if fusedrl_fallback not in ("warn", "error"):
            raise ValueError(f"fusedrl_fallback must be 'warn' or 'error', got {fusedrl_fallback!r}")
        if fusedrl_entropy_coeff is not None and not (
            isinstance(fusedrl_entropy_coeff, (int, float)) and math.isfinite(fusedrl_entropy_coeff)
        ):
            raise ValueError(f"fusedrl_entropy_coeff must be a finite number, got {fusedrl_entropy_coeff!r}")
        self._fusedrl_backend = fusedrl_backend
        self._fusedrl_entropy_coeff = fusedrl_entropy_coeff
        self._fusedrl_fallback = fusedrl_fallback
        self._fusedrl_score = fusedrl_score
        self._fusedrl_warned = set()
        self._fusedrl_entropy_control = check_entropy_control(fusedrl_entropy_control)
        if fusedrl_segment_boundary_ids is not None:
            fusedrl_segment_boundary_ids = [int(t) for t in fusedrl_segment_boundary_ids]
        self._fusedrl_segment_boundary_ids = fusedrl_segment_boundary_ids
        if fusedrl_entropy_history is not None and not isinstance(fusedrl_entropy_history, EntropyHistory):
            raise TypeError(
                f"fusedrl_entropy_history must be a fusedrl.control.EntropyHistory, got "
                f"{type(fusedrl_entropy_history).__name__}"
            )
        self._fusedrl_entropy_history = fusedrl_entropy_history
        check_replay_options(fusedrl_sampling_replay, fusedrl_entropy_support)
        self._fusedrl_sampling_replay = fusedrl_sampling_replay
        self._fusedrl_entropy_support = fusedrl_entropy_support
        super().__init__(*args, **kwargs)
        if fusedrl_entropy_coeff is not None:
            self._fusedrl_take_entropy_coeff(float(fusedrl_entropy_coeff))
        reason = static_unsupported_reason(self)
        if reason is not None:
            self._fusedrl_fall_back(reason, stacklevel=3)

    def _fusedrl_take_entropy_coeff(self, coeff: float) -> None:
        """Make ``fusedrl_entropy_coeff`` the trainer's ``entropy_coef``: the fused loss reads it there, and so
        does TRL's own loss when a step falls back (before, a fallback step raised: TRL would drop it)."""
        if hasattr(self, "entropy_coef") and hasattr(self, "_entropy_bonus_enabled"):
            self.entropy_coef = coeff
            self._entropy_bonus_enabled = coeff != 0.0 or bool(getattr(self, "use_adaptive_entropy", False))
            return
        # A GRPOTrainer without an entropy bonus of its own: a fallback step would drop the bonus.
        reason = static_unsupported_reason(self)
        if coeff != 0.0 and reason is not None:
            raise ValueError(
                f"fusedrl_entropy_coeff={coeff} cannot be honoured: this configuration uses TRL's own loss "
                f"({reason}), and this TRL version's GRPOTrainer has no entropy bonus (entropy_coef) to hand it to"
            )

    def _fusedrl_fall_back(self, reason: str, stacklevel: int = 4) -> None:
        if self._fusedrl_fallback == "error":
            raise FusedRLUnsupported(
                reason, "fusedrl does not reproduce TRL's loss with this setting (fusedrl_fallback='error')"
            )
        if reason not in self._fusedrl_warned:
            self._fusedrl_warned.add(reason)
            warnings.warn(
                f"fusedrl: the fused loss does not cover {reason}; TRL's own loss is used for the steps that need it",
                stacklevel=stacklevel,
            )

    def _compute_loss(self, model, inputs):
        try:
            return fused_grpo_loss(self, model, inputs)
        except FusedRLUnsupported as e:
            self._fusedrl_fall_back(e.reason)
            if self._fusedrl_entropy_coeff and not hasattr(self, "_entropy_bonus_enabled"):
                raise ValueError(  # only for TRL versions without an entropy bonus of their own
                    f"fusedrl_entropy_coeff is set but this step needs TRL's own loss ({e.reason}), which has no "
                    "entropy bonus in this TRL version"
                ) from None
            return super()._compute_loss(model, inputs)

    def _generate(self, prompts):
        """TRL's generation; a ``rollout_func``'s ``"sampling_mask"`` (the kept ids per completion and token) is
        taken out of the extra fields and kept for this batch's scoring and loss."""
        out = super()._generate(prompts)
        extra = out[5] if isinstance(out, tuple) and len(out) > 5 else None
        if isinstance(extra, dict) and "sampling_mask" in extra:
            self._fusedrl_rollout_masks = extra.pop("sampling_mask")
        return out

    def _generate_and_score_completions(self, inputs):
        """TRL's batch preparation; with the rollout's kept sets, the old and reference log-probs are scored on
        them and the batch carries them to the loss as ``sampling_mask`` (padded ``[B, T, K]``)."""
        self._fusedrl_rollout_masks, self._fusedrl_batch_mask = None, None
        try:
            output = super()._generate_and_score_completions(inputs)
            if self._fusedrl_rollout_masks is not None:
                output["sampling_mask"] = self._fusedrl_mask_for(output["completion_ids"].shape[1],
                                                                 output["completion_ids"].device)  # fmt: skip
            return output
        finally:
            self._fusedrl_rollout_masks, self._fusedrl_batch_mask = None, None

    def _fusedrl_mask_for(self, length: int, device):
        cached = getattr(self, "_fusedrl_batch_mask", None)
        if cached is None or cached.shape[1] != length:
            cached = padded_rollout_masks(self._fusedrl_rollout_masks, length, device)
            self._fusedrl_batch_mask = cached
        return cached

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, *args, **kwargs
    ):
        extra = any(v is not None and v is not False for v in kwargs.values()) or bool(args)
        if not self._fusedrl_score or extra:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, *args, **kwargs
            )
        batch_size = batch_size or input_ids.size(0)
        temperature = float(getattr(self, "temperature", 1.0) or 1.0)
        masks = getattr(self, "_fusedrl_rollout_masks", None)  # this batch's kept sets, while it is scored
        mask = None
        if masks is not None and len(masks) == input_ids.size(0):
            mask = self._fusedrl_mask_for(logits_to_keep, input_ids.device)
        logps, ents = [], []
        for s in range(0, input_ids.size(0), batch_size):
            ids, am = input_ids[s : s + batch_size], attention_mask[s : s + batch_size]
            batch = None if mask is None else {"sampling_mask": mask[s : s + batch_size]}
            with autocast_for(self):
                lp, en = hf.hf_logprob_entropy(
                    model,
                    ids,
                    am,
                    response_mask=am[:, -logits_to_keep:],
                    temperature=temperature,
                    return_entropy=compute_entropy,
                    backend=self._fusedrl_backend,
                    **replay_kwargs(self, batch),
                )
            logps.append(lp)
            ents.append(en)
        logp = torch.cat(logps, 0)
        ent = torch.cat(ents, 0) if compute_entropy else None
        if _returns_aux_loss(type(self)):
            return logp, ent, None
        return logp, ent


def _returns_aux_loss(cls) -> bool:
    """Whether this TRL version's ``_get_per_token_logps_and_entropies`` returns (logp, entropy, aux_loss)."""
    for base in cls.__mro__:
        if base is FusedGRPOMixin:
            continue
        fn = base.__dict__.get("_get_per_token_logps_and_entropies")
        if fn is not None:
            try:
                return "compute_aux_loss" in inspect.signature(fn).parameters
            except (TypeError, ValueError):  # pragma: no cover
                return False
    return False


_CLASS_CACHE: dict[Any, type] = {}


def make_fused_grpo_trainer_class(base=None) -> type:
    """``FusedGRPOMixin`` + ``base`` (default ``trl.GRPOTrainer``; imports TRL)."""
    if base is None:
        from trl import GRPOTrainer as base  # noqa: N813
    if base not in _CLASS_CACHE:
        _CLASS_CACHE[base] = type(
            "FusedGRPOTrainer",
            (FusedGRPOMixin, base),
            {
                "__doc__": f"``{base.__name__}`` whose loss (and old/ref scoring) runs on fusedrl; "
                "see fusedrl.integrations.trl.",
                "__module__": "fusedrl.integrations.trl",
            },
        )
    return _CLASS_CACHE[base]
