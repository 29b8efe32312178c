"""BAPO on the one-pass schedule with ``stats_group`` over two spawned Gloo ranks: each rank's pass takes the
bounds its own tokens so far pick (a rank alone would choose other bounds than the group), the correction
brings every rank to the group's searched bounds, also when the other rank recomputes: the ranks' losses add
up to the one-process loss on the concatenated batch, each rank's ``d hidden`` is its slice and the ranks'
``d weight`` add up to the one-process one (fp64). Plumbing as tests/loss/test_stats_group.py
(tests/_dist.py)."""

import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (children inherit the env)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _dist import finish, init, launch  # noqa: E402

F64 = torch.float64
TINY_BUDGET_MB = 0.02  # a few rows per chunk

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

#: per-sequence advantages (rank 0 holds the first two sequences): rank 0 alone has positive advantages only
ADV = [2.0, 1.5, -1.0, -2.5, 0.7, -0.4]
#: targets at which the ranks' own bounds and the group's differ
TARGETS = (0.7, 0.9, 20.0)


def _batch():
    from fusedrl import reference

    g = torch.Generator().manual_seed(5)
    B, T, H, V = 6, 10, 12, 61
    hidden = torch.randn(B, T, H, generator=g, dtype=F64) / H**0.25
    weight = torch.randn(V, H, generator=g, dtype=F64) / H**0.25
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor([10, 7, 9, 4, 10, 8])[:, None]) & (torch.rand(B, T, generator=g) > 0.1)
    with torch.no_grad():
        lp, _ = reference.linear_logprob_entropy(hidden, weight, targets)
    old = lp + 0.6 * torch.randn(B, T, generator=g, dtype=F64)
    return dict(hidden=hidden, weight=weight, targets=targets, old_logp=old, advantages=torch.tensor(ADV, dtype=F64),
                mask=mask)  # fmt: skip


def _run(d, cfg, schedule, n_valid, **kw):
    from fusedrl import fused_policy_loss

    h = d["hidden"].clone().requires_grad_()
    w = d["weight"].clone().requires_grad_()
    loss, m = fused_policy_loss(h, w, d["targets"], d["old_logp"], d["advantages"], d["mask"], config=cfg,
                                schedule=schedule, global_num_tokens=n_valid, **kw)  # fmt: skip
    loss.backward()
    return loss.detach(), h.grad, w.grad, m


def _child(rank: int, world: int, init_method: str) -> None:
    init(rank, world, init_method)
    try:
        from fusedrl.loss import PolicyLossConfig
        from fusedrl.onepass import run as run_mod

        rows = []
        real = run_mod.correct_rows
        run_mod.correct_rows = lambda idx, *a: rows.append(idx.numel()) or real(idx, *a)
        full = _batch()
        sl = slice(0, 2) if rank == 0 else slice(2, 6)
        part = {k: v if k == "weight" else v[sl] for k, v in full.items()}
        n_valid = int(full["mask"].sum())
        group = dist.group.WORLD
        for target in TARGETS:
            cfg = PolicyLossConfig(loss_mode="bapo", bapo_ratio_lower_start=0.4, bapo_ratio_lower_max=0.9,
                                   bapo_ratio_upper_start=1.1, bapo_ratio_upper_max=2.5, bapo_adv_ratio_target=target,
                                   entropy_coeff=0.01)  # fmt: skip
            one = _run(full, cfg, "recompute", n_valid)
            # both ranks in one pass, then rank 1 recomputing (as `auto` may choose per rank): the schedules
            # make the same collectives (the one of the evaluation), so mixing them pairs them right
            for schedule in ("one_pass", "one_pass" if rank == 0 else "recompute"):
                mine = _run(part, cfg.replace(stats_group=group), schedule, n_valid, memory_budget_mb=TINY_BUDGET_MB)
                loss, dw = mine[0].clone(), mine[2].clone()
                dist.all_reduce(loss)
                dist.all_reduce(dw)
                msg = f"{target} {schedule}"
                torch.testing.assert_close(loss, one[0], atol=1e-12, rtol=1e-10, msg=f"loss {msg}")
                torch.testing.assert_close(mine[1], one[1][sl], atol=1e-12, rtol=1e-10, msg=f"d hidden {msg}")
                torch.testing.assert_close(dw, one[2], atol=1e-12, rtol=1e-10, msg=f"d weight {msg}")
                for k in ("bapo/clip_low", "bapo/clip_high", "bapo/pos_neg_ratio", "bapo/search_steps"):
                    torch.testing.assert_close(mine[3][k], one[3][k], msg=k)
        # the ranks' passes took other bounds than the group's somewhere (else the test is vacuous)
        total = torch.tensor([float(sum(rows))])
        dist.all_reduce(total)
        assert total.item() >= 3, rows
    except BaseException:
        dist.destroy_process_group()
        raise
    finish()


def test_bapo_one_pass_over_two_ranks_equals_one_process():
    launch(_child, 2)


def _child_auto(rank: int, world: int, init_method: str) -> None:
    init(rank, world, init_method)
    try:
        from fusedrl import onepass
        from fusedrl.loss import PolicyLossConfig

        # auto's own choice made to differ between the ranks (as different token counts or free memory do)
        onepass.auto_takes_one_pass = lambda *a, **k: rank == 0
        ran = []
        real = onepass.one_pass_policy_loss
        onepass.one_pass_policy_loss = lambda *a, **k: ran.append(1) or real(*a, **k)
        full = _batch()
        sl = slice(0, 2) if rank == 0 else slice(2, 6)
        part = {k: v if k == "weight" else v[sl] for k, v in full.items()}
        n_valid = int(full["mask"].sum())
        # KL-Cov over the group: its one pass makes one more collective than recompute (the bound on the picks)
        cfg = PolicyLossConfig(loss_mode="kl_cov", kl_cov_ratio=0.1, entropy_coeff=0.01)
        one = _run(full, cfg, "recompute", n_valid)
        mine = _run(part, cfg.replace(stats_group=dist.group.WORLD), "auto", n_valid)
        assert not ran, "the group agreed on one pass although rank 1 would not take it"
        loss, dw = mine[0].clone(), mine[2].clone()
        dist.all_reduce(loss)
        dist.all_reduce(dw)
        torch.testing.assert_close(loss, one[0], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(mine[1], one[1][sl], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(dw, one[2], atol=1e-12, rtol=1e-10)
    except BaseException:
        dist.destroy_process_group()
        raise
    finish()


def test_auto_agrees_on_the_schedule_over_the_group():
    """``schedule="auto"`` with ``stats_group``: a rank that would take one pass and one that would recompute
    agree (recompute on both), so their collectives pair and the result is the one-process one."""
    launch(_child_auto, 2)
