// fusedrl CUDA backend: per-token policy-loss head math (docs/policy-losses.md), shared by the CUDA
// kernels (head.cu, and the one-pass row epilogue of onepass.cu via row_math.h) and their host loops. One source for both, so the CPU test-suite checks the very
// arithmetic the GPU runs (only the launch differs).
//
// Every operation mirrors the torch expression of fusedrl/loss/ (modes.py, terms.py), in fp32 and in the same order, with
// torch's NaN propagation (clamp / maximum / minimum return NaN when an operand is NaN), so results
// match the torch head bit for bit except where `exp` itself differs (CUDA: expf, the accurate
// libdevice routine torch's CUDA exp also uses; host: the C library's expf vs torch's vectorised
// CPU exp, at most 1 ulp apart).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDRL_HD __host__ __device__ __forceinline__
#else
#define FUSEDRL_HD inline
#endif

namespace fusedrl {
namespace head {

// verl: clamp(log_prob - old_log_prob, -20, 20) before exp
constexpr float kLogRatioClamp = 20.0f;

FUSEDRL_HD bool is_nan(float a) { return a != a; }

// torch.maximum / torch.minimum: NaN if either operand is NaN
FUSEDRL_HD float max_nan(float a, float b) { return is_nan(a) ? a : (is_nan(b) ? b : (a > b ? a : b)); }
FUSEDRL_HD float min_nan(float a, float b) { return is_nan(a) ? a : (is_nan(b) ? b : (a < b ? a : b)); }

// torch.clamp(x, lo, hi) = min(max(x, lo), hi), NaN in -> NaN out
FUSEDRL_HD float clamp_nan(float x, float lo, float hi) { return min_nan(max_nan(x, lo), hi); }

FUSEDRL_HD float exp_f(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);  // without --use_fast_math: the accurate routine (not __expf)
#else
  return std::exp(x);
#endif
}

// Vanilla PPO (verl compute_policy_loss_vanilla) for one token.
struct Vanilla {
  float loss;    // per-token loss (0 when masked)
  float neg_d;   // -clamp(logp - old, -20, 20) (the ppo_kl metric's term; 0 when masked)
  float coef;    // dloss/dlogp, torch autograd's derivative of the expression, ties included
  bool clipped;  // L2 > L1
  bool lower;    // dual clip active: (Lc > -A c) & (A < 0)
};

// lo = 1 - clip_low, hi = 1 + clip_high, c = clip_ratio_c (read only when dual).
//   L1 = -A r, L2 = -A clamp(r, lo, hi), Lc = max(L1, L2), dual: L = A < 0 ? min(Lc, -A c) : Lc.
// torch.maximum/minimum send half the gradient to each side of a tie; clamp passes the gradient on
// its closed interval; the log-ratio clamp passes it on [-20, 20].
FUSEDRL_HD Vanilla vanilla_token(float lp, float old, float adv, bool valid, float lo, float hi, float c, bool dual) {
  Vanilla o;
  if (!valid) {  // masked tokens are never read (NaN in padding cannot leak)
    o.loss = 0.f;
    o.neg_d = 0.f;
    o.coef = 0.f;
    o.clipped = false;
    o.lower = false;
    return o;
  }
  const float d = lp - old;
  const float dc = clamp_nan(d, -kLogRatioClamp, kLogRatioClamp);
  const float r = exp_f(dc);
  const float rc = clamp_nan(r, lo, hi);
  const float neg_a = -adv;
  const float l1 = neg_a * r;
  const float l2 = neg_a * rc;
  const float lc = max_nan(l1, l2);
  const float half_tie = (l1 == l2) ? 0.5f : 0.f;
  const float w1 = (l1 > l2) ? 1.f : half_tie;
  const float w2 = (l2 > l1) ? 1.f : half_tie;
  float w = w1 + ((r >= lo && r <= hi) ? w2 : 0.f);
  float loss = lc;
  bool lower = false;
  if (dual) {
    const float l3 = neg_a * c;
    const bool negative = adv < 0.f;
    if (negative) {
      loss = min_nan(l3, lc);
      lower = lc > l3;
      w *= (lc < l3) ? 1.f : ((lc == l3) ? 0.5f : 0.f);
    }
  }
  const bool in_range = d >= -kLogRatioClamp && d <= kLogRatioClamp;
  o.loss = loss;
  o.neg_d = -dc;
  o.coef = in_range ? (neg_a * r) * w : 0.f;
  o.clipped = l2 > l1;
  o.lower = lower;
  return o;
}

// Clip-Cov / KL-Cov covariance statistic of one token: (A - mean_A) (logp - mean_logp), with the
// masked-position convention of fusedrl/loss/ (masked A and logp read as 0; the caller masks the result).
FUSEDRL_HD float cov_token(float lp, float adv, bool valid, float mean_a, float mean_lp) {
  const float a = valid ? adv : 0.f;
  const float l = valid ? lp : 0.f;
  return (a - mean_a) * (l - mean_lp);
}

// Clip-Cov candidate: valid, not PPO-clipped (L2 <= L1, NaN-aware as torch's ~(L2 > L1)), and
// lb < cov < ub.
FUSEDRL_HD bool clip_cov_candidate(float lp, float old, float adv, bool valid, float cov, float lo, float hi,
                                   float lb, float ub) {
  if (!valid) return false;
  const float r = exp_f(clamp_nan(lp - old, -kLogRatioClamp, kLogRatioClamp));
  const float neg_a = -adv;
  const bool clipped = neg_a * clamp_nan(r, lo, hi) > neg_a * r;
  return !clipped && cov > lb && cov < ub;
}

// ------------------------------------------------------------------------------------------------
// One-pass head (docs/one-pass.md, "Head coefficients"): g_lp = w (coef + kl_coef dKL/dlogp),
// g_H = -w ent_coef, for the token-local modes. Each coefficient is the derivative torch autograd
// takes of the torch expression in fusedrl/loss/ (clamp passes the gradient on its closed interval).
// ------------------------------------------------------------------------------------------------

// mode codes (the tables of fusedrl/backends/base.py: HEAD_MODES, KL_TYPES)
enum PgMode : int { kClipped = 0, kGpg = 1, kCispo = 2, kUnclipped = 3 };
// KL estimator codes
enum KlType : int { kK1 = 0, kAbs = 1, kK2 = 2, kK3 = 3 };

struct HeadParams {
  int mode;        // PgMode
  float lo, hi;    // 1 - clip_ratio_low, 1 + clip_ratio_high
  float c;         // dual-clip bound (read only when dual)
  bool dual;       // dual clip (mode kClipped)
  float ent_coef;  // entropy bonus coefficient
  float kl_coef;   // KL coefficient (0: no KL term, REF not read)
  int kl_type;     // KlType
  bool kl_st;      // straight-through variant ("k1+", "k3+", ...): the k2 gradient
};

// dL/dlogp of the policy-gradient term of one valid token.
FUSEDRL_HD float pg_coef(int mode, float lp, float old, float adv, float lo, float hi, float c, bool dual) {
  if (mode == kClipped) return vanilla_token(lp, old, adv, true, lo, hi, c, dual).coef;
  if (mode == kGpg) return -adv;  // L = -A logp
  const float d = lp - old;
  const float r = exp_f(clamp_nan(d, -kLogRatioClamp, kLogRatioClamp));
  if (mode == kCispo) return -clamp_nan(r, lo, hi) * adv;  // L = -sg(clamp(r, lo, hi)) A logp
  // kUnclipped: L = -A r; the log-ratio clamp passes the gradient on [-20, 20]
  const bool in_range = d >= -kLogRatioClamp && d <= kLogRatioClamp;
  return in_range ? (-adv) * r : 0.f;
}

// dKL/dlogp of fusedrl.loss.kl_penalty with delta = logp - ref.
FUSEDRL_HD float kl_grad(float delta, int kl_type, bool st) {
  if (st || kl_type == kK2) return delta;  // d(delta^2 / 2)
  if (kl_type == kK1) return 1.f;
  if (kl_type == kAbs) return is_nan(delta) ? delta : (delta > 0.f ? 1.f : (delta < 0.f ? -1.f : 0.f));
  // kK3: x = clamp(-delta, -20, 20), kl = clamp(exp(x) - x - 1, -10, 10)
  const float x = clamp_nan(-delta, -kLogRatioClamp, kLogRatioClamp);
  const float ex = exp_f(x);
  const float v = ex - x - 1.f;
  const bool x_in = -delta >= -kLogRatioClamp && -delta <= kLogRatioClamp;
  const bool v_in = v >= -10.f && v <= 10.f;
  return (x_in && v_in) ? 1.f - ex : 0.f;
}

struct Grads {
  float g_lp, g_H;
};

// Upstream gradients of token i with log-prob lp. Tokens with weight 0 get (0, 0) and their OLD /
// ADV / REF entries are never read (NaN in padding cannot leak).
FUSEDRL_HD Grads token_grads(float lp, const float* OLD, const float* ADV, const float* WEIGHT, const float* REF,
                             int64_t i, const HeadParams& hp) {
  const float w = WEIGHT[i];
  if (w == 0.f) return Grads{0.f, 0.f};
  float g = pg_coef(hp.mode, lp, OLD[i], ADV[i], hp.lo, hp.hi, hp.c, hp.dual);
  if (hp.kl_coef != 0.f) g += hp.kl_coef * kl_grad(lp - REF[i], hp.kl_type, hp.kl_st);
  return Grads{w * g, -w * hp.ent_coef};
}

}  // namespace head
}  // namespace fusedrl
