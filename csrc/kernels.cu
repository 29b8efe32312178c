// fusedrl CUDA backend: epilogue kernels around the cuBLAS GEMMs (DESIGN.md section 3).
//
//  * row_stats: per-token online log-sum-exp / entropy / target-logit over one logits chunk,
//    merged into running per-token (M, S, B') statistics across vocab chunks.
//  * dz: the backward's logit gradient du = dz * dz/du, written over the chunk buffer (or into a
//    lower-precision copy feeding the two gradient GEMMs).
//  * colsum: deterministic column sums (bias gradient).
//  * cast: fp32 accumulators -> output dtype.
//
// All index arithmetic on buffer offsets is int64; grids are capped and grid-stride, so no CUDA
// grid limit is hit at any N. Reductions have a fixed order: results are bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "fusedrl_cuda.h"

namespace fusedrl {
namespace {

constexpr int kRowBlock = 256;
constexpr int64_t kMaxGrid = 1 << 20;

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float transform(float u, const Transform& tr) {
  if (tr.has_cap) u = tr.cap * tanhf(u / tr.cap);
  return u / tr.temperature;
}

// Running softmax statistics relative to the running max m:
//   s = sum exp(z - m), b = sum (z - m) exp(z - m)     (b <= 0)
// so that lse = m + log s and entropy = lse - sum p z = log s - b / s.
struct Stat {
  float m, s, b;
};

// Per-thread accumulator: Kahan-compensated s and b (a thread may sum hundreds of terms on the
// logits path at V ~ 152k; plain fp32 summation would cost ~1e-5 in the LSE there).
struct ThreadStat {
  float m, s, b, cs, cb;
};

__device__ __forceinline__ void kahan_add(float& sum, float& comp, float v) {
  const float y = v - comp;
  const float t = sum + y;
  comp = (t - sum) - y;
  sum = t;
}

__device__ __forceinline__ void stat_add(ThreadStat& st, float z) {
  if (z == -INFINITY) return;  // masked column: contributes nothing (never exp(-inf - -inf) = NaN)
  if (z > st.m) {
    if (st.s > 0.f) {
      const float d = st.m - z;
      const float a = expf(d);
      const float s_true = st.s - st.cs;
      st.b = a * ((st.b - st.cb) + d * s_true);
      st.s = a * s_true;
      st.cs = 0.f;
      st.cb = 0.f;
    }
    st.m = z;
  }
  const float d = z - st.m;
  const float e = expf(d);
  kahan_add(st.s, st.cs, e);
  kahan_add(st.b, st.cb, d * e);
}

__device__ __forceinline__ Stat stat_fold(const ThreadStat& st) { return Stat{st.m, st.s - st.cs, st.b - st.cb}; }

__device__ __forceinline__ Stat stat_merge(const Stat& x, const Stat& y) {
  const float M = fmaxf(x.m, y.m);
  Stat r{M, 0.f, 0.f};
  if (x.s > 0.f) {
    const float d = x.m - M;
    const float a = expf(d);
    r.s += a * x.s;
    r.b += a * (x.b + d * x.s);
  }
  if (y.s > 0.f) {
    const float d = y.m - M;
    const float a = expf(d);
    r.s += a * y.s;
    r.b += a * (y.b + d * y.s);
  }
  if (!(r.s > 0.f)) r.m = fmaxf(x.m, y.m);  // both empty: keep -inf
  return r;
}

__device__ __forceinline__ Stat warp_reduce(Stat st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Stat o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.b = __shfl_xor_sync(0xffffffffu, st.b, off);
    st = stat_merge(st, o);
  }
  return st;
}

// Result valid in thread 0. Ends with a barrier so `sh` can be reused by the caller's next row.
template <int BLOCK>
__device__ __forceinline__ Stat block_reduce(Stat st, Stat* sh) {
  constexpr int kWarps = BLOCK / 32;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  st = warp_reduce(st);
  if (lane == 0) sh[wid] = st;
  __syncthreads();
  if (wid == 0) {
    st = lane < kWarps ? sh[lane] : Stat{-INFINITY, 0.f, 0.f};
    st = warp_reduce(st);
  }
  __syncthreads();
  return st;
}

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
    row_stats_kernel(const T* __restrict__ u, int64_t ld, int64_t rows, int64_t cols,
                     const float* __restrict__ bias, const int64_t* __restrict__ targets, int64_t col_base,
                     int64_t vocab_start, int64_t vocab_size, Transform tr, float* __restrict__ run,
                     int64_t run_stride, int first, int last, float* __restrict__ lse, float* __restrict__ zt,
                     float* __restrict__ ent) {
  __shared__ Stat sh[BLOCK / 32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = u + r * ld;
    ThreadStat ts{-INFINITY, 0.f, 0.f, 0.f, 0.f};
    for (int64_t j = threadIdx.x; j < cols; j += BLOCK) {
      float v = to_f<T>(row[j]);
      if (bias != nullptr) v += bias[j];
      stat_add(ts, transform(v, tr));
    }
    Stat st = block_reduce<BLOCK>(stat_fold(ts), sh);
    if (threadIdx.x == 0) {
      if (!first) {
        const Stat old{run[r], run[run_stride + r], run[2 * run_stride + r]};
        st = stat_merge(old, st);
      }
      if (last) {
        const float ls = logf(st.s);
        lse[r] = st.m + ls;
        if (ent != nullptr) ent[r] = ls - st.b / st.s;
      } else {
        run[r] = st.m;
        run[run_stride + r] = st.s;
        run[2 * run_stride + r] = st.b;
      }
      const int64_t t = targets[r];
      const int64_t c = t - col_base;
      if (c >= 0 && c < cols) {
        float v = to_f<T>(row[c]);
        if (bias != nullptr) v += bias[c];
        zt[r] = transform(v, tr);
      } else if (first) {
        const int64_t g = t - vocab_start;
        if (g < 0 || g >= vocab_size) zt[r] = 0.f;
      }
    }
  }
}

template <typename Tin, typename Tout, int BLOCK>
__global__ void __launch_bounds__(BLOCK)
    dz_kernel(const Tin* u, int64_t ld_in, Tout* out, int64_t ld_out, float* out32, int64_t ld_out32,
              int64_t rows, int64_t cols, const float* __restrict__ bias, const int64_t* __restrict__ targets,
              int64_t col_base, Transform tr, const float* __restrict__ lse, const float* __restrict__ ent,
              const float* __restrict__ g_lp, const float* __restrict__ g_H) {
  const float inv_t = 1.f / tr.temperature;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float l = lse[r];
    const float glp = g_lp != nullptr ? g_lp[r] : 0.f;
    const float gh = g_H != nullptr ? g_H[r] : 0.f;
    const float shift = g_H != nullptr ? ent[r] - l : 0.f;  // z - lse + ent = z + shift
    const int64_t tc = targets[r] - col_base;
    const Tin* row = u + r * ld_in;
    Tout* orow = out + r * ld_out;
    float* orow32 = out32 != nullptr ? out32 + r * ld_out32 : nullptr;
    for (int64_t j = threadIdx.x; j < cols; j += BLOCK) {
      float v = to_f<Tin>(row[j]);
      if (bias != nullptr) v += bias[j];
      float z, dzdu;
      if (tr.has_cap) {
        const float th = tanhf(v / tr.cap);
        z = tr.cap * th / tr.temperature;
        dzdu = (1.f - th * th) * inv_t;
      } else {
        z = v / tr.temperature;
        dzdu = inv_t;
      }
      const float p = expf(z - l);
      float dz = -glp * p;
      if (j == tc) dz += glp;
      if (g_H != nullptr) dz -= gh * p * (z + shift);
      const float du = dz * dzdu;
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
void row_stats_t(const void* u, int64_t ld, int64_t rows, int64_t cols, const float* bias, const int64_t* targets,
                 int64_t col_base, int64_t vocab_start, int64_t vocab_size, Transform tr, float* run,
                 int64_t run_stride, bool first, bool last, float* lse, float* zt, float* ent, cudaStream_t stream) {
  row_stats_kernel<T, kRowBlock><<<grid_for(rows), kRowBlock, 0, stream>>>(
      static_cast<const T*>(u), ld, rows, cols, bias, targets, col_base, vocab_start, vocab_size, tr, run, run_stride,
      first ? 1 : 0, last ? 1 : 0, lse, zt, ent);
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

void launch_row_stats(int dt, const void* u, int64_t ld, int64_t rows, int64_t cols, const float* bias,
                      const int64_t* targets, int64_t col_base, int64_t vocab_start, int64_t vocab_size,
                      Transform tr, float* run, int64_t run_stride, bool first, bool last, float* lse, float* zt,
                      float* ent, cudaStream_t stream) {
  if (rows <= 0) return;
  switch (dt) {
    case kF32:
      return row_stats_t<float>(u, ld, rows, cols, bias, targets, col_base, vocab_start, vocab_size, tr, run,
                                run_stride, first, last, lse, zt, ent, stream);
    case kF16:
      return row_stats_t<__half>(u, ld, rows, cols, bias, targets, col_base, vocab_start, vocab_size, tr, run,
                                 run_stride, first, last, lse, zt, ent, stream);
    case kBF16:
      return row_stats_t<__nv_bfloat16>(u, ld, rows, cols, bias, targets, col_base, vocab_start, vocab_size, tr,
                                        run, run_stride, first, last, lse, zt, ent, stream);
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
  cudaError_t e = cudaFuncGetAttributes(&attr, row_stats_kernel<float, kRowBlock>);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  }
  return "";
}

}  // namespace fusedrl
