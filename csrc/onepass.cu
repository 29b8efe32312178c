// fusedrl CUDA backend: the one-pass row epilogue (docs/one-pass.md).
//
// ONE kernel per token chunk, after GEMM 1 (U = x_c W^T, fp32) and before the two gradient GEMMs.
// A block per row, grid-stride over rows, the grid one full wave of the device (every SM holding as many
// blocks as fit: occupancy queried once per device and kernel variant):
//   pass 1  every thread folds its columns into online (M, S, B') statistics; block reduction;
//   thread 0 LSE, H, logp (target pickup), the head's g_lp, g_H (head_math.h), all per-token
//           outputs; the du constants go to the block through shared memory;
//   pass 2  du = dz * dz/du over the row, written in place into U (a.du32) and / or as a 16-bit copy
//           (the operand of GEMMs 2 and 3 for 16-bit inputs; without a bias gradient it is the only one).
// VEC (rows 16-byte aligned, row::onepass_vec4; fusedrl.onepass.run pads U's rows to 16 elements): both
// passes move 16-byte vectors (LDG.E.128 / STG.E.128, checked in the SASS by tests/gpu_static), kUnroll
// of them loaded per thread before any is used, the cols % 4 tail column by column; the 16-bit copy
// 8 bytes at a time where its rows allow. Otherwise the scalar loops, column by column.
// Every formula is a row_math.h / head_math.h function shared with the host lane (host_lanes.cpp).
// Per-token temperatures: every thread takes its row's transform (row::row_transform) at the row's start.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "fusedrl_cuda.h"
#include "row_math.h"

namespace fusedrl {
namespace {

constexpr int kBlock = row::kBlock;
constexpr int64_t kMaxGrid = 1 << 20;
constexpr int kMaxDevices = 64;

__device__ __forceinline__ void store16(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store16(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store16(float*, float) {}  // no 16-bit copy

// Four 16-bit values in one 8-byte store (p 8-byte aligned); the same rounding as store16's.
__device__ __forceinline__ void store16x4(__half* p, const row::F4& f) {
  const __half2 lo = __floats2half2_rn(f.v[0], f.v[1]), hi = __floats2half2_rn(f.v[2], f.v[3]);
  uint2 w;
  memcpy(&w.x, &lo, 4);
  memcpy(&w.y, &hi, 4);
  *reinterpret_cast<uint2*>(p) = w;
}
__device__ __forceinline__ void store16x4(__nv_bfloat16* p, const row::F4& f) {
  const __nv_bfloat162 lo = __floats2bfloat162_rn(f.v[0], f.v[1]), hi = __floats2bfloat162_rn(f.v[2], f.v[3]);
  uint2 w;
  memcpy(&w.x, &lo, 4);
  memcpy(&w.y, &hi, 4);
  *reinterpret_cast<uint2*>(p) = w;
}
__device__ __forceinline__ void store16x4(float*, const row::F4&) {}

// du of the F4 group at column c of the row: into U (a.du32) and the 16-bit copy (vec16: one 8-byte
// store, else four).
template <typename T16>
__device__ __forceinline__ void du_group(const row::OnePassArgs& a, const row::DuRow& d, const Transform& tr,
                                         float* urow, T16* drow, const row::F4& u, const row::F4& b, int64_t c,
                                         bool vec16) {
  constexpr bool kHas16 = !std::is_same<T16, float>::value;
  const row::F4 du = row::onepass_du4(a, d, tr, u, b, c);
  if (a.du32) row::store4(urow + c, du);
  if (kHas16) {
    if (vec16) {
      store16x4(drow + c, du);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) store16(drow + c + e, du.v[e]);
    }
  }
}

// T16 = float: no 16-bit copy (the tag type is never stored through). DH: the entropy change's row
// sums too (a.P2 / a.P2H), launched only when they are asked for. VEC: row::onepass_vec4(a).
template <typename T16, int BLOCK, bool DH, bool VEC>
__global__ void __launch_bounds__(BLOCK) onepass_kernel(row::OnePassArgs a) {
  __shared__ row::StatT<DH> sh[BLOCK / 32];
  __shared__ row::DuRow bc;
  constexpr bool kHas16 = !std::is_same<T16, float>::value;
  const bool vec16 = kHas16 && row::onepass_du16_vec4(a);
  const bool bvec = a.BIAS != nullptr && row::aligned16(a.BIAS);
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    float* urow = a.U + r * a.ld;
    const Transform tr = row::row_transform(a.tr, r);
    row::StatT<DH> st;
    if constexpr (VEC)
      st = row::thread_row_stat_v4<DH>(urow, a.cols, a.BIAS, tr, threadIdx.x, BLOCK);
    else
      st = row::thread_row_stat<DH>(urow, a.cols, a.BIAS, tr, threadIdx.x, BLOCK, row::LoadF32{});
    st = row::block_reduce<BLOCK>(st, sh);
    // thread 0 reads U[r, target] here, before any thread overwrites the row (barrier below); and it
    // rewrites `bc` only after block_reduce's barriers of the next row, when every thread has read it
    if (threadIdx.x == 0) bc = row::onepass_row(a, tr, r, st);
    __syncthreads();
    const row::DuRow d = bc;
    T16* drow = kHas16 ? static_cast<T16*>(a.DU16) + r * a.ld16 : nullptr;
    if constexpr (VEC) {
      // a masked token's du is 0 whatever U holds: its row is not read again
      const bool live = !(d.glp == 0.f && d.gh == 0.f);
      const int64_t nv = a.cols / 4;
      int64_t q = threadIdx.x;
      for (; q + (row::kUnroll - 1) * BLOCK < nv; q += row::kUnroll * BLOCK) {
        row::F4 u[row::kUnroll], b[row::kUnroll] = {};
#pragma unroll
        for (int k = 0; k < row::kUnroll; ++k) {
          const int64_t c = 4 * (q + k * BLOCK);
          u[k] = live ? row::load4(urow + c) : row::F4{};
          if (a.BIAS != nullptr && live) b[k] = row::bias4(a.BIAS, c, bvec);
        }
#pragma unroll
        for (int k = 0; k < row::kUnroll; ++k) du_group(a, d, tr, urow, drow, u[k], b[k], 4 * (q + k * BLOCK), vec16);
      }
      for (; q < nv; q += BLOCK) {
        const int64_t c = 4 * q;
        const row::F4 u = live ? row::load4(urow + c) : row::F4{};
        row::F4 b{};
        if (a.BIAS != nullptr && live) b = row::bias4(a.BIAS, c, bvec);
        du_group(a, d, tr, urow, drow, u, b, c, vec16);
      }
      const int64_t j = 4 * nv + threadIdx.x;
      if (j < a.cols) {
        const float du = row::onepass_du(a, d, tr, live ? urow[j] : 0.f, j);
        if (a.du32) urow[j] = du;
        if (kHas16) store16(drow + j, du);
      }
    } else {
      for (int64_t j = threadIdx.x; j < a.cols; j += BLOCK) {
        const float du = row::onepass_du(a, d, tr, urow[j], j);
        if (a.du32) urow[j] = du;
        if (kHas16) store16(drow + j, du);
      }
    }
  }
}

// One full wave: the device's SMs times the blocks of this kernel variant that fit on one (queried once
// per device: host-side attribute reads, no device work, nothing queued on a stream).
template <typename T16, bool DH, bool VEC>
int64_t wave_blocks() {
  static std::atomic<int> cache[kMaxDevices];
  int dev = 0;
  FUSEDRL_CUDA_CHECK(cudaGetDevice(&dev));
  const int slot = dev < kMaxDevices ? dev : -1;
  int blocks = slot >= 0 ? cache[slot].load(std::memory_order_relaxed) : 0;
  if (blocks <= 0) {
    int sms = 0, per_sm = 0;
    FUSEDRL_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    FUSEDRL_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, onepass_kernel<T16, kBlock, DH, VEC>, kBlock, 0));
    blocks = std::max(1, sms) * std::max(1, per_sm);
    if (slot >= 0) cache[slot].store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

template <typename T16, bool DH, bool VEC>
void launch_v(const row::OnePassArgs& a, cudaStream_t stream) {
  const int64_t wave = wave_blocks<T16, DH, VEC>();
  const unsigned grid = (unsigned)std::max<int64_t>(1, std::min<int64_t>({a.rows, wave, kMaxGrid}));
  onepass_kernel<T16, kBlock, DH, VEC><<<grid, kBlock, 0, stream>>>(a);
  FUSEDRL_CUDA_CHECK(cudaGetLastError());
}

template <typename T16>
void launch_t(const row::OnePassArgs& a, cudaStream_t stream) {
  const bool vec = row::onepass_vec4(a);
  if (a.P2 != nullptr)
    vec ? launch_v<T16, true, true>(a, stream) : launch_v<T16, true, false>(a, stream);
  else
    vec ? launch_v<T16, false, true>(a, stream) : launch_v<T16, false, false>(a, stream);
}

}  // namespace

void launch_onepass_epilogue(const row::OnePassArgs& a, int du16_dt, cudaStream_t stream) {
  check_onepass_args(a, du16_dt);
  if (a.rows == 0) return;
  if (a.DU16 == nullptr) return launch_t<float>(a, stream);
  if (du16_dt == kF16) return launch_t<__half>(a, stream);
  return launch_t<__nv_bfloat16>(a, stream);
}

}  // namespace fusedrl
