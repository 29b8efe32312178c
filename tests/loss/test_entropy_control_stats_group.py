"""``stats_group`` for the entropy-control methods: over two spawned Gloo ranks, STEER's weight range and BAPO's
bound search choose what one process chooses on the concatenated batch (the ranks' losses with global
normalisers add up to the one-process loss, each rank's gradient is its slice), and the host controllers
(AdaptiveEntropyCoef, EntropyHistory) reduce over the group to the one-process state. Plumbing as
tests/loss/test_stats_group.py (tests/_dist.py)."""

import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (children inherit the env)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _dist import finish, init, launch  # noqa: E402

from fusedrl.control import AdaptiveEntropyCoef, EntropyHistory  # noqa: E402
from fusedrl.loss import PolicyLossConfig, policy_loss  # noqa: E402

F64 = torch.float64

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def _batch():
    """A packed batch of 7 sequences (one empty, holes) split 2 / 5 between the ranks."""
    g = torch.Generator().manual_seed(7)
    lengths = [9, 4, 0, 12, 6, 3, 8]
    n = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)
    d = dict(
        cu=cu,
        mask=torch.rand(n, generator=g) > 0.15,
        lp=-torch.rand(n, generator=g, dtype=F64) * 3 - 0.05,
        adv=torch.randn(n, generator=g, dtype=F64) * 2,
        old_ent=torch.rand(n, generator=g, dtype=F64) * 3,
        ent=torch.rand(n, generator=g, dtype=F64) * 3,
        turns=torch.randint(0, 4, (n,), generator=g),
    )
    d["old"] = (d["lp"] + 0.5 * torch.randn(n, generator=g, dtype=F64)).clamp(max=-1e-3)
    return d, [(0, 2), (2, 7)]


def _part(full, seqs):
    s0, s1 = seqs
    a, b = int(full["cu"][s0]), int(full["cu"][s1])
    part = {k: v[a:b] for k, v in full.items() if k != "cu"}
    part["cu"] = full["cu"][s0 : s1 + 1] - a
    return part, slice(a, b)


def _run(d, cfg):
    lp = d["lp"].clone().requires_grad_()
    side = {"old_entropy": d["old_ent"]} if cfg.loss_mode == "steer" else {}
    loss, m = policy_loss(lp, d["old"], d["adv"], d["mask"], cu_seqlens=d["cu"], config=cfg, **side)
    (g,) = torch.autograd.grad(loss, [lp])
    return loss.detach(), g, m


CONFIGS = {
    "steer_linear": dict(loss_mode="steer"),
    "steer_exp": dict(loss_mode="steer", steer_weighting="exp", steer_lambda_min=0.5, steer_lambda_max=1.0),
    # targets at which a rank alone would choose other bounds than the whole batch
    "bapo_0.7": dict(
        loss_mode="bapo",
        bapo_ratio_lower_start=0.6,
        bapo_ratio_lower_max=0.8,
        bapo_ratio_upper_max=2.0,
        bapo_adv_ratio_target=0.7,
    ),
    "bapo_0.9": dict(
        loss_mode="bapo",
        bapo_ratio_lower_start=0.6,
        bapo_ratio_lower_max=0.8,
        bapo_ratio_upper_max=2.0,
        bapo_adv_ratio_target=0.9,
    ),
}


def _child(rank: int, world: int, init_method: str) -> None:
    init(rank, world, init_method)
    try:
        full, split = _batch()
        part, sl = _part(full, split[rank])
        n_valid = int(full["mask"].sum())
        group = dist.group.WORLD
        for name, kw in CONFIGS.items():
            base = PolicyLossConfig(global_num_tokens=n_valid, **kw)
            one = _run(full, base)
            mine = _run(part, base.replace(stats_group=group))
            total = mine[0].clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total, one[0], atol=1e-12, rtol=1e-10, msg=name)
            torch.testing.assert_close(mine[1], one[1][sl], atol=1e-12, rtol=1e-10, msg=name)
            if name.startswith("bapo"):
                for k in ("bapo/clip_low", "bapo/clip_high", "bapo/pos_neg_ratio"):
                    torch.testing.assert_close(mine[2][k], one[2][k], msg=k)
            local = _run(part, base)  # without the group the statistics differ (else the test is vacuous)
            differs = not torch.allclose(local[1], one[1][sl])
            if name.startswith("bapo"):
                differs = differs or bool(local[2]["bapo/clip_high"] != one[2]["bapo/clip_high"])
            flag = torch.tensor([float(differs)])
            dist.all_reduce(flag)
            assert flag.item() > 0, f"{name}: the group statistics changed nothing"
        # the adaptive coefficient measures the group's token-mean entropy
        ctl, ref = AdaptiveEntropyCoef(coef=0.01, target=1.4, delta=0.002), AdaptiveEntropyCoef(0.01, 1.4, 0.002)
        ctl.observe(part["ent"], part["mask"])
        ref.observe(full["ent"], full["mask"])
        assert ctl.step(group) == ref.step() and ctl.state_dict() == pytest.approx(ref.state_dict())
        # the per-turn history too
        hist, href = EntropyHistory(), EntropyHistory()
        got = hist.update(part["ent"], part["mask"], part["turns"], group=group)
        want = href.update(full["ent"], full["mask"], full["turns"])
        assert got == pytest.approx(want) and hist.overall == pytest.approx(href.overall)
    except BaseException:
        dist.destroy_process_group()
        raise
    finish()


def test_two_ranks_choose_what_one_process_chooses():
    launch(_child, 2)
