// fusedrl CUDA backend: the per-token policy-loss head kernels (docs/policy-losses.md).
//
//  * vanilla: ratio, clip-higher, dual clip, metric flags and dloss/dlogp for every token in one
//    launch (the torch head records ~10 elementwise ops and their saved tensors for the same).
//  * cov: the Clip-Cov / KL-Cov covariance statistic per token, and for Clip-Cov the candidate flag
//    (valid, not PPO-clipped, lb < cov < ub), in one launch; the selection itself (top-k over the
//    candidates) stays on device in torch.
//
// Inputs are flat fp32 [n] (the head's compute dtype) plus an optional uint8 mask; every launch is
// grid-stride with int64 indices, asynchronous on the caller's stream. The *_host entry points run
// the same per-token functions (head_math.h) over host memory: that is what the CPU test-suite checks.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "fusedrl_cuda.h"
#include "head_math.h"

namespace fusedrl {
namespace {

constexpr int kHeadBlock = 256;
constexpr int64_t kHeadMaxGrid = 65535;

inline unsigned head_grid(int64_t n) {
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>((n + kHeadBlock - 1) / kHeadBlock, kHeadMaxGrid));
}

// Pointers of one head call; every element is read and written by one function that both the
// kernels and the host loops call.
struct VanillaArgs {
  const float* LOGP;
  const float* OLD;
  const float* ADV;
  const uint8_t* MASK;  // null: every token valid
  float lo, hi, c;
  bool has_dual;
  float* LOSS;
  uint8_t* CLIPPED;
  uint8_t* LOWER;
  float* NEG_D;
  float* COEF;
};

FUSEDRL_HD void vanilla_at(const VanillaArgs& a, int64_t i) {
  const bool valid = a.MASK == nullptr || a.MASK[i] != 0;
  // masked tokens are not loaded at all
  const head::Vanilla o = valid ? head::vanilla_token(a.LOGP[i], a.OLD[i], a.ADV[i], true, a.lo, a.hi, a.c, a.has_dual)
                                : head::vanilla_token(0.f, 0.f, 0.f, false, a.lo, a.hi, a.c, false);
  a.LOSS[i] = o.loss;
  a.NEG_D[i] = o.neg_d;
  a.COEF[i] = o.coef;
  a.CLIPPED[i] = o.clipped ? 1 : 0;
  a.LOWER[i] = o.lower ? 1 : 0;
}

struct CovArgs {
  const float* LOGP;
  const float* OLD;
  const float* ADV;
  const uint8_t* MASK;  // null: every token valid
  float mean_a, mean_lp;
  float lo, hi, lb, ub;
  float* COV;
  uint8_t* CAND;        // null: no Clip-Cov candidate flags (KL-Cov)
};

FUSEDRL_HD void cov_at(const CovArgs& a, int64_t i) {
  const bool valid = a.MASK == nullptr || a.MASK[i] != 0;
  const float lp = valid ? a.LOGP[i] : 0.f;
  const float adv = valid ? a.ADV[i] : 0.f;
  const float cov = head::cov_token(lp, adv, valid, a.mean_a, a.mean_lp);
  a.COV[i] = cov;
  if (a.CAND != nullptr)
    a.CAND[i] = head::clip_cov_candidate(lp, valid ? a.OLD[i] : 0.f, adv, valid, cov, a.lo, a.hi, a.lb, a.ub);
}

__global__ void __launch_bounds__(kHeadBlock) vanilla_kernel(VanillaArgs a, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    vanilla_at(a, i);
}

// MEANS = [mean_A, mean_logp] on device (read here, so the host never waits for them)
__global__ void __launch_bounds__(kHeadBlock) cov_kernel(CovArgs a, const float* __restrict__ MEANS, int64_t n) {
  a.mean_a = MEANS[0];
  a.mean_lp = MEANS[1];
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    cov_at(a, i);
}

void check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("fusedrl._C: ") + what + " launch failed: " + cudaGetErrorName(e) + " (" +
                             cudaGetErrorString(e) + ")");
}

void check_n(int64_t n) {
  if (n < 0) throw std::invalid_argument("fusedrl._C: head: n must be >= 0");
}

template <typename T>
T* p(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

VanillaArgs vanilla_args(uintptr_t logp, uintptr_t old, uintptr_t adv, uintptr_t mask, float lo, float hi, float c,
                         bool has_dual, uintptr_t loss, uintptr_t clipped, uintptr_t lower, uintptr_t neg_d,
                         uintptr_t coef) {
  return VanillaArgs{p<const float>(logp), p<const float>(old), p<const float>(adv), p<const uint8_t>(mask), lo, hi, c,
                     has_dual, p<float>(loss), p<uint8_t>(clipped), p<uint8_t>(lower), p<float>(neg_d), p<float>(coef)};
}

CovArgs cov_args(uintptr_t logp, uintptr_t old, uintptr_t adv, uintptr_t mask, float lo, float hi, float lb, float ub,
                 uintptr_t cov, uintptr_t cand) {
  return CovArgs{p<const float>(logp), p<const float>(old), p<const float>(adv), p<const uint8_t>(mask), 0.f, 0.f,
                 lo, hi, lb, ub, p<float>(cov), p<uint8_t>(cand)};
}

}  // namespace

void head_vanilla(int device, uintptr_t stream, uintptr_t logp, uintptr_t old, uintptr_t adv, uintptr_t mask,
                  int64_t n, float lo, float hi, float c, bool has_dual, uintptr_t loss, uintptr_t clipped,
                  uintptr_t lower, uintptr_t neg_d, uintptr_t coef) {
  check_n(n);
  if (n == 0) return;
  DeviceGuard guard(device);
  vanilla_kernel<<<head_grid(n), kHeadBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      vanilla_args(logp, old, adv, mask, lo, hi, c, has_dual, loss, clipped, lower, neg_d, coef), n);
  check_launch("head_vanilla");
}

void head_vanilla_host(uintptr_t logp, uintptr_t old, uintptr_t adv, uintptr_t mask, int64_t n, float lo, float hi,
                       float c, bool has_dual, uintptr_t loss, uintptr_t clipped, uintptr_t lower, uintptr_t neg_d,
                       uintptr_t coef) {
  check_n(n);
  const VanillaArgs a = vanilla_args(logp, old, adv, mask, lo, hi, c, has_dual, loss, clipped, lower, neg_d, coef);
  for (int64_t i = 0; i < n; ++i) vanilla_at(a, i);
}

void head_cov(int device, uintptr_t stream, uintptr_t logp, uintptr_t old, uintptr_t adv, uintptr_t mask,
              uintptr_t means, int64_t n, float lo, float hi, float lb, float ub, uintptr_t cov, uintptr_t cand) {
  check_n(n);
  if (n == 0) return;
  DeviceGuard guard(device);
  cov_kernel<<<head_grid(n), kHeadBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      cov_args(logp, old, adv, mask, lo, hi, lb, ub, cov, cand), p<const float>(means), n);
  check_launch("head_cov");
}

void head_cov_host(uintptr_t logp, uintptr_t old, uintptr_t adv, uintptr_t mask, uintptr_t means, int64_t n, float lo,
                   float hi, float lb, float ub, uintptr_t cov, uintptr_t cand) {
  check_n(n);
  CovArgs a = cov_args(logp, old, adv, mask, lo, hi, lb, ub, cov, cand);
  a.mean_a = p<const float>(means)[0];
  a.mean_lp = p<const float>(means)[1];
  for (int64_t i = 0; i < n; ++i) cov_at(a, i);
}

}  // namespace fusedrl
