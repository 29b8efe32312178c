"""The entropy-control modes as verl ``PolicyLossFn``s: a verl actor config in the methods' forks' keys, their
batch keys as keyword arguments, against the plainly written transcriptions of the authors' code.

Each call is verl's (``old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config``), so what is
checked is what a verl run reads: the config mapping, the per-token inputs and the metric keys it logs.
"""

from __future__ import annotations

import pytest
import torch
from _entropy_transcriptions import bapo_loss, rl_plus_loss, steer_loss

from fusedrl.integrations import verl as fr_verl

F64 = torch.float64
TOL = dict(atol=1e-9, rtol=1e-9)


def batch(seed=0, B=4, T=10):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 3 - 0.02
    old = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
    return dict(
        logp=logp,
        old=old,
        adv=torch.randn(B, T, generator=g, dtype=F64),
        mask=mask,
        entropys=torch.rand(B, T, generator=g, dtype=F64) * 3,
        prefix=torch.rand(B, T, generator=g) > 0.5,
        target=torch.exp((old + 0.2 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)),
    )


def call_verl(mode, d, config, loss_agg_mode="token-mean", **per_token):
    """verl's call of a registered loss: (loss, metrics, d loss / d log_prob)."""
    logp = d["logp"].clone().requires_grad_()
    fn = fr_verl.make_verl_policy_loss(mode)
    loss, metrics = fn(d["old"], logp, d["adv"], d["mask"], loss_agg_mode, config, **per_token)
    (g,) = torch.autograd.grad(loss, [logp])
    return loss.detach(), metrics, g


def transcription(fn, d):
    logp = d["logp"].clone().requires_grad_()
    loss, metrics = fn(logp)[:2]
    (g,) = torch.autograd.grad(loss, [logp])
    return loss.detach(), metrics, torch.where(d["mask"], g, torch.zeros_like(g))


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("linear", [True, False])
@pytest.mark.parametrize("mode", ["steer", "entropy_control"])
def test_steer_in_steers_keys(mode, linear, loss_agg_mode):
    """STEER's fork: ``policy_loss.token_weight_min/max``, ``linear``, the old entropy as batch key ``entropys``."""
    d = batch(1)
    config = {
        "clip_ratio_low": 0.2,
        "clip_ratio_high": 0.28,
        "clip_ratio_c": 10.0,
        "policy_loss": {
            "loss_mode": "fusedrl_" + mode,
            "token_weight_min": 0.8,
            "token_weight_max": 1.2,
            "linear": linear,
        },
    }
    got = call_verl("steer", d, config, loss_agg_mode, entropys=d["entropys"])
    want = transcription(
        lambda lp: steer_loss(
            d["old"], lp, d["adv"], d["mask"], d["entropys"], 0.2, 0.28, 10.0, loss_agg_mode, 0.8, 1.2, linear
        ),
        d,
    )
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[2], want[2], **TOL)
    for ours, theirs in [("weight_mean", "mean"), ("weight_min", "min"), ("weight_max", "max")]:
        assert got[1][f"actor/token_weights_{theirs}"] == pytest.approx(
            float(want[1][f"steer/{ours}"]), rel=1e-6, abs=1e-6
        )  # metrics are fp32
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} <= set(got[1])
    # the config as verl stores it names the fork's loss_mode; reading it maps entropy_control to steer
    cfg, _ = fr_verl.policy_loss_config_from_verl(config)
    assert cfg.loss_mode == "steer" and cfg.steer_weighting == ("linear" if linear else "exp")


def test_bapo_in_the_recipes_keys():
    """The BAPO recipe: ``policy_loss.adv_ratio_target`` and ``ratio_{lower,upper}_{start,max,step}``; no input
    beyond verl's own."""
    d = batch(2)
    pl = dict(
        adv_ratio_target=1.5,
        ratio_lower_start=0.6,
        ratio_lower_max=0.8,
        ratio_lower_step=0.05,
        ratio_upper_start=1.2,
        ratio_upper_max=2.0,
        ratio_upper_step=0.1,
    )
    config = {"clip_ratio": 0.2, "policy_loss": pl}
    got = call_verl("bapo", d, config)
    want = transcription(lambda lp: bapo_loss(d["old"], lp, d["adv"], d["mask"], 0.6, 0.8, 0.05, 1.2, 2.0, 0.1, 1.5), d)
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[2], want[2], **TOL)
    for k in ("bapo/clip_low", "bapo/clip_high"):
        assert got[1]["actor/" + k] == pytest.approx(float(want[1][k]), rel=1e-6, abs=1e-6)  # metrics are fp32


@pytest.mark.parametrize("variant", ["script", "clipped", "target_probs"])
def test_rl_plus_in_its_keys(variant):
    """RL-PLUS's actor: ``loss_remove_clip`` (default True, the published run), batch keys ``prefix_mask`` and
    ``target_probs`` (probabilities)."""
    d = batch(3)
    config = {"clip_ratio": 0.2, "loss_remove_clip": variant != "clipped", "policy_loss": {}}
    per_token = {"prefix_mask": d["prefix"]}
    tkw = {"loss_remove_clip": variant != "clipped"}
    if variant == "target_probs":
        per_token["target_probs"] = d["target"]
        tkw["target_probs"] = d["target"]
    mode = "seq-mean-token-sum-norm"  # the run's loss_remove_token_mean=True
    got = call_verl("rl_plus", d, config, mode, **per_token)
    want = transcription(lambda lp: rl_plus_loss(d["old"], lp, d["adv"], d["mask"], d["prefix"], mode=mode, **tkw), d)
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[2], want[2], **TOL)
    for k in ("on_pg_loss", "off_pg_loss", "off_ratio_mean", "off_policy_prob", "on_policy_prob"):
        assert got[1]["actor/" + k] == pytest.approx(
            float(want[1]["rl_plus/" + k]), rel=1e-6, abs=1e-6
        )  # metrics are fp32


def test_missing_or_unknown_per_token_inputs_are_named():
    d = batch(4)
    config = {"policy_loss": {}}
    with pytest.raises(ValueError, match="old_entropy"):
        call_verl("steer", d, config)  # verl's stock actor passes no entropy
    with pytest.raises(ValueError, match="external_mask"):
        call_verl("rl_plus", d, config)
    with pytest.raises(TypeError, match="entropyz"):
        call_verl("steer", d, config, entropyz=d["entropys"])
    with pytest.raises(TypeError, match="old_entropy"):
        call_verl("steer", d, config, entropys=d["entropys"], old_entropy=d["entropys"])
    with pytest.raises(ValueError, match="loss_mode"):
        fr_verl.make_verl_policy_loss("entropy_control")  # the alias names a config, not a registered loss


def test_segment_level_from_the_config():
    """SSPO: ``policy_loss.importance_sampling_level: segment`` with ``segment_ids``; one segment per row is
    the sequence level (per-sequence advantages: the segment ratio's gradient is each token's own, the sequence
    ratio's flows through the mean, which agree when the advantage is constant along the sequence)."""
    d = batch(5)
    d["adv"] = d["adv"][:, :1].expand_as(d["adv"]).clone()
    seg = torch.zeros_like(d["mask"], dtype=torch.long)
    a = call_verl("vanilla", d, {"policy_loss": {"importance_sampling_level": "segment"}}, segment_ids=seg)
    b = call_verl("vanilla", d, {"policy_loss": {"importance_sampling_level": "sequence"}})
    torch.testing.assert_close(a[0], b[0], **TOL)
    torch.testing.assert_close(a[2], b[2], **TOL)
    with pytest.raises(ValueError, match="segment_ids"):
        call_verl("vanilla", d, {"policy_loss": {"importance_sampling_level": "segment"}})
