// fusedrl CUDA backend: epilogue kernels around the cuBLAS GEMMs (docs/design.md, the core math).
//
//  * row_stats: per-token online log-sum-exp / entropy / target-logit over one logits chunk,
//    merged into running per-token (M, S, B') statistics across vocab chunks (and the entropy change's
//    (S2, B2) in the DH variant, launched only when its outputs are asked for).
//  * dz: the backward's logit gradient du = dz * dz/du, written over the chunk buffer (or into a
//    lower-precision copy feeding the two gradient GEMMs).
//  * colsum: deterministic column sums (bias gradient).
//  * cast: fp32 accumulators -> output dtype.
//
// Their element-wise and per-row math is csrc/row_math.h (shared with the host lanes of
// host_lanes.cpp, which the CPU test-suite runs). All index arithmetic on buffer offsets is int64; grids are capped and grid-stride, so no CUDA
// grid limit is hit at any N. Reductions have a fixed order: results are bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "fusedrl_cuda.h"
#include "row_math.h"

namespace fusedrl {
namespace {

constexpr int kRowBlock = row::kBlock;
constexpr int64_t kMaxGrid = 1 << 20;

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

using row::StatT;

// Raw-logit loads for the shared row functions (host-callable conversions, so the functions they are
// passed to stay __host__ __device__).
struct Load {
  FUSEDRL_HD float operator()(float v) const { return v; }
  FUSEDRL_HD float operator()(__half v) const { return __half2float(v); }
  FUSEDRL_HD float operator()(__nv_bfloat16 v) const { return __bfloat162float(v); }
};

// Full occupancy (2048 / BLOCK blocks per SM, 32 registers): the per-row temperature's pointer and
// value would otherwise lift it to 37-38 registers (75% occupancy); spill-free at 32 (-Xptxas -v), the
// DH variant (the entropy change's two more Kahan-summed sums and their shuffles) too.
template <typename T, int BLOCK, bool DH>
__global__ void __launch_bounds__(BLOCK, 2048 / BLOCK) row_stats_kernel(const T* __restrict__ u, row::RowStatsArgs a) {
  __shared__ StatT<DH> sh[BLOCK / 32];
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const T* urow = u + r * a.ld;
    const Transform tr = row::row_transform(a.tr, r);
    StatT<DH> st = row::thread_row_stat<DH>(urow, a.cols, a.BIAS, tr, threadIdx.x, BLOCK, Load{});
    st = row::block_reduce<BLOCK>(st, sh);
    if (threadIdx.x == 0) row::row_stats_finish(a, tr, urow, r, st, Load{});
  }
}

template <typename Tin, typename Tout, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
    dz_kernel(const Tin* u, int64_t ld_in, Tout* out, int64_t ld_out, float* out32, int64_t ld_out32,
              int64_t rows, int64_t cols, const float* __restrict__ bias, const int64_t* __restrict__ targets,
              int64_t col_base, Transform tr, const float* __restrict__ lse, const float* __restrict__ ent,
              const float* __restrict__ g_lp, const float* __restrict__ g_H) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const row::DuRow d = row::du_row(lse, ent, g_lp, g_H, targets, r, col_base, cols);
    const Transform trr = row::row_transform(tr, r);
    const Tin* urow = u + r * ld_in;
    Tout* orow = out + r * ld_out;
    float* orow32 = out32 != nullptr ? out32 + r * ld_out32 : nullptr;
    for (int64_t j = threadIdx.x; j < cols; j += BLOCK) {
      float v = Load{}(urow[j]);
      if (bias != nullptr) v += bias[j];
      const float du = row::du_elem(v, j == d.tc, d, trr);
      if (orow32 != nullptr) orow32[j] = du;
      orow[j] = from_f<Tout>(du);
    }
  }
}

// Block (32, 32): 32 columns per block, 32 row lanes; fixed summation order.
__global__ void __launch_bounds__(1024)
    colsum_kernel(const float* __restrict__ a, int64_t lda, int64_t rows, int64_t cols, float* __restrict__ acc,
                  int accumulate) {
  __shared__ float sh[32][33];
  const int64_t c = (int64_t)blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (c < cols)
    for (int64_t r = threadIdx.y; r < rows; r += 32) s += a[r * lda + c];
  sh[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < 32; ++k) t += sh[k][threadIdx.x];
    acc[c] = accumulate ? acc[c] + t : t;
  }
}

template <typename T>
__global__ void cast_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = from_f<T>(src[i]);
}

inline unsigned grid_for(int64_t items) {
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>(items, kMaxGrid));
}

inline void check_launch() { FUSEDRL_CUDA_CHECK(cudaGetLastError()); }

template <typename T>
void row_stats_t(const void* u, const row::RowStatsArgs& a, cudaStream_t stream) {
  if (a.P2 != nullptr)
    row_stats_kernel<T, kRowBlock, true><<<grid_for(a.rows), kRowBlock, 0, stream>>>(static_cast<const T*>(u), a);
  else
    row_stats_kernel<T, kRowBlock, false><<<grid_for(a.rows), kRowBlock, 0, stream>>>(static_cast<const T*>(u), a);
  check_launch();
}

template <typename Tin, typename Tout>
void dz_t(const void* u, int64_t ld_in, void* out, int64_t ld_out, float* out32, int64_t ld_out32, int64_t rows,
          int64_t cols, const float* bias, const int64_t* targets, int64_t col_base, Transform tr, const float* lse,
          const float* ent, const float* g_lp, const float* g_H, cudaStream_t stream) {
  dz_kernel<Tin, Tout, kRowBlock><<<grid_for(rows), kRowBlock, 0, stream>>>(
      static_cast<const Tin*>(u), ld_in, static_cast<Tout*>(out), ld_out, out32, ld_out32, rows, cols, bias, targets,
      col_base, tr, lse, ent, g_lp, g_H);
  check_launch();
}

}  // namespace

row::RowStatsArgs row_stats_args(int64_t ld, int64_t rows, int64_t cols, const float* bias, const int64_t* targets,
                                 int64_t col_base, int64_t vocab_start, int64_t vocab_size, Transform tr, float* run,
                                 int64_t run_stride, bool first, bool last, float* lse, float* zt, float* ent,
                                 float* p2, float* p2h) {
  return row::RowStatsArgs{ld,   rows,  cols, bias, targets, col_base, vocab_start, vocab_size, tr,
                           run,  run_stride, first, last, lse, zt, ent, p2, p2h};
}

void launch_row_stats(int dt, const void* u, int64_t ld, int64_t rows, int64_t cols, const float* bias,
                      const int64_t* targets, int64_t col_base, int64_t vocab_start, int64_t vocab_size,
                      Transform tr, float* run, int64_t run_stride, bool first, bool last, float* lse, float* zt,
                      float* ent, cudaStream_t stream, float* p2, float* p2h) {
  if (rows <= 0) return;
  if ((p2 == nullptr) != (p2h == nullptr))
    throw std::invalid_argument("fusedrl._C: row_stats: p2 and p2h are given together or not at all");
  const row::RowStatsArgs a = row_stats_args(ld, rows, cols, bias, targets, col_base, vocab_start, vocab_size, tr,
                                             run, run_stride, first, last, lse, zt, ent, p2, p2h);
  switch (dt) {
    case kF32: return row_stats_t<float>(u, a, stream);
    case kF16: return row_stats_t<__half>(u, a, stream);
    case kBF16: return row_stats_t<__nv_bfloat16>(u, a, stream);
  }
  throw std::invalid_argument("fusedrl._C: row_stats: bad dtype code");
}

void launch_dz(int in_dt, const void* u, int64_t ld_in, int out_dt, void* out, int64_t ld_out, float* out32,
               int64_t ld_out32, int64_t rows, int64_t cols, const float* bias, const int64_t* targets,
               int64_t col_base, Transform tr, const float* lse, const float* ent, const float* g_lp, const float* g_H,
               cudaStream_t stream) {
  if (rows <= 0) return;
#define FUSEDRL_DZ(TI, TO) \
  return dz_t<TI, TO>(u, ld_in, out, ld_out, out32, ld_out32, rows, cols, bias, targets, col_base, tr, lse, ent, g_lp, g_H, stream)
  if (in_dt == kF32 && out_dt == kF32) FUSEDRL_DZ(float, float);
  if (in_dt == kF32 && out_dt == kF16) FUSEDRL_DZ(float, __half);
  if (in_dt == kF32 && out_dt == kBF16) FUSEDRL_DZ(float, __nv_bfloat16);
  if (in_dt == kF16 && out_dt == kF16) FUSEDRL_DZ(__half, __half);
  if (in_dt == kBF16 && out_dt == kBF16) FUSEDRL_DZ(__nv_bfloat16, __nv_bfloat16);
#undef FUSEDRL_DZ
  throw std::invalid_argument(std::string("fusedrl._C: dz: unsupported dtype pair ") + dtype_name(in_dt) + " -> " +
                              dtype_name(out_dt));
}

void launch_colsum(const float* a, int64_t lda, int64_t rows, int64_t cols, float* acc, bool accumulate,
                   cudaStream_t stream) {
  if (cols <= 0) return;
  const int64_t blocks = (cols + 31) / 32;
  if (blocks > 0x7fffffff) throw std::invalid_argument("fusedrl._C: colsum: too many columns");
  colsum_kernel<<<(unsigned)blocks, dim3(32, 32), 0, stream>>>(a, lda, rows, cols, acc, accumulate ? 1 : 0);
  check_launch();
}

void launch_cast_from_f32(const float* src, int dt, void* dst, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const unsigned grid = grid_for((n + 255) / 256);
  switch (dt) {
    case kF32:
      FUSEDRL_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, stream));
      return;
    case kF16:
      cast_kernel<__half><<<grid, 256, 0, stream>>>(src, static_cast<__half*>(dst), n);
      return check_launch();
    case kBF16:
      cast_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(src, static_cast<__nv_bfloat16*>(dst), n);
      return check_launch();
  }
  throw std::invalid_argument("fusedrl._C: cast: bad dtype code");
}

std::string kernel_image_check() {
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, row_stats_kernel<float, kRowBlock, false>);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  }
  return "";
}

}  // namespace fusedrl
