"""Benchmark inputs: deterministic random cases in two regimes, and the GRPO-style loss they feed.

Regimes (docs/design.md, performance targets):

* ``random``: hidden states and weight rows ~ N(0, 1) / H**0.25, so logits ~ N(0, 1): a near-uniform
  softmax (entropy close to log V). Targets uniform. The dense worst case for gradient filtering.
* ``peaked``: an LM-like softmax. Every token n gets a "predicted" id k_n drawn from a Zipf(1.1) law
  over a fixed random permutation of the vocabulary (frequent tokens exist, as in text), and its
  hidden state is pulled toward that weight row: ``x_n = noise_n + alpha * w_{k_n} / |w_{k_n}|``.
  ``alpha`` is found by bisection on a 256-token subset so that the mean entropy is ~0.5 nats (the
  value measured on all tokens is reported with the results). Targets are k_n for 90% of the tokens
  (sampled tokens usually are the likely ones) and uniform otherwise. No downloads, no model.

Everything is built from ``CaseSpec`` (plain data, picklable), so the CPU peak-memory child process
rebuilds exactly the same tensors from the same seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEAKED_TARGET_ENTROPY = 0.5
PEAKED_TARGET_FRAC = 0.9
ZIPF_S = 1.1


@dataclass
class CaseSpec:
    n: int
    h: int
    v: int
    dtype: str = "fp32"
    regime: str = "random"
    device: str = "cpu"
    seed: int = 0
    alpha: float = 0.0  # peaked-regime pull (calibrated); 0 for random
    seq_len: int = 1024  # loss task: sequences of this length (B = ceil(N / T))
    old_logp: Optional[list[float]] = field(default=None, repr=False)  # loss task: rollout log-probs

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Case:
    spec: CaseSpec
    x: torch.Tensor  # [N, H] leaf, requires_grad
    w: torch.Tensor  # [V, H] leaf, requires_grad
    targets: torch.Tensor  # [N] int64
    g_lp: torch.Tensor  # [N] fp32 upstream grad of logp (core task)
    g_H: torch.Tensor  # [N] fp32 upstream grad of entropy (core task)
    # loss task (padded [B, T] view of the same N tokens; the tail of the last row is padding)
    B: int = 0
    T: int = 0
    mask: Optional[torch.Tensor] = None  # [B, T] fp32
    adv_seq: Optional[torch.Tensor] = None  # [B] fp32 (one advantage per sequence, GRPO)
    old_logp: Optional[torch.Tensor] = None  # [B, T] fp32

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def zero_grads(self) -> None:
        self.x.grad = None
        self.w.grad = None

    def input_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.w, self.targets))

    def grad_bytes(self) -> int:
        return self.x.numel() * self.x.element_size() + self.w.numel() * self.w.element_size()

    # loss-task views
    def x_bt(self) -> torch.Tensor:
        return _pad_bt(self.x, self.B, self.T)

    def targets_bt(self) -> torch.Tensor:
        return _pad_bt(self.targets, self.B, self.T)

    def adv_bt(self) -> torch.Tensor:
        return self.adv_seq[:, None].expand(self.B, self.T)


def _pad_bt(t: torch.Tensor, B: int, T: int) -> torch.Tensor:
    n = t.shape[0]
    if B * T == n:
        return t.reshape(B, T, *t.shape[1:])
    pad = torch.zeros((B * T - n,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad]).reshape(B, T, *t.shape[1:])


def _gen(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _base(spec: CaseSpec):
    """fp32 base tensors on the device: noise x, weight, predicted ids, targets."""
    dev = spec.device
    g = _gen(dev, spec.seed)
    n, h, v = spec.n, spec.h, spec.v
    w = torch.randn(v, h, generator=g, device=dev) / h**0.25  # drawn first: the same W for every N
    x = torch.randn(n, h, generator=g, device=dev) / h**0.25
    if spec.regime == "random":
        t = torch.randint(0, v, (n,), generator=g, device=dev)
        return x, w, None, t
    if spec.regime != "peaked":
        raise ValueError(f"regime must be 'random' or 'peaked', got {spec.regime!r}")
    # Zipf law over ranks, mapped through a fixed permutation of the vocabulary
    ranks = torch.arange(1, v + 1, device=dev, dtype=torch.float64)
    probs = ranks.pow(-ZIPF_S)
    perm = torch.randperm(v, generator=g, device=dev)
    k = perm[torch.multinomial(probs.float(), n, replacement=True, generator=g)]
    coin = torch.rand(n, generator=g, device=dev)
    other = torch.randint(0, v, (n,), generator=g, device=dev)
    t = torch.where(coin < PEAKED_TARGET_FRAC, k, other)
    return x, w, k, t


def _pull(x, w, k, alpha):
    if k is None or alpha == 0.0:
        return x
    wk = w[k]
    return x + alpha * wk / wk.norm(dim=1, keepdim=True)


def _mean_entropy(x, w) -> float:
    z = (x @ w.t()).float()
    lp = torch.log_softmax(z, dim=1)
    return float(-(lp.exp() * lp).sum(1).mean())


def calibrate_alpha(spec: CaseSpec, target: float = PEAKED_TARGET_ENTROPY, subset: int = 256, iters: int = 30) -> float:
    """Bisection (on log alpha) for the peaked pull that gives mean entropy ~= target on a subset."""
    x, w, k, _ = _base(spec)
    idx = torch.arange(0, spec.n, max(1, spec.n // subset), device=x.device)[:subset]
    xs, ks = x[idx], k[idx]
    lo, hi = -4.0, math.log(200.0)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        e = _mean_entropy(_pull(xs, w, ks, math.exp(mid)), w)
        if e > target:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def build_case(spec: CaseSpec, requires_grad: bool = True) -> Case:
    """Materialise a case (deterministic in spec). Peaked specs must carry a calibrated alpha."""
    dt = DTYPES[spec.dtype]
    x, w, k, t = _base(spec)
    x = _pull(x, w, k, spec.alpha)
    g = _gen(spec.device, spec.seed + 7)
    n = spec.n
    g_lp = torch.randn(n, generator=g, device=spec.device)
    g_H = torch.randn(n, generator=g, device=spec.device)
    T = max(1, min(spec.seq_len, n))
    B = -(-n // T)
    # valid length per sequence: uniform in [T/2, T] (response lengths vary); padding past N is masked
    lens = torch.randint(T // 2, T + 1, (B,), generator=g, device=spec.device)
    pos = torch.arange(T, device=spec.device)[None, :]
    mask = (pos < lens[:, None]) & ((torch.arange(B, device=spec.device)[:, None] * T + pos) < n)
    adv = torch.randn(B, generator=g, device=spec.device)
    old = None
    if spec.old_logp is not None:
        old = _pad_bt(torch.tensor(spec.old_logp, dtype=torch.float32, device=spec.device), B, T)
    xd = x.to(dt).detach().requires_grad_(requires_grad)
    wd = w.to(dt).detach().requires_grad_(requires_grad)
    del x, w
    return Case(spec, xd, wd, t.contiguous(), g_lp, g_H, B, T, mask.float(), adv, old)


def make_old_logp(logp_ref: torch.Tensor, seed: int, noise: float = 0.1) -> list[float]:
    """Rollout log-probs for the loss task: the true log-probs plus N(0, noise^2) (policy drift), so
    importance ratios sit around 1 and a realistic few percent of tokens are clipped."""
    g = torch.Generator(device="cpu").manual_seed(seed + 11)
    lp = logp_ref.detach().double().cpu()
    return (lp + noise * torch.randn(lp.shape, generator=g, dtype=torch.float64)).float().tolist()


# --------------------------------------------------------------------------------------------------
# the GRPO-style loss (verl "vanilla" PPO clip + dual clip, token-mean, entropy bonus)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSemantics:
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_c: Optional[float] = 3.0  # dual clip for A < 0 (None: off)
    entropy_coeff: float = 1e-3  # loss -= coeff * token-mean(entropy)
    loss_mode: str = "vanilla"  # or a covariance mode ("clip_cov", "kl_cov")
    cov_ratio: float = 2e-3  # covariance modes: fraction of tokens selected (verl: 2e-4..2e-3)

    def describe(self) -> str:
        ent = f"entropy_coeff={self.entropy_coeff:g}" if self.entropy_coeff else "no entropy term"
        if self.loss_mode != "vanilla":
            return f"{self.loss_mode} (ratio {self.cov_ratio:g}), token-mean, {ent}"
        dc = f"dual-clip c={self.clip_c}" if self.clip_c else "no dual clip"
        return f"PPO clip eps={self.clip_low}/{self.clip_high}, {dc}, token-mean, {ent}"

    def policy_config(self):
        """The same loss as a fusedrl.PolicyLossConfig (fixed generator seed: reproducible Clip-Cov picks)."""
        import fusedrl

        kw = dict(
            loss_mode=self.loss_mode,
            clip_ratio_low=self.clip_low,
            clip_ratio_high=self.clip_high,
            clip_ratio_c=self.clip_c,
            loss_agg_mode="token-mean",
            entropy_coeff=self.entropy_coeff,
        )
        if self.loss_mode == "clip_cov":
            kw.update(clip_cov_ratio=self.cov_ratio, generator=torch.Generator().manual_seed(0))
        elif self.loss_mode == "kl_cov":
            kw.update(kl_cov_ratio=self.cov_ratio)
        return fusedrl.PolicyLossConfig(**kw)


DEFAULT_LOSS = LossSemantics()
KL_COV_LOSS = LossSemantics(loss_mode="kl_cov")
CLIP_COV_LOSS = LossSemantics(loss_mode="clip_cov")


def grpo_loss(logp, ent, old_logp, adv, mask, sem: LossSemantics = DEFAULT_LOSS):
    """Eager GRPO-style loss on [B, T] tensors (any float dtype; fp64 for the oracle). Covariance modes
    use fusedrl's policy-loss head (verl's formulas) on the given log-probs."""
    if sem.loss_mode != "vanilla":
        import fusedrl

        loss, _ = fusedrl.policy_loss(logp, old_logp, adv, mask, entropy=ent, config=sem.policy_config())
        return loss
    d = logp - old_logp
    r = torch.exp(torch.clamp(d, -20.0, 20.0))
    L1 = -adv * r
    L2 = -adv * torch.clamp(r, 1 - sem.clip_low, 1 + sem.clip_high)
    L = torch.maximum(L1, L2)
    if sem.clip_c is not None:
        L = torch.where(adv < 0, torch.minimum(L, -adv * sem.clip_c), L)
    n_tok = mask.sum().clamp(min=1)
    loss = (L * mask).sum() / n_tok
    if sem.entropy_coeff and ent is not None:
        loss = loss - sem.entropy_coeff * (ent * mask).sum() / n_tok
    return loss
