"""fusedrl's verl policy losses against verl's own (``core_algos.get_policy_loss_fn``), and fusedrl's rollout
correction against ``rollout_corr_helper.compute_rollout_correction_and_rejection_mask`` feeding verl's vanilla
loss. Needs verl (skipped cleanly without it; nothing here installs it).

Values, gradients w.r.t. the log-probs and verl's metrics, for every registered mode, every aggregation
(``token-sum`` included), with and without ``rollout_is_weights`` and data-parallel ``global_batch_info``, on a
batch with a fully masked row and log-ratios of +-30.
"""

import math

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
rch = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")

import fusedrl  # noqa: E402
from fusedrl.integrations import verl as fr_verl  # noqa: E402

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
GBI = [{}, dict(dp_size=2, batch_num_tokens=70, global_batch_size=12, loss_scale_factor=16)]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    fr_verl.register_verl_policy_losses()


def _actor_config(mode, agg="token-mean", gbi=None, rc=None, **pl):
    from verl.workers.config import ActorConfig
    from verl.workers.config.actor import PolicyLossConfig as VerlPolicyLossConfig

    pl_kw = dict(loss_mode=mode, kl_cov_ratio=0.1, clip_cov_ratio=1.0, clip_cov_lb=0.0, dro_beta=0.3)
    pl_kw.update(pl)
    if rc is not None:
        from verl.trainer.config.algorithm import RolloutCorrectionConfig

        pl_kw["rollout_correction"] = RolloutCorrectionConfig(**rc)
    cfg = ActorConfig(
        strategy="fsdp",
        ppo_micro_batch_size_per_gpu=1,
        rollout_n=1,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        loss_agg_mode=agg,
        policy_loss=VerlPolicyLossConfig(**pl_kw),
    )
    cfg.global_batch_info.update(gbi or {})
    return cfg


def _batch(seed=1, B=6, T=9, far=True):
    """log-probs in (-3, 0), old = logp + noise, a fully masked row, and log-ratios of +-30."""
    g = torch.Generator().manual_seed(seed)
    lp = -3 * torch.rand(B, T, generator=g) - 0.02
    old = (lp + 0.3 * torch.randn(B, T, generator=g)).clamp(max=-0.01)
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    mask[:, 0] = 1.0
    mask[2] = 0.0
    if far:
        lp[0, 1], old[0, 1], mask[0, 1] = -1.0, -31.0, 1.0  # d = +30
        lp[1, 2], old[1, 2], mask[1, 2] = -31.0, -1.0, 1.0  # d = -30
    return lp, old, adv, mask


def _compare(name_ref, fused, lp, kw, msg, check_metrics=True):
    """verl's registered loss ``name_ref`` vs ``fused`` (a registry name or a PolicyLossFn)."""
    x1, x2 = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    fused_fn = core_algos.get_policy_loss_fn(fused) if isinstance(fused, str) else fused
    l1, m1 = core_algos.get_policy_loss_fn(name_ref)(log_prob=x1, **kw)
    l2, m2 = fused_fn(log_prob=x2, **kw)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l2.float(), l1.float(), atol=1e-5, rtol=1e-5, msg=f"loss {msg}")
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-6, rtol=1e-5, msg=f"grad {msg}")
    if check_metrics:
        missing = {k for k in m1 if k.startswith("actor/")} - set(m2)
        assert not missing, f"{msg}: metrics {missing} missing"
        for k, v in m1.items():
            if k.startswith("actor/") and isinstance(v, float):
                assert m2[k] == pytest.approx(v, rel=1e-5, abs=1e-6), f"{k} {msg}"
    return m1, m2


MODES = ["vanilla", "dppo_tv", "dppo_kl", "gspo", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean", "dro", "cispo"]


def test_every_verl_mode_is_registered():
    assert set(fr_verl.VERL_LOSS_MODES) == set(core_algos.POLICY_LOSS_REGISTRY) - {
        k for k in core_algos.POLICY_LOSS_REGISTRY if k.startswith("fusedrl_")
    }
    for mode in fr_verl.VERL_LOSS_MODES:
        assert getattr(core_algos.get_policy_loss_fn(f"fusedrl_{mode}"), "_fusedrl", False)


# fusedrl/loss/ clamps every log-ratio to [-20, 20] before exponentiating; verl's kl_cov does not
_FAR_XFAIL = {
    "kl_cov": "documented difference (README, Differences from verl: ratio clamp everywhere): fusedrl "
    "clamps kl_cov's log-ratio at +-20 before exp, verl does not"
}


@pytest.mark.parametrize("mode", MODES)
def test_mode_matches_verl(mode):
    """Each mode over every aggregation, with and without data-parallel global_batch_info (a fully masked row
    included)."""
    lp, old, adv, mask = _batch(far=False)
    for agg in AGG_MODES:
        for gbi in GBI:
            cfg = _actor_config(mode, agg, gbi)
            kw = dict(old_log_prob=old, advantages=adv, response_mask=mask, loss_agg_mode=agg, config=cfg)
            _compare(mode, f"fusedrl_{mode}", lp, kw, f"{mode} {agg} {gbi}")


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=_FAR_XFAIL[m])) if m in _FAR_XFAIL else m
        for m in MODES
    ],
)
def test_far_off_policy_matches_verl(mode):
    """|logp - old| = 30 on two tokens."""
    lp, old, adv, mask = _batch(far=True)
    for agg in ("token-mean", "seq-mean-token-sum"):
        cfg = _actor_config(mode, agg)
        kw = dict(old_log_prob=old, advantages=adv, response_mask=mask, loss_agg_mode=agg, config=cfg)
        _compare(mode, f"fusedrl_{mode}", lp, kw, f"{mode} {agg} far")


@pytest.mark.parametrize("mode", MODES)
def test_rollout_is_weights_honoured(mode):
    """verl's precomputed rollout_is_weights (IcePop zeros included) on fusedrl's loss, not handed back."""
    lp, old, adv, mask = _batch(far=False)
    g = torch.Generator().manual_seed(7)
    w = torch.rand(lp.shape, generator=g) * 2
    w[3, :3] = 0.0
    fused = fr_verl.make_verl_policy_loss(mode)
    for agg in ("token-mean", "seq-mean-token-mean", "token-sum"):
        for gbi in GBI:
            cfg = _actor_config(mode, agg, gbi)
            kw = dict(
                old_log_prob=old,
                advantages=adv,
                response_mask=mask,
                loss_agg_mode=agg,
                config=cfg,
                rollout_is_weights=w,
            )
            _compare(mode, fused, lp, kw, f"{mode} {agg} {gbi}")


def test_bool_response_mask():
    """verl's ppo_loss hands a bool response_mask."""
    lp, old, adv, mask = _batch()
    for mode in ("vanilla", "geo_mean", "sapo"):
        cfg = _actor_config(mode)
        kw = dict(old_log_prob=old, advantages=adv, response_mask=mask.bool(), loss_agg_mode="token-mean", config=cfg)
        _compare(mode, f"fusedrl_{mode}", lp, kw, mode)


BYPASS = [
    dict(loss_type="ppo_clip", rollout_is="token", rollout_is_threshold=2.0),
    dict(loss_type="reinforce", rollout_is="token", rollout_is_threshold=2.0),
    dict(loss_type="reinforce", rollout_is="sequence", rollout_is_threshold=5.0, rollout_is_batch_normalize=True),
    dict(
        loss_type="reinforce",
        rollout_is="token",
        rollout_is_threshold="0.5_2.0",
        rollout_rs="token_k1,seq_mean_k3",
        rollout_rs_threshold="0.6_1.5,0.05",
    ),
    dict(loss_type="ppo_clip", rollout_is=None, rollout_rs="seq_max_k2", rollout_rs_threshold=0.3),
    dict(loss_type="reinforce", rollout_is=None, rollout_rs=None),
]


def _check_rollout_metrics(fused: dict, ref: dict, msg: str):
    """fusedrl's ``rollout_corr/...`` metrics: each one of verl's names, with verl's value."""
    got = {k: v for k, v in fused.items() if k.startswith("rollout_corr/")}
    assert got, f"{msg}: no rollout_corr metrics"
    missing = {k for k in ref if k.startswith("rollout_corr/")} - set(got)
    assert not missing, f"{msg}: verl's {sorted(missing)} not reported"
    for k, v in got.items():
        assert k in ref, f"{msg}: {k} is not one of verl's metrics"
        v = v.item() if isinstance(v, torch.Tensor) else v
        if math.isfinite(ref[k]):
            assert v == pytest.approx(ref[k], rel=1e-4, abs=1e-6), f"{k} {msg}"


@pytest.mark.parametrize(
    "rc", BYPASS, ids=lambda rc: f"{rc['loss_type']}-{rc.get('rollout_is')}-{rc.get('rollout_rs')}"
)
def test_bypass_mode_matches_verl(rc):
    lp, old, adv, mask = _batch(seed=3, far=False)
    for agg, gbi in (("token-mean", {}), ("seq-mean-token-mean", GBI[1]), ("token-sum", {})):
        cfg = _actor_config("bypass_mode", agg, gbi, rc=rc)
        kw = dict(old_log_prob=old, advantages=adv, response_mask=mask, loss_agg_mode=agg, config=cfg)
        _compare("bypass_mode", "fusedrl_bypass_mode", lp, kw, f"{rc} {agg}")
    # the rollout_corr metrics, on a batch without fully masked rows (verl averages some of them over rows,
    # fusedrl over non-empty sequences)
    mask[2] = 1.0
    cfg = _actor_config("bypass_mode", "token-mean", {}, rc=rc)
    kw = dict(old_log_prob=old, advantages=adv, response_mask=mask, loss_agg_mode="token-mean", config=cfg)
    m1, m2 = _compare("bypass_mode", "fusedrl_bypass_mode", lp, kw, f"{rc} metrics")
    _check_rollout_metrics(m2, m1, f"bypass {rc}")


# --------------------------------------------------------------------------------------------------
# rollout correction (decoupled mode) vs rollout_corr_helper + verl's vanilla loss
# --------------------------------------------------------------------------------------------------
RC = [
    dict(rollout_is="token", rollout_is_threshold=2.0),
    dict(rollout_is="sequence", rollout_is_threshold=5.0),
    dict(rollout_is="token", rollout_is_threshold="0.5_2.0"),  # IcePop
    dict(rollout_is="sequence", rollout_is_threshold="0.2_8.0"),
    dict(rollout_is="token", rollout_is_threshold=2.0, rollout_is_batch_normalize=True),
    dict(rollout_is="sequence", rollout_is_threshold=3.0, rollout_is_batch_normalize=True),
    dict(rollout_rs="token_k1", rollout_rs_threshold="0.5_2.0"),
    dict(rollout_rs="token_k1", rollout_rs_threshold=1.5),  # lower bound = 1 / upper
    dict(rollout_rs="token_k2,token_k3", rollout_rs_threshold="0.05"),  # one threshold, two options
    dict(rollout_rs="seq_sum_k1,seq_mean_k3", rollout_rs_threshold="0.3_3.0,0.05"),  # chained, both forms
    dict(rollout_rs="seq_sum_k2,seq_sum_k3,seq_mean_k1,seq_mean_k2", rollout_rs_threshold="0.4,0.4,0.7_1.4,0.04"),
    dict(rollout_rs="seq_max_k2,seq_max_k3", rollout_rs_threshold=0.2),
    dict(rollout_is="token", rollout_is_threshold=2.0, rollout_rs="seq_mean_k1", rollout_rs_threshold=2.0),
    dict(
        rollout_is="sequence",
        rollout_is_threshold="0.5_4.0",
        rollout_rs="token_k1,seq_max_k3",
        rollout_rs_threshold="0.5_2.0,0.3",
        rollout_is_batch_normalize=True,
    ),
]


def _rollout_batch(seed=5, far=True):
    lp, old, adv, mask = _batch(seed=seed, far=False)
    g = torch.Generator().manual_seed(seed + 1)
    rollout = (old + 0.25 * torch.randn(old.shape, generator=g)).clamp(max=-0.01)
    if far:
        rollout[4, 1], old[4, 1], mask[4, 1] = -31.0, -1.0, 1.0  # |old - rollout| = 30
        rollout[5, 3], old[5, 3], mask[5, 3] = -1.0, -31.0, 1.0
    return lp, old, rollout, adv, mask


def _rc_id(rc):
    return (
        f"{rc.get('rollout_is')}-{rc.get('rollout_is_threshold')}-{rc.get('rollout_rs')}-"
        f"{rc.get('rollout_is_batch_normalize')}"
    )


def _verl_rc(rc):
    full = dict(
        rollout_is=None,
        rollout_is_threshold=2.0,
        rollout_is_batch_normalize=False,
        rollout_rs=None,
        rollout_rs_threshold=None,
    )
    full.update(rc)
    return full


@pytest.mark.parametrize("rc", RC, ids=_rc_id)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_rollout_correction_matches_verl(rc, agg):
    """Loss, gradient and actor metrics (a fully masked row and |old - rollout| = 30 included)."""
    lp, old, rollout, adv, mask = _rollout_batch()
    full = _verl_rc(rc)
    w_proto, new_mask, _ = rch.compute_rollout_correction_and_rejection_mask(
        old_log_prob=old, rollout_log_prob=rollout, response_mask=mask, **full
    )
    weights = None if w_proto is None else w_proto.batch["rollout_is_weights"]
    cfg = _actor_config("vanilla", agg)
    x1 = lp.clone().requires_grad_()
    l1, m1 = core_algos.get_policy_loss_fn("vanilla")(
        old_log_prob=old,
        log_prob=x1,
        advantages=adv,
        response_mask=new_mask,
        loss_agg_mode=agg,
        config=cfg,
        rollout_is_weights=weights,
    )
    l1.backward()

    pc, norms = fr_verl.policy_loss_config_from_verl(cfg, "vanilla", agg, mask)
    pc = pc.replace(rollout_correction=fr_verl.rollout_correction_from_verl(full))
    x2 = lp.clone().requires_grad_()
    l2, m2 = fusedrl.policy_loss(x2, old, adv, mask, config=pc, rollout_logp=rollout, **norms)
    l2.backward()
    torch.testing.assert_close(l2, l1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-7, rtol=1e-5)
    for k in ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"):
        # fusedrl's clip metrics are over the mask after rejection, as verl's (it receives the modified mask)
        assert m2[k].item() == pytest.approx(m1[f"actor/{k}"], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rc", RC, ids=_rc_id)
def test_rollout_correction_metrics_match_verl(rc, dtype):
    """verl's rollout_corr/... names and values, every one of them both ways (no fully masked row: verl
    averages some over rows); float64 shows verl's masked_mean epsilon in the stds of equal values."""
    lp, old, rollout, adv, mask = (t.to(dtype) for t in _rollout_batch())
    mask[2] = 1.0
    full = _verl_rc(rc)
    _, _, ref = rch.compute_rollout_correction_and_rejection_mask(
        old_log_prob=old, rollout_log_prob=rollout, response_mask=mask, **full
    )
    pc = fusedrl.PolicyLossConfig(rollout_correction=fr_verl.rollout_correction_from_verl(full))
    _, m2 = fusedrl.policy_loss(lp, old, adv, mask, config=pc, rollout_logp=rollout)
    _check_rollout_metrics(m2, ref, _rc_id(rc))


def test_rollout_correction_threshold_errors_match_verl():
    """Threshold specs verl rejects are rejected when the config is built."""
    for bad in (
        dict(rollout_is="token", rollout_is_threshold="2.0_0.5"),
        dict(rollout_rs="token_k2", rollout_rs_threshold="0.1_0.2"),
        dict(rollout_rs="token_k9", rollout_rs_threshold=0.1),
        dict(rollout_rs="token_k1,seq_mean_k3", rollout_rs_threshold="0.5_2,0.1,0.2"),
        dict(rollout_rs="token_k1", rollout_rs_threshold=None),
    ):
        with pytest.raises(ValueError):
            fr_verl.rollout_correction_from_verl(bad)
