"""Plain oracles of sampling replay, shared by the replay tests: vLLM's keep rule written out, and kept-set
log-probs / entropies over materialised fp64 logits."""

from __future__ import annotations

import math

import torch


def vllm_reference(z, min_p, top_k, top_p):
    """A plain transcription of vLLM 0.34.0's sampler after temperature: min-p (Model Runner V2 kernel:
    drop z < max + log(min_p)), then ``apply_top_k_top_p_pytorch`` (ascending sort, top-k by the k-th
    value with strict <, top-p by ascending cumulative probability <= 1 - p, the last always kept)."""
    logits = z.clone().float()
    v = logits.shape[1]
    if min_p is not None:
        for r in range(logits.shape[0]):
            if min_p[r] > 0:
                thr = logits[r].max() + math.log(float(min_p[r]))
                logits[r][logits[r] < thr] = -math.inf
    if top_k is None and top_p is None:
        return torch.isfinite(logits)
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        k = torch.tensor([v if (kk <= 0 or kk > v) else int(kk) for kk in top_k])
        top_k_mask = logits_sort.gather(1, (v - k).long().unsqueeze(dim=1))
        logits_sort.masked_fill_(logits_sort < top_k_mask, -float("inf"))
    if top_p is not None:
        probs_sort = logits_sort.softmax(dim=-1)
        probs_sum = torch.cumsum(probs_sort, dim=-1, out=probs_sort)
        top_p_mask = probs_sum <= 1 - torch.as_tensor(top_p, dtype=torch.float32).unsqueeze(dim=1)
        top_p_mask[:, -1] = False
        logits_sort.masked_fill_(top_p_mask, -float("inf"))
    logits = logits_sort.scatter(dim=-1, index=logits_idx, src=logits_sort)
    return torch.isfinite(logits)


def plain_kept(x, w, b, t, member, temperature, softcap):
    """fp64: materialised logits, the kept set (target added), log_softmax over it; the kept and the full
    entropy, the full log-prob."""
    u = x @ w.t() + (0 if b is None else b)
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    z = u / (temperature[:, None] if isinstance(temperature, torch.Tensor) else temperature)
    m = member.clone()
    m[torch.arange(len(t)), t] = True
    zm = z.masked_fill(~m, -math.inf)
    lsm = torch.where(m, torch.log_softmax(zm, -1), torch.zeros_like(zm))  # no -inf: no 0 * inf in autograd
    logp = lsm.gather(1, t[:, None]).squeeze(1)
    p = torch.where(m, lsm.exp(), torch.zeros_like(lsm))
    ent = -(p * lsm).sum(-1)
    full = torch.log_softmax(z, -1)
    return logp, ent, -(full.exp() * full).sum(-1), full.gather(1, t[:, None]).squeeze(1)
