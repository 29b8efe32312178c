"""Entropy control in the TRL trainer (docs/entropy-control.md, docs/integrations.md): the fields a
``FusedGRPOTrainer(fusedrl_entropy_control={...})`` may set on the mapped :class:`fusedrl.PolicyLossConfig`,
and the per-token inputs the trainer builds for them from TRL's batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch

from ...control import EntropyHistory
from ...loss import ENTROPY_CONTROL_MODES, PolicyLossConfig, segment_ids_from_tokens
from ...loss.config import ENTROPY_CONTROL_FIELDS
from ...loss.entropy_control import CORRIDOR_METRICS, MODE_METRICS, entropy_control_inputs

Tensor = torch.Tensor

#: what ``fusedrl_entropy_control`` may set: a mode of :data:`fusedrl.loss.ENTROPY_CONTROL_MODES`, SSPO's level,
#: the dual-clip bound (TRL's losses have none; STEER and BAPO's authors use verl's 3.0) and the methods' fields
TRL_ENTROPY_CONTROL_KEYS = ("loss_mode", "importance_sampling_level", "clip_ratio_c") + ENTROPY_CONTROL_FIELDS
#: TRL loss types whose surrogate and aggregation the entropy-control modes take over
TRL_ENTROPY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def check_entropy_control(overrides: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """Validate ``fusedrl_entropy_control`` (a dict of :data:`TRL_ENTROPY_CONTROL_KEYS`); errors name the key."""
    if overrides is None:
        return None
    if not isinstance(overrides, Mapping):
        raise TypeError(f"fusedrl_entropy_control must be a dict or None, got {type(overrides).__name__}")
    bad = sorted(set(overrides) - set(TRL_ENTROPY_CONTROL_KEYS))
    if bad:
        raise ValueError(
            f"fusedrl_entropy_control: unknown or TRL-owned keys {bad} (allowed: {TRL_ENTROPY_CONTROL_KEYS}; "
            "the clip range, KL and entropy bonus come from GRPOConfig)"
        )
    mode = overrides.get("loss_mode")
    if mode is not None and mode not in ENTROPY_CONTROL_MODES:
        raise ValueError(f"fusedrl_entropy_control: loss_mode must be one of {ENTROPY_CONTROL_MODES}, got {mode!r}")
    level = overrides.get("importance_sampling_level")
    if level is not None and level != "segment":
        raise ValueError(
            f"fusedrl_entropy_control: importance_sampling_level may only be 'segment' (SSPO; TRL's own levels come "
            f"from GRPOConfig), got {level!r}"
        )
    PolicyLossConfig(**overrides)  # every value checked, errors naming the field
    return dict(overrides)


def apply_entropy_control(cfg: PolicyLossConfig, trainer, loss_type: str) -> PolicyLossConfig:
    """The trainer's mapped config with its ``fusedrl_entropy_control`` fields (validated again with the rest)."""
    overrides = getattr(trainer, "_fusedrl_entropy_control", None)
    if not overrides:
        return cfg
    if "loss_mode" in overrides and loss_type not in TRL_ENTROPY_LOSS_TYPES:
        raise ValueError(
            f"fusedrl_entropy_control: loss_mode={overrides['loss_mode']!r} replaces TRL's clipped surrogate and "
            f"needs loss_type in {TRL_ENTROPY_LOSS_TYPES} (its aggregation), got loss_type={loss_type!r}"
        )
    return cfg.replace(**overrides)


def _per_token(t: Tensor, mask: Tensor, name: str) -> Tensor:
    if t.shape == mask.shape:
        return t
    if t.dim() == 1 and t.shape[0] == mask.shape[0]:
        return t[:, None].expand(mask.shape)
    raise ValueError(f"inputs[{name!r}] must be [B] or [B, K] {tuple(mask.shape)}, got {tuple(t.shape)}")


def entropy_control_side(
    trainer, cfg: PolicyLossConfig, inputs: Mapping[str, Any], ent: Tensor, mask: Tensor, training: bool, group=None
) -> dict[str, Tensor]:
    """The entropy-control inputs of a TRL batch:

    * ``old_entropy`` (STEER, ``steer_entropy="old"``): ``inputs["old_per_token_entropy"]``; on-policy (TRL
      computed no ``old_per_token_logps``) the current entropy, detached (the old policy is the current one);
    * ``entropy_change`` (``steer_exact``): ``inputs["entropy_change"]``;
    * ``external_mask`` / ``behaviour_logp`` (RL-PLUS): ``inputs["external_mask"]`` ([B] or [B, K]) and
      ``inputs.get("behaviour_per_token_logps")``;
    * ``segment_ids`` (SSPO): ``inputs["segment_ids"]``, else split after ``fusedrl_segment_boundary_ids``;
    * ``entropy_reference`` (EPO corridor): the trainer's :class:`fusedrl.control.EntropyHistory`, updated with
      each training micro-batch (per ``inputs["turn_ids"]``, default turn 0) before it is read.
    """
    wants = entropy_control_inputs(cfg)
    side: dict[str, Tensor] = {}
    if "old_entropy" in wants:
        old_ent = inputs.get("old_per_token_entropy")
        if old_ent is None:
            if inputs.get("old_per_token_logps") is not None:
                raise ValueError(
                    "STEER with steer_entropy='old' off-policy (TRL computed old_per_token_logps) needs the old "
                    "policy's entropy in inputs['old_per_token_entropy'], or use steer_entropy='current'"
                )
            old_ent = ent.detach()
        side["old_entropy"] = old_ent
    if "entropy_change" in wants:
        if inputs.get("entropy_change") is None:
            raise ValueError("steer_exact=True in FusedGRPOTrainer needs inputs['entropy_change'] (dH per token)")
        side["entropy_change"] = inputs["entropy_change"]
    if "external_mask" in wants:
        if inputs.get("external_mask") is None:
            raise ValueError("loss_mode='rl_plus' needs inputs['external_mask'] (the external-demonstration tokens)")
        side["external_mask"] = _per_token(inputs["external_mask"], mask, "external_mask")
        if inputs.get("behaviour_per_token_logps") is not None:
            side["behaviour_logp"] = inputs["behaviour_per_token_logps"]
    if "segment_ids" in wants:
        seg = inputs.get("segment_ids")
        if seg is None:
            bounds: Optional[Sequence[int]] = getattr(trainer, "_fusedrl_segment_boundary_ids", None)
            if bounds is None:
                raise ValueError(
                    "importance_sampling_level='segment' needs fusedrl_segment_boundary_ids (sentence-ending token "
                    "ids) or inputs['segment_ids']"
                )
            seg = segment_ids_from_tokens(inputs["completion_ids"], mask, bounds)
        side["segment_ids"] = seg
    if "entropy_reference" in wants:
        hist = getattr(trainer, "_fusedrl_entropy_history", None)
        if hist is None:
            hist = trainer._fusedrl_entropy_history = EntropyHistory()
        turns = inputs.get("turn_ids")
        turns = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device) if turns is None else turns
        if training:
            hist.update(ent.detach(), mask, turns, group=group)
        if hist.overall is None:  # nothing measured yet: a reference equal to the entropy (no penalty inside)
            side["entropy_reference"] = ent.detach()
        else:
            side["entropy_reference"] = _per_token(hist.reference(turns, dtype=ent.dtype), mask, "turn_ids")
    return side


def log_entropy_control_metrics(trainer, metrics: Mapping[str, Tensor], cfg: PolicyLossConfig, mode: str) -> None:
    """The methods' metrics (``steer/*``, ``bapo/*``, ``rl_plus/*``, ``entropy_corridor/*``) into TRL's store,
    averaged over the processes."""
    store = getattr(trainer, "_metrics", None)
    acc = getattr(trainer, "accelerator", None)
    if store is None:
        return
    names = MODE_METRICS.get(cfg.loss_mode, ()) + (CORRIDOR_METRICS if cfg.entropy_corridor is not None else ())
    for k in names:
        v = metrics[k].detach().reshape(1).float()
        if acc is not None:
            v = acc.gather(v)
        store[mode][k].append(v.nanmean().item())
