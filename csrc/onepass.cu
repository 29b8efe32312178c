// fusedrl CUDA backend: the one-pass row epilogue (docs/one-pass.md).
//
// ONE kernel per token chunk, after GEMM 1 (U = x_c W^T, fp32) and before the two gradient GEMMs.
// A block per row, grid-stride over rows:
//   pass 1  every thread folds its columns into online (M, S, B') statistics; block reduction;
//   thread 0 LSE, H, logp (target pickup), the head's g_lp, g_H (head_math.h), all per-token
//           outputs; the du constants go to the block through shared memory;
//   pass 2  du = dz * dz/du over the row, written in place into U and, optionally, as a 16-bit copy
//           (the operand of GEMMs 2 and 3 for 16-bit inputs).
// Every formula is a row_math.h / head_math.h function shared with the host lane (host_lanes.cpp).
// Per-token temperatures: every thread takes its row's transform (row::row_transform) at the row's start.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <type_traits>

#include "fusedrl_cuda.h"
#include "row_math.h"

namespace fusedrl {
namespace {

constexpr int kBlock = row::kBlock;
constexpr int64_t kMaxGrid = 1 << 20;

__device__ __forceinline__ void store16(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store16(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store16(float*, float) {}  // no 16-bit copy

// T16 = float: no 16-bit copy (the tag type is never stored through). DH: the entropy change's row
// sums too (a.P2 / a.P2H), launched only when they are asked for.
template <typename T16, int BLOCK, bool DH>
__global__ void __launch_bounds__(BLOCK) onepass_kernel(row::OnePassArgs a) {
  __shared__ row::StatT<DH> sh[BLOCK / 32];
  __shared__ row::DuRow bc;
  constexpr bool kHas16 = !std::is_same<T16, float>::value;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    float* urow = a.U + r * a.ld;
    const Transform tr = row::row_transform(a.tr, r);
    row::StatT<DH> st = row::thread_row_stat<DH>(urow, a.cols, a.BIAS, tr, threadIdx.x, BLOCK, row::LoadF32{});
    st = row::block_reduce<BLOCK>(st, sh);
    // thread 0 reads U[r, target] here, before any thread overwrites the row (barrier below); and it
    // rewrites `bc` only after block_reduce's barriers of the next row, when every thread has read it
    if (threadIdx.x == 0) bc = row::onepass_row(a, tr, r, st);
    __syncthreads();
    const row::DuRow d = bc;
    T16* drow = kHas16 ? static_cast<T16*>(a.DU16) + r * a.ld16 : nullptr;
    for (int64_t j = threadIdx.x; j < a.cols; j += BLOCK) {
      const float du = row::onepass_du(a, d, tr, urow[j], j);
      urow[j] = du;
      if (kHas16) store16(drow + j, du);
    }
  }
}

template <typename T16>
void launch_t(const row::OnePassArgs& a, cudaStream_t stream) {
  const unsigned grid = (unsigned)std::max<int64_t>(1, std::min<int64_t>(a.rows, kMaxGrid));
  if (a.P2 != nullptr)
    onepass_kernel<T16, kBlock, true><<<grid, kBlock, 0, stream>>>(a);
  else
    onepass_kernel<T16, kBlock, false><<<grid, kBlock, 0, stream>>>(a);
  FUSEDRL_CUDA_CHECK(cudaGetLastError());
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
