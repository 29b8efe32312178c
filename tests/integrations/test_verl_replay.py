"""Sampling replay through verl's fused-kernel drop-ins: inside ``sampling_replay(...)``, ``FusedLinearForPPO``
and ``linear_cross_entropy`` return the kept-set log-probs (against a plain fp64 oracle), so a log-prob scored
by the actor and vLLM's processed log-prob of the same token agree (verl's rollout-correction ratio is 1)."""

import math

import torch
from _replay_oracle import plain_kept

from fusedrl.integrations.verl import FusedLinearForPPO, linear_cross_entropy, sampling_replay

B, T, H, V, K = 2, 6, 12, 41, 4


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.25
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, -1] = -100  # verl's ignore index at the rolled end
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).reshape(B, T, K)
    return h, w, labels, ids


def test_fused_linear_for_ppo_on_kept_sets():
    h, w, labels, ids = _case()
    member = torch.zeros(B * T, V, dtype=torch.bool).scatter_(1, ids.reshape(-1, K), True)
    tgt = labels.clamp_min(0).reshape(-1)
    want_lp, want_ent_kept = plain_kept(h.reshape(-1, H), w, None, tgt, member, 0.7, None)[:2]
    want_lp = torch.where(labels.reshape(-1) < 0, 0.0, want_lp).reshape(B, T)
    with sampling_replay(ids, entropy_support="kept"):
        lp, ent = FusedLinearForPPO()(h, w, labels, 0.7)
        lp2, ent2 = linear_cross_entropy(h.reshape(-1, H), w, labels.reshape(-1), 0.7)
    torch.testing.assert_close(lp, want_lp, atol=1e-12, rtol=0)
    torch.testing.assert_close(ent.reshape(-1), want_ent_kept, atol=1e-12, rtol=0)
    torch.testing.assert_close(lp2, want_lp.reshape(-1), atol=1e-12, rtol=0)
    full, _ = FusedLinearForPPO()(h, w, labels, 0.7)  # outside the context: the full vocabulary
    assert (full <= lp + 1e-12).all() and (full < lp - 1e-6).any()


def test_rollout_ratio_is_one_on_the_kept_set():
    """vLLM's processed log-prob (log_softmax over the top-k kept set) against the actor's scored log-prob."""
    h, w, labels, _ = _case(1)
    labels = labels.clamp_min(0)
    z = (h @ w.t()) / 0.9
    kept = z.topk(K, -1).indices
    member = torch.zeros(B, T, V, dtype=torch.bool).scatter_(-1, kept, True)
    labels = torch.where(member.gather(-1, labels[..., None]).squeeze(-1), labels, kept[..., 0])  # sampled in S
    rollout = torch.log_softmax(z.masked_fill(~member, -math.inf), -1).gather(-1, labels[..., None]).squeeze(-1)
    with sampling_replay(top_k=K):
        lp, _ = FusedLinearForPPO()(h, w, labels, 0.9)
    torch.testing.assert_close(torch.exp(lp - rollout), torch.ones_like(lp), atol=1e-12, rtol=0)


def test_remove_padding_layout_takes_a_packed_mask():
    """verl's remove-padding forward hands the kernel ``[1, nnz]`` labels: a ``[nnz, K]`` mask (ids or packed
    ``(ids, counts)``) and per-token truncation are reshaped to them, as ``linear_cross_entropy`` flattens."""
    h, w, labels, ids = _case(2)
    hp, lp_, idp = h.reshape(1, B * T, H), labels.reshape(1, B * T), ids.reshape(B * T, K)
    with sampling_replay(ids):
        want, _ = FusedLinearForPPO()(h, w, labels, 0.8)
    with sampling_replay(idp):
        got, _ = FusedLinearForPPO()(hp, w, lp_, 0.8)
    torch.testing.assert_close(got, want.reshape(1, B * T), atol=1e-12, rtol=0)
    with sampling_replay((idp.reshape(-1), torch.full((B * T,), K))):
        got_packed, _ = FusedLinearForPPO()(hp, w, lp_, 0.8)
    torch.testing.assert_close(got_packed, got, atol=1e-12, rtol=0)
    top_k = torch.randint(2, V, (B * T,), generator=torch.Generator().manual_seed(4))
    with sampling_replay(top_k=top_k.reshape(B, T)):
        want_k, _ = FusedLinearForPPO()(h, w, labels, 0.8)
    with sampling_replay(top_k=top_k):
        got_k, _ = FusedLinearForPPO()(hp, w, lp_, 0.8)
    torch.testing.assert_close(got_k, want_k.reshape(1, B * T), atol=1e-12, rtol=0)
