"""Host-side entropy controllers, stepped once per optimizer step (docs/entropy-control.md):

* :class:`AdaptiveEntropyCoef`: the adaptive entropy-bonus coefficient of Skywork-OR1 as TRL 1.16 implements
  it (``GRPOConfig.use_adaptive_entropy``; ``GRPOTrainer._compute_loss``), update rule and gate identical;
* :class:`TemperatureSwitch`: AEPO's rollout-temperature switch (597358816/AEPO ``RayPPOTrainer.fit``);
* :class:`EntropyHistory`: per-turn running means of the policy entropy, the reference of EPO's entropy
  corridor (``PolicyLossConfig.entropy_corridor``, ``entropy_reference=``).

They hold Python numbers; reading a measurement is their one host sync (once per step). Each has
``state_dict`` / ``load_state_dict`` (plain Python values: JSON- and ``torch.save``-able) for checkpoints.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

Tensor = torch.Tensor

__all__ = ["AdaptiveEntropyCoef", "TemperatureSwitch", "EntropyHistory"]


def _number(name: str, v, *, lo: Optional[float] = None, allow_inf: bool = False) -> float:
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if math.isnan(v) or (math.isinf(v) and not allow_inf) or (lo is not None and v < lo):
        bound = "" if lo is None else f" >= {lo}"
        raise ValueError(f"{name} must be a finite number{bound}, got {v}")
    return v


def _window_stats(entropy: Tensor, mask: Tensor) -> Tensor:
    """``[sum(H m), sum(m)]`` (detached, fp64, on the entropy's device)."""
    if not isinstance(entropy, Tensor) or not isinstance(mask, Tensor):
        raise TypeError("entropy and mask must be tensors")
    if entropy.shape != mask.shape:
        raise ValueError(f"mask must have the shape of entropy {tuple(entropy.shape)}, got {tuple(mask.shape)}")
    m = (mask != 0).to(torch.float64)
    h = torch.where(mask != 0, entropy.detach().to(torch.float64), torch.zeros((), dtype=torch.float64))
    return torch.stack([(h * m).sum(), m.sum()])


class AdaptiveEntropyCoef:
    """The adaptive entropy-bonus coefficient (Skywork-OR1, arXiv 2505.22312; TRL 1.16 ``use_adaptive_entropy``).

    Per optimizer step: the loss applies :attr:`applied` (``coef`` while the last measured entropy is
    ``<= target``, else 0; nothing before the first measurement, as TRL's ``inf`` start); then the step's
    token-mean entropy ``H`` (over every micro-batch of the accumulation window and every rank) moves
    ``coef`` to ``min(coef + delta, coef_max)`` if ``H <= target`` else ``max(coef - delta, coef_min)``.
    Defaults are TRL's (``entropy_coef=0``, ``entropy_target=0.2``, ``entropy_coef_delta=0.005``,
    ``entropy_coef_min=0``, ``entropy_coef_max=1``).

    Use ``observe(entropy, mask)`` on each micro-batch (device-side, no sync) and ``step(group)`` at the
    optimizer-step boundary (one all-reduce over ``group`` and one host read), or ``update(H)`` with a
    measurement of your own.
    """

    def __init__(
        self,
        coef: float = 0.0,
        target: float = 0.2,
        delta: float = 0.005,
        coef_min: float = 0.0,
        coef_max: float = 1.0,
    ) -> None:
        self.coef = _number("coef", coef)
        self.target = _number("target", target, allow_inf=True)
        self.delta = _number("delta", delta, lo=0.0)
        self.coef_min = _number("coef_min", coef_min)
        self.coef_max = _number("coef_max", coef_max)
        if self.coef_min > self.coef_max:
            raise ValueError(f"coef_min must be <= coef_max, got {self.coef_min} > {self.coef_max}")
        self.last_entropy = math.inf
        self._window: Optional[Tensor] = None

    @property
    def applied(self) -> float:
        """The coefficient the loss applies this step: ``coef`` if the last entropy ``<= target``, else 0."""
        return self.coef if self.last_entropy <= self.target else 0.0

    def observe(self, entropy: Tensor, mask: Tensor) -> None:
        """Add a micro-batch's entropy (``[B, T]`` / ``[N]``, masked) to the step's window (no host sync)."""
        stats = _window_stats(entropy, mask)
        self._window = stats if self._window is None else self._window + stats.to(self._window.device)

    def step(self, group=None) -> float:
        """End of an optimizer step: the window's token-mean entropy (summed over ``group`` when given), then
        :meth:`update`; returns the new :attr:`applied`. Without observations since the last step it raises."""
        if self._window is None:
            raise ValueError("AdaptiveEntropyCoef.step: no entropy observed since the last step (call observe)")
        tot = self._window
        if group is not None:
            tot = tot.clone()
            torch.distributed.all_reduce(tot, op=torch.distributed.ReduceOp.SUM, group=group)
        self._window = None
        return self.update((tot[0] / tot[1].clamp(min=1.0)).item())

    def update(self, entropy: float) -> float:
        """TRL's rule with a measured token-mean entropy; returns the new :attr:`applied`."""
        h = _number("entropy", entropy, allow_inf=True)
        if h <= self.target:
            self.coef = min(self.coef + self.delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.delta, self.coef_min)
        self.last_entropy = h
        return self.applied

    def state_dict(self) -> dict[str, Any]:
        """TRL's checkpoint keys (``entropy_ctrl_state.json``)."""
        return {"entropy_coef": self.coef, "last_world_entropy": self.last_entropy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = _number("entropy_coef", state["entropy_coef"])
        self.last_entropy = _number("last_world_entropy", state["last_world_entropy"], allow_inf=True)
        self._window = None


class TemperatureSwitch:
    """AEPO's temperature switch (arXiv 2510.08141; 597358816/AEPO ``RayPPOTrainer.fit``): the control
    rollout samples at ``t_high`` when the last step's entropy is ``<= target`` and at ``t_low`` otherwise
    (``entropy_base=0.5``, ``temperature_high=1.2``, ``temperature_low=0.8``; the entropy starts at 0, so the
    first step samples hot). :meth:`num_samples` is AEPO's count of control samples
    (``min(reinforce_sample_num, available)``, halved while the entropy is above target)."""

    def __init__(
        self,
        target: float = 0.5,
        t_high: float = 1.2,
        t_low: float = 0.8,
        reinforce_sample_num: int = 60,
        initial_entropy: float = 0.0,
    ) -> None:
        self.target = _number("target", target)
        self.t_high = _number("t_high", t_high, lo=0.0)
        self.t_low = _number("t_low", t_low, lo=0.0)
        if not self.t_high > 0 or not self.t_low > 0:
            raise ValueError(f"t_high and t_low must be positive, got {self.t_high}, {self.t_low}")
        if (
            isinstance(reinforce_sample_num, bool)
            or not isinstance(reinforce_sample_num, int)
            or reinforce_sample_num < 0
        ):
            raise ValueError(f"reinforce_sample_num must be a non-negative int, got {reinforce_sample_num!r}")
        self.reinforce_sample_num = reinforce_sample_num
        self.last_entropy = _number("initial_entropy", initial_entropy)

    @property
    def low_entropy(self) -> bool:
        return self.last_entropy <= self.target

    @property
    def temperature(self) -> float:
        """The control rollout's temperature for this step."""
        return self.t_high if self.low_entropy else self.t_low

    def num_samples(self, available: int) -> int:
        """How many selected control samples replace main-batch samples this step."""
        k = min(self.reinforce_sample_num, int(available))
        return k if self.low_entropy else k // 2

    def update(self, entropy: float) -> float:
        """Record this step's entropy; returns the next step's temperature."""
        self.last_entropy = _number("entropy", entropy)
        return self.temperature

    def state_dict(self) -> dict[str, Any]:
        return {"last_entropy": self.last_entropy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_entropy = _number("last_entropy", state["last_entropy"])


class EntropyHistory:
    """Per-turn running means of the policy entropy: the reference ``H_ref`` of EPO's entropy corridor
    (arXiv 2509.22576; WujiangXu/EPO keeps one token-mean entropy per turn and step, and ``H_ref`` is the
    plain mean of those over every step so far).

    ``update(entropy, mask, turn_ids)`` takes a step's per-token entropy (``[B, T]`` or packed ``[N]``), its
    mask and the turn index of each row (``[B]``) or token (entropy's shape); each turn's token-mean of the
    step joins that turn's running mean (``decay=None``: the cumulative mean over the steps the turn
    appeared in, as EPO; a float: an exponential moving average). Turns absent from a step are not padded
    with 0 (EPO's left padding is not reproduced). ``reference(turn_ids)`` looks the means up (a turn never
    seen takes the mean over all tokens seen so far, with the same averaging).
    """

    def __init__(self, decay: Optional[float] = None) -> None:
        if decay is not None:
            decay = _number("decay", decay, lo=0.0)
            if not decay < 1:
                raise ValueError(f"decay must be in [0, 1) or None, got {decay}")
        self.decay = decay
        self.means: dict[int, float] = {}
        self.counts: dict[int, int] = {}
        self.overall: Optional[float] = None
        self.steps = 0

    def _fold(self, key, new: float) -> None:
        if key is None:
            old, n = self.overall, self.steps
        else:
            old, n = self.means.get(key), self.counts.get(key, 0)
        if old is None:
            val = new
        elif self.decay is None:
            val = old + (new - old) / (n + 1)
        else:
            val = self.decay * old + (1 - self.decay) * new
        if key is None:
            self.overall = val
        else:
            self.means[key], self.counts[key] = val, n + 1

    def update(self, entropy: Tensor, mask: Tensor, turn_ids: Tensor, group=None) -> dict[int, float]:
        """Fold a step's per-turn token-mean entropies in (over ``group``'s ranks when given); returns them."""
        stats = _window_stats(entropy, mask)  # checks the shapes
        turns = _per_token(turn_ids, entropy)
        valid = (mask != 0).reshape(-1)
        h = torch.where(valid, entropy.detach().reshape(-1).to(torch.float64), torch.zeros((), dtype=torch.float64))
        t = turns.reshape(-1)
        if (t[valid] < 0).any():
            raise ValueError("turn_ids must be non-negative")
        n_turns = int(t[valid].max().item()) + 1 if bool(valid.any()) else 0
        if group is not None:
            size = torch.tensor([n_turns], dtype=torch.int64, device=h.device)
            torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MAX, group=group)
            n_turns = int(size.item())
        idx = torch.where(valid, t, torch.zeros_like(t))
        sums = torch.zeros(2, n_turns, dtype=torch.float64, device=h.device)
        sums[0].index_add_(0, idx, h)
        sums[1].index_add_(0, idx, valid.to(torch.float64))
        if group is not None:
            sums = torch.cat([sums.reshape(-1), stats.to(h.device)])
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM, group=group)
            stats, sums = sums[-2:], sums[:-2].reshape(2, n_turns)
        host = sums.cpu().tolist()
        step = {k: host[0][k] / host[1][k] for k in range(n_turns) if host[1][k] > 0}
        for k, v in step.items():
            self._fold(k, v)
        tot = stats.cpu().tolist()
        if tot[1] > 0:
            self._fold(None, tot[0] / tot[1])
            self.steps += 1
        return step

    def reference(self, turn_ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``H_ref`` of each element of ``turn_ids`` (same shape and device; pass per-token turn ids, or expand
        a per-row result, for ``entropy_reference=``)."""
        if self.overall is None:
            raise ValueError("EntropyHistory.reference: no entropy recorded yet (call update first)")
        if not isinstance(turn_ids, Tensor) or turn_ids.is_floating_point():
            raise TypeError("turn_ids must be an integer tensor")
        keys = sorted(self.means)
        n = (keys[-1] + 1) if keys else 0
        table = [self.means.get(k, self.overall) for k in range(n)] + [self.overall]
        lut = torch.tensor(table, dtype=dtype).to(turn_ids.device)
        idx = turn_ids.long().clamp(0, n)  # unseen (>= n or negative) -> the overall mean
        idx = torch.where((turn_ids < 0) | (turn_ids >= n), torch.full_like(idx, n), idx)
        return lut[idx]

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "means": {str(k): v for k, v in self.means.items()},
            "counts": {str(k): v for k, v in self.counts.items()},
            "overall": self.overall,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.means = {int(k): float(v) for k, v in state["means"].items()}
        self.counts = {int(k): int(v) for k, v in state["counts"].items()}
        self.overall = None if state["overall"] is None else float(state["overall"])
        self.steps = int(state["steps"])


def _per_token(turn_ids: Tensor, entropy: Tensor) -> Tensor:
    """Turn ids per token: ``[B]`` per row broadcast over ``[B, T]``, or already of the entropy's shape."""
    if not isinstance(turn_ids, Tensor) or turn_ids.is_floating_point() or turn_ids.dtype == torch.bool:
        raise TypeError("turn_ids must be an integer tensor")
    turn_ids = turn_ids.to(entropy.device).long()
    if turn_ids.shape == entropy.shape:
        return turn_ids
    if entropy.dim() == 2 and turn_ids.shape == entropy.shape[:1]:
        return turn_ids[:, None].expand(entropy.shape)
    raise ValueError(
        f"turn_ids must be per row [B] or per token {tuple(entropy.shape)}, got shape {tuple(turn_ids.shape)}"
    )
