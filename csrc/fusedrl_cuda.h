// fusedrl CUDA backend: shared declarations (host side).
//
// Everything crossing the Python boundary is a raw device pointer (uintptr_t), a size, a dtype
// code and a cudaStream_t passed as an integer: no torch headers, so the extension does not depend
// on the ABI of the installed torch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>

#include "row_math.h"  // Transform, and the row math the host lanes share with the kernels

namespace fusedrl {

// dtype codes shared with fusedrl/backends/cuda/extension.py (DTYPE_CODE)
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline size_t dtype_size(int dt) {
  switch (dt) {
    case kF32: return 4;
    case kF16: return 2;
    case kBF16: return 2;
  }
  throw std::invalid_argument("fusedrl._C: unknown dtype code " + std::to_string(dt));
}

inline const char* dtype_name(int dt) {
  switch (dt) {
    case kF32: return "float32";
    case kF16: return "float16";
    case kBF16: return "bfloat16";
  }
  return "?";
}

#define FUSEDRL_CUDA_CHECK(expr)                                                                     \
  do {                                                                                              \
    cudaError_t _e = (expr);                                                                        \
    if (_e != cudaSuccess) {                                                                        \
      throw std::runtime_error(std::string("fusedrl._C: CUDA error ") + cudaGetErrorName(_e) + " (" + \
                               cudaGetErrorString(_e) + ") at " __FILE__ ":" + std::to_string(__LINE__) + \
                               ": " #expr);                                                         \
    }                                                                                               \
  } while (0)

// Makes `device` current for a scope (the entry points take a device index from Python).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    FUSEDRL_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) FUSEDRL_CUDA_CHECK(cudaSetDevice(device));
    changed_ = prev_ != device;
  }
  ~DeviceGuard() {
    if (changed_) (void)cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

// ---------------------------------------------------------------------------------------------
// Kernel launchers (kernels.cu). All are asynchronous on `stream`; they throw on launch errors.
// ---------------------------------------------------------------------------------------------

// Per-row online (max, sum exp, sum (z-max) exp) over one [rows, cols] chunk of raw logits `u`
// (dtype `dt`, row stride `ld` elements), z = transform(u + bias[j]); row r's temperature is
// tr.TEMPS[r] when per-token (the caller offsets TEMPS to the chunk's first row: row::rows_from).
// Merges into the running per-row statistics run_{m,s,b} (each `rows` floats, stride apart by
// `run_stride` floats) unless `first`; on `last` writes lse / ent (ent may be null) for the rows.
// The row whose target lies in this chunk (local column t - col_base) gets zt = z_target; when
// `first`, rows whose target is outside [vocab_start, vocab_start + vocab_size) get zt = 0.
// p2 / p2h (both or neither): the entropy change's row sums sum p^2 and sum p^2 (log p + H), written on
// `last`; then the running statistics have 5 rows (m, s, b, s2, b2) of `run_stride` floats, else 3.
void launch_row_stats(int dt, const void* u, int64_t ld, int64_t rows, int64_t cols, const float* bias,
                      const int64_t* targets, int64_t col_base, int64_t vocab_start, int64_t vocab_size,
                      Transform tr, float* run, int64_t run_stride, bool first, bool last, float* lse,
                      float* zt, float* ent, cudaStream_t stream, float* p2 = nullptr, float* p2h = nullptr);

// du_j = dz_j * dz/du over one [rows, cols] chunk of raw logits `u` (dtype in_dt, row stride ld_in):
//   p = exp(z - lse); dz = g_lp (1[j == t - col_base] - p) - g_H p (z - lse + ent)
// written to `out` (dtype out_dt, row stride ld_out; may alias `u` when the dtypes agree) and, when
// out32 != nullptr, also as fp32 to out32 (row stride ld_out32; may alias `u` when u is fp32).
// g_lp / g_H may be null (treated as 0); ent may be null iff g_H is null. Per-token temperatures
// (tr.TEMPS) are indexed by the chunk-local row, like lse / ent / g_lp / g_H.
void launch_dz(int in_dt, const void* u, int64_t ld_in, int out_dt, void* out, int64_t ld_out, float* out32,
               int64_t ld_out32, int64_t rows, int64_t cols, const float* bias, const int64_t* targets,
               int64_t col_base, Transform tr, const float* lse, const float* ent, const float* g_lp,
               const float* g_H, cudaStream_t stream);

// acc[j] (+)= sum_r a[r * lda + j] for j < cols (fixed-order, deterministic).
void launch_colsum(const float* a, int64_t lda, int64_t rows, int64_t cols, float* acc, bool accumulate,
                   cudaStream_t stream);

// dst[i] = (dt) src[i] for i < n (contiguous).
void launch_cast_from_f32(const float* src, int dt, void* dst, int64_t n, cudaStream_t stream);

// One-pass row epilogue (onepass.cu, docs/one-pass.md): ONE kernel over a [rows, cols] fp32 chunk of
// raw logits a.U (block per row, grid-stride): stats -> LSE, H, logp; head -> g_lp, g_H; du written
// over a.U and, when a.DU16 != null, as dtype du16_dt (kF16 / kBF16) into a.DU16; a.P2 / a.P2H non-null:
// the entropy change's row sums too.
void launch_onepass_epilogue(const row::OnePassArgs& a, int du16_dt, cudaStream_t stream);

// Throws std::invalid_argument naming the bad field of a one-pass call (sizes, codes, pointers).
void check_onepass_args(const row::OnePassArgs& a, int du16_dt);

// Validated transform from Python arguments (softcap <= 0: none). temps: [rows] fp32 per-token
// temperatures (then `temperature` is not read), or null for the scalar temperature (> 0).
Transform make_transform(double temperature, double softcap, const float* temps);

// Host lanes (host_lanes.cpp): the same row functions as the kernels, run over host memory, one row
// at a time, with the kernels' thread striding and block-reduction order. fp32 only.
void row_stats_host(const row::RowStatsArgs& a, const float* u);
void dz_host(const float* u, int64_t ld_in, float* out, int64_t ld_out, int64_t rows, int64_t cols,
             const float* bias, const int64_t* targets, int64_t col_base, Transform tr, const float* lse,
             const float* ent, const float* g_lp, const float* g_H);
void onepass_epilogue_host(const row::OnePassArgs& a, int du16_dt);

// "" when this build has a kernel image for the current device, else the CUDA error text.
std::string kernel_image_check();

}  // namespace fusedrl
