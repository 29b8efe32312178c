"""``stats_group``: selection statistics over a data-parallel group equal one process on the whole batch.

Two spawned CPU Gloo processes each hold a different share of a packed batch (different token counts,
so the gather pads). Each rank must select exactly the tokens one process selects on the concatenated
batch: Clip-Cov / KL-Cov (covariance means and top-k), the entropy quantile mask, and the rollout IS
batch normalisation; with global normalisers the ranks' losses sum to the single-process loss and each
rank's gradients are its slice of the single-process gradients. Plumbing as tests/distributed/test_distributed.py
(FileStore rendezvous in a fresh directory, timeouts, loopback Gloo).
"""

import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (children inherit the env)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _dist import finish, init, launch  # noqa: E402

from fusedrl import RolloutCorrection  # noqa: E402
from fusedrl.loss import PolicyLossConfig, TokenHead, policy_loss  # noqa: E402
from fusedrl.loss.inputs import flatten_batch  # noqa: E402
from fusedrl.loss.policy import evaluate  # noqa: E402
from fusedrl.loss.selection import entropy_keep  # noqa: E402

F64 = torch.float64

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


_launch, _init = launch, init  # tests/_dist.py


def _batch():
    """The whole packed batch (7 sequences, one empty, holes) and the sequence split between 2 ranks."""
    g = torch.Generator().manual_seed(42)
    lengths = [9, 4, 0, 12, 6, 3, 8]
    n = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)
    mask = torch.rand(n, generator=g) > 0.15
    lp = -torch.rand(n, generator=g, dtype=F64) * 3 - 0.05
    old = (lp + 0.4 * torch.randn(n, generator=g, dtype=F64)).clamp(max=-1e-3)
    ro = (old + 0.3 * torch.randn(n, generator=g, dtype=F64)).clamp(max=-1e-3)
    adv = torch.randn(len(lengths), generator=g, dtype=F64) * 2
    ent = torch.rand(n, generator=g, dtype=F64) * 3
    keys = torch.rand(n, generator=g)
    return dict(lengths=lengths, cu=cu, mask=mask, lp=lp, old=old, ro=ro, adv=adv, ent=ent, keys=keys), [(0, 2), (2, 7)]


def _part(full, seqs):
    """A rank's share: sequences [s0, s1) as its own packed batch, and its token slice of the whole."""
    s0, s1 = seqs
    a, b = int(full["cu"][s0]), int(full["cu"][s1])
    part = {k: full[k][a:b] for k in ("mask", "lp", "old", "ro", "ent", "keys")}
    part["adv"] = full["adv"][s0:s1]
    part["cu"] = full["cu"][s0 : s1 + 1] - a
    return part, slice(a, b)


def _run(d, cfg, group_sum_n=None):
    """policy_loss on one batch: (loss, grad wrt logp, grad wrt entropy, covariance pick)."""
    lp = d["lp"].clone().requires_grad_()
    ent = d["ent"].clone().requires_grad_()
    side = {"entropy": ent, "rollout_logp": d["ro"] if cfg.rollout_correction is not None else None}
    batch = flatten_batch("logp", tuple(lp.shape), lp.device, d["old"], d["adv"], d["mask"], d["cu"], side)
    loss, _, picked = evaluate(
        batch, lp.reshape(-1), batch.side["entropy"], cfg, keys=d["keys"] if cfg.loss_mode == "clip_cov" else None
    )
    g_lp, g_ent = torch.autograd.grad(loss, [lp, ent], allow_unused=True)
    g_ent = torch.zeros_like(ent) if g_ent is None else g_ent
    return loss.detach(), g_lp, g_ent, picked


CONFIGS = {
    "kl_cov": dict(loss_mode="kl_cov", kl_cov_ratio=0.15),
    "clip_cov": dict(loss_mode="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-5.0, clip_cov_ub=5.0),
    "entropy_quantile": dict(loss_mode="vanilla", top_entropy_quantile=0.3, entropy_coeff=0.01),
    "kl_cov_entropy": dict(loss_mode="kl_cov", kl_cov_ratio=0.3, top_entropy_quantile=0.5),
    "is_normalize_token": dict(
        rollout_correction=RolloutCorrection(rollout_is="token", rollout_is_batch_normalize=True)
    ),
    "is_normalize_seq": dict(
        loss_mode="sapo",
        rollout_correction=RolloutCorrection(
            rollout_is="sequence", rollout_is_threshold=3.0, rollout_is_batch_normalize=True
        ),
    ),
}


def _child(rank: int, world: int, init_method: str) -> None:
    _init(rank, world, init_method)
    try:
        full, split = _batch()
        part, sl = _part(full, split[rank])
        n_valid = int(full["mask"].sum())
        for name, kw in CONFIGS.items():
            # global normalisers: the ranks' losses add up to the one-process loss
            base = PolicyLossConfig(loss_agg_mode="token-mean", global_num_tokens=n_valid, **kw)
            one = _run(full, base)
            mine = _run(part, base.replace(stats_group=dist.group.WORLD))
            total = mine[0].clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total, one[0], atol=1e-12, rtol=1e-10, msg=name)
            torch.testing.assert_close(mine[1], one[1][sl], atol=1e-12, rtol=1e-10, msg=name)
            torch.testing.assert_close(mine[2], one[2][sl], atol=1e-12, rtol=1e-10, msg=name)
            if one[3] is not None:
                assert one[3].any(), name
                assert torch.equal(mine[3], one[3][sl]), f"{name}: rank {rank} picked other tokens"
            # without the group, the local statistics differ (the test would be vacuous otherwise)
            local = _run(part, base)
            differs = (local[3] is not None and not torch.equal(local[3], one[3][sl])) or not torch.allclose(
                local[1], one[1][sl]
            )
            flag = torch.tensor([float(differs)])
            dist.all_reduce(flag)  # every rank takes part in every collective, in the same order
            assert flag.item() > 0, f"{name}: the group statistics changed nothing"
        # the entropy mask itself, at several quantiles
        for q in (0.0, 0.25, 0.8):
            want = entropy_keep(full["ent"], full["mask"], q, None)[sl]
            got = entropy_keep(part["ent"], part["mask"], q, dist.group.WORLD)
            assert torch.equal(got, want), q
        # the one-pass schedule's correction bound covers every pick of this rank
        cfg = PolicyLossConfig(loss_mode="kl_cov", kl_cov_ratio=0.15, stats_group=dist.group.WORLD)
        batch = flatten_batch(
            "old_logp",
            tuple(part["old"].shape),
            part["old"].device,
            part["old"],
            part["adv"],
            part["mask"],
            part["cu"],
            {},
        )
        head = TokenHead(batch, cfg, False, F64)
        _, _, picked = head.evaluate(part["lp"], None)
        n_total = full["lp"].numel()
        assert head.selection_bound() == min(part["lp"].numel(), max(1, int(0.15 * n_total)))
        assert int(picked.sum()) <= head.selection_bound()
        # policy_loss (public entry point) with the group
        cfg = PolicyLossConfig(loss_mode="kl_cov", kl_cov_ratio=0.2, stats_group=dist.group.WORLD)
        loss, m = policy_loss(part["lp"], part["old"], part["adv"], part["mask"], cu_seqlens=part["cu"], config=cfg)
        assert torch.isfinite(loss) and m["cov_selected_frac"] >= 0
    except BaseException:
        dist.destroy_process_group()
        raise
    finish()  # every check passed: leave together and exit (tests/_dist.py)


def test_two_ranks_select_what_one_process_selects():
    _launch(_child, 2)


def test_group_must_be_a_process_group():
    with pytest.raises(ValueError, match="stats_group"):
        PolicyLossConfig(stats_group=object())
