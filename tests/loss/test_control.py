"""fusedrl.control: the host-side entropy controllers. AdaptiveEntropyCoef against a transcription of TRL 1.16's
adaptive entropy (``GRPOTrainer._compute_loss``, whose source is checked for the rule), TemperatureSwitch (AEPO),
EntropyHistory (EPO's per-turn reference); state_dict round trips through JSON."""

from __future__ import annotations

import inspect
import json
import math
import re

import pytest
import torch

from fusedrl.control import AdaptiveEntropyCoef, EntropyHistory, TemperatureSwitch

F64 = torch.float64


class TRLAdaptiveEntropy:
    """TRL 1.16 ``GRPOTrainer``'s adaptive entropy state, transcribed: ``_last_world_entropy = inf`` at start;
    per micro-batch ``apply_coef = entropy_coef if last <= target else 0`` and window sums; at the optimizer-step
    boundary ``world = sum / max(count, 1)``, ``coef = min(coef + delta, max) if world <= target else
    max(coef - delta, min)``, ``last = world``."""

    def __init__(self, entropy_coef, entropy_target, entropy_coef_delta, entropy_coef_min, entropy_coef_max):
        self.coef, self.target, self.delta = entropy_coef, entropy_target, entropy_coef_delta
        self.lo, self.hi = entropy_coef_min, entropy_coef_max
        self.last = float("inf")
        self.window = None

    def micro_batch(self, entropies, mask, sync):
        apply_coef = self.coef if self.last <= self.target else 0.0
        stats = torch.stack([(entropies * mask).sum(), mask.sum()])
        self.window = stats if self.window is None else self.window + stats
        if sync:
            world = (self.window[0] / self.window[1].clamp(min=1.0)).item()
            if world <= self.target:
                self.coef = min(self.coef + self.delta, self.hi)
            else:
                self.coef = max(self.coef - self.delta, self.lo)
            self.last = world
            self.window = None
        return apply_coef


def test_trl_source_has_the_transcribed_rule():
    trl = pytest.importorskip("trl")
    src = re.sub(r"\s+", " ", inspect.getsource(trl.GRPOTrainer._compute_loss))
    for line in (
        "apply_coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0",
        "world_entropy = (window_stats[0] / window_stats[1].clamp(min=1.0)).item()",
        "if world_entropy <= self.args.entropy_target:",
        "self.entropy_coef = min( self.entropy_coef + self.args.entropy_coef_delta, self.args.entropy_coef_max )",
        "self.entropy_coef = max( self.entropy_coef - self.args.entropy_coef_delta, self.args.entropy_coef_min )",
    ):
        assert line in src, line
    init = re.sub(r"\s+", " ", inspect.getsource(trl.GRPOTrainer.__init__))
    assert 'self._last_world_entropy = float("inf")' in init
    args = trl.GRPOConfig.__dataclass_fields__
    defaults = {k: args[k].default for k in ("entropy_coef", "entropy_target", "entropy_coef_delta",
                                              "entropy_coef_min", "entropy_coef_max")}  # fmt: skip
    ours = AdaptiveEntropyCoef()
    assert defaults == dict(entropy_coef=ours.coef, entropy_target=ours.target, entropy_coef_delta=ours.delta,
                            entropy_coef_min=ours.coef_min, entropy_coef_max=ours.coef_max)  # fmt: skip


@pytest.mark.parametrize("params", [(0.0, 0.2, 0.005, 0.0, 1.0), (0.003, 1.0, 0.002, 0.001, 0.006)])
def test_adaptive_entropy_coef_equals_trl(params):
    g = torch.Generator().manual_seed(1)
    trl_ctl = TRLAdaptiveEntropy(*params)
    ours = AdaptiveEntropyCoef(*params)
    for step in range(40):
        level = 0.2 + 1.6 * (0.5 + 0.5 * math.sin(step / 4))  # entropy wanders across the target
        for micro in range(3):
            ent = torch.rand(4, 7, generator=g, dtype=F64) * 2 * level
            mask = (torch.rand(4, 7, generator=g) > 0.2).to(F64)
            assert ours.applied == trl_ctl.micro_batch(ent, mask, sync=micro == 2)
            ours.observe(ent, mask)
        ours.step()
        assert ours.coef == trl_ctl.coef and ours.last_entropy == trl_ctl.last
    ctl = AdaptiveEntropyCoef(*params)
    assert ctl.applied == 0.0  # TRL: no bonus before the first measurement
    assert ctl.update(params[1]) == min(params[0] + params[2], params[4])  # <= target: raised and applied


def test_adaptive_entropy_coef_state_and_errors():
    ctl = AdaptiveEntropyCoef(coef=0.01, target=0.5, delta=0.004, coef_max=0.02)
    assert ctl.update(0.3) == pytest.approx(0.014)
    assert ctl.update(0.3) == pytest.approx(0.018) and ctl.update(0.1) == pytest.approx(0.02)  # clamped
    assert ctl.update(0.9) == 0.0 and ctl.coef == pytest.approx(0.016)  # gated off, decremented
    blob = json.loads(json.dumps(ctl.state_dict()))
    assert set(blob) == {"entropy_coef", "last_world_entropy"}  # TRL's checkpoint keys
    other = AdaptiveEntropyCoef(coef=0.01, target=0.5, delta=0.004, coef_max=0.02)
    other.load_state_dict(blob)
    assert other.coef == ctl.coef and other.last_entropy == ctl.last_entropy
    fresh = AdaptiveEntropyCoef()
    fresh.load_state_dict(json.loads(json.dumps(AdaptiveEntropyCoef().state_dict())))  # inf survives JSON
    assert math.isinf(fresh.last_entropy)
    with pytest.raises(ValueError, match="no entropy observed"):
        AdaptiveEntropyCoef().step()
    with pytest.raises(ValueError, match="coef_min"):
        AdaptiveEntropyCoef(coef_min=1.0, coef_max=0.5)
    with pytest.raises(ValueError, match="delta"):
        AdaptiveEntropyCoef(delta=-1.0)
    with pytest.raises(ValueError, match="mask"):
        AdaptiveEntropyCoef().observe(torch.zeros(2, 3), torch.ones(2, 4))


def test_temperature_switch_follows_aepo():
    sw = TemperatureSwitch()
    assert (sw.target, sw.t_high, sw.t_low) == (0.5, 1.2, 0.8)
    assert sw.temperature == 1.2 and sw.num_samples(100) == 60  # entropy starts at 0: hot first step
    assert sw.update(0.5) == 1.2  # <= target (the code's comparison; the README writes <)
    assert sw.update(0.51) == 0.8 and sw.num_samples(100) == 30 and sw.num_samples(7) == 3
    other = TemperatureSwitch()
    other.load_state_dict(json.loads(json.dumps(sw.state_dict())))
    assert other.temperature == 0.8
    with pytest.raises(ValueError, match="t_high"):
        TemperatureSwitch(t_high=0.0)
    with pytest.raises(ValueError, match="reinforce_sample_num"):
        TemperatureSwitch(reinforce_sample_num=-1)


def test_entropy_history_per_turn_running_means():
    hist = EntropyHistory()
    ent = torch.tensor([[1.0, 3.0, 9.0], [2.0, 2.0, 2.0], [5.0, 7.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    step1 = hist.update(ent, mask, torch.tensor([0, 1, 0]))
    assert step1 == pytest.approx({0: 4.0, 1: 2.0})  # token means per turn: (1+3+5+7)/4, 2
    step2 = hist.update(ent * 2, mask, torch.tensor([1, 1, 2]))
    assert step2 == pytest.approx({1: 4.0, 2: 12.0})  # (2 + 6 + 4 + 4 + 4) / 5, (10 + 14) / 2
    assert hist.means == pytest.approx({0: 4.0, 1: 3.0, 2: 12.0})  # turn 0 absent at step 2: not padded with 0
    overall = (1 + 3 + 2 + 2 + 2 + 5 + 7) / 7
    assert hist.overall == pytest.approx((overall + 2 * overall) / 2)
    ref = hist.reference(torch.tensor([[0, 0], [2, 7]]), dtype=F64)
    assert ref.shape == (2, 2)  # unseen turn -> the overall mean
    assert ref.reshape(-1).tolist() == pytest.approx([4.0, 4.0, 12.0, hist.overall])
    per_token = hist.reference(torch.tensor([1, 2, 1]))
    assert per_token.dtype == torch.float32 and per_token.tolist() == pytest.approx([3.0, 12.0, 3.0])
    # per-token turn ids (packed) give the same as per-row ones
    other = EntropyHistory()
    other.update(ent, mask, torch.tensor([0, 1, 0])[:, None].expand(3, 3))
    assert other.means == pytest.approx({0: 4.0, 1: 2.0})
    back = EntropyHistory()
    back.load_state_dict(json.loads(json.dumps(hist.state_dict())))
    assert back.means == hist.means and back.counts == hist.counts and back.overall == hist.overall


def test_entropy_history_ema_and_errors():
    hist = EntropyHistory(decay=0.9)
    ent = torch.ones(2, 2, dtype=F64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    hist.update(ent, mask, torch.tensor([0, 0]))
    hist.update(ent * 3, mask, torch.tensor([0, 0]))
    assert hist.means[0] == pytest.approx(0.9 * 1 + 0.1 * 3)
    with pytest.raises(ValueError, match="no entropy recorded"):
        EntropyHistory().reference(torch.tensor([0]))
    with pytest.raises(ValueError, match="turn_ids"):
        EntropyHistory().update(ent, mask, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="non-negative"):
        EntropyHistory().update(ent, mask, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="decay"):
        EntropyHistory(decay=1.0)
