// fusedrl CUDA backend: the element-wise and per-row math of every row kernel (docs/design.md, the core math;
// docs/one-pass.md), shared by the CUDA kernels (kernels.cu, onepass.cu) and their host loops
// (host_lanes.cpp). One source for both, so the CPU test-suite runs the very arithmetic the GPU runs;
// only the launch differs (a block of threads vs a loop over the same thread indices, and the
// block reduction emulated in the same merge order).
//
// Contents:
//  * the logit transform z = softcap(u + b) / T and its derivative (T one float, or per token row:
//    row_transform / rows_from);
//  * online softmax statistics (M, S, B') per thread, their merge, and LSE / entropy from them; with the
//    entropy change (template flag DH, docs/backends.md "The entropy change dH") also S2 = sum e^(2(z-M)) and
//    B2 = sum (z-M) e^(2(z-M)), finished into sum p^2 and sum p^2 (log p + H) (DH = false: none of it);
//  * the target pickup;
//  * du = dz * dz/du per element, with the -inf guard (a masked column has p = 0 and du = 0, never
//    0 * inf);
//  * the row pieces of the recompute kernels (row_stats, dz) and of the one-pass row epilogue, whose
//    statistics pass reads 16-byte vectors (F4, thread_row_stat_v4) where the row is 16-byte aligned.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "head_math.h"

namespace fusedrl {

// z = softcap(u) / T with softcap(u) = cap * tanh(u / cap) when has_cap. T is `temperature`, or with
// per-token temperatures (TEMPS non-null) TEMPS[r] of row r of the launch: every row function takes
// the row's own transform from row_transform(), so T is one float per row either way and the scalar
// path runs the very same arithmetic (an all-equal TEMPS gives the scalar path's bits).
struct Transform {
  float temperature;
  float cap;
  int has_cap;
  const float* TEMPS;  // [rows] fp32 per-row temperatures (row-local to the launch), or null
};

namespace row {

// Threads per row of every row kernel; the host loops emulate blocks of this size.
constexpr int kBlock = 256;

FUSEDRL_HD float log_f(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}

FUSEDRL_HD float tanh_f(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  return std::tanh(x);
#endif
}

FUSEDRL_HD float max_f(float a, float b) {
#if defined(__CUDA_ARCH__)
  return fmaxf(a, b);
#else
  return std::fmax(a, b);
#endif
}

FUSEDRL_HD float neg_inf() { return -INFINITY; }

// ------------------------------------------------------------------------------------------------
// Logit transform
// ------------------------------------------------------------------------------------------------

// The transform of row r of a launch: its own temperature when per-token, else `tr` unchanged.
FUSEDRL_HD Transform row_transform(const Transform& tr, int64_t r) {
  Transform o = tr;
  if (tr.TEMPS != nullptr) o.temperature = tr.TEMPS[r];
  return o;
}

// The transform of a launch over rows [r0, ...) of a larger one (token-chunk loops): per-token
// temperatures are indexed by the chunk's row offset.
FUSEDRL_HD Transform rows_from(const Transform& tr, int64_t r0) {
  Transform o = tr;
  if (tr.TEMPS != nullptr) o.TEMPS = tr.TEMPS + r0;
  return o;
}

// z of a raw logit v = u + b.
FUSEDRL_HD float logit(float v, const Transform& tr) {
  if (tr.has_cap) v = tr.cap * tanh_f(v / tr.cap);
  return v / tr.temperature;
}

struct ZGrad {
  float z, dzdu;
};

// z and dz/du of a raw logit v = u + b (the same z as logit()).
FUSEDRL_HD ZGrad logit_grad(float v, const Transform& tr) {
  const float inv_t = 1.f / tr.temperature;
  ZGrad o;
  if (tr.has_cap) {
    const float th = tanh_f(v / tr.cap);
    o.z = (tr.cap * th) / tr.temperature;
    o.dzdu = (1.f - th * th) * inv_t;
  } else {
    o.z = v / tr.temperature;
    o.dzdu = inv_t;
  }
  return o;
}

// ------------------------------------------------------------------------------------------------
// Online softmax statistics
// ------------------------------------------------------------------------------------------------

// Statistics relative to the running max m: s = sum exp(z - m), b = sum (z - m) exp(z - m) (b <= 0),
// so lse = m + log s and entropy = lse - sum p z = log s - b / s. Empty: m = -inf, s = b = 0.
// StatT<true> adds the entropy change's sums s2 = sum exp(2(z - m)), b2 = sum (z - m) exp(2(z - m)); the
// default StatT<false> (Stat) is exactly the three floats (no register, shuffle or shared memory more).
template <bool DH>
struct StatT {
  float m, s, b;
};
template <>
struct StatT<true> {
  float m, s, b, s2, b2;
};
using Stat = StatT<false>;

// Per-thread accumulator: Kahan-compensated s and b (a thread may sum hundreds of terms on the logits
// path at V ~ 152k; plain fp32 summation would cost ~1e-5 in the LSE there); s2, b2 likewise with DH.
template <bool DH>
struct ThreadStatT {
  float m, s, b, cs, cb;
};
template <>
struct ThreadStatT<true> {
  float m, s, b, cs, cb, s2, b2, cs2, cb2;
};
using ThreadStat = ThreadStatT<false>;

template <bool DH = false>
FUSEDRL_HD StatT<DH> stat_empty() {
  StatT<DH> r{};
  r.m = neg_inf();
  return r;
}
template <bool DH = false>
FUSEDRL_HD ThreadStatT<DH> thread_stat_empty() {
  ThreadStatT<DH> r{};
  r.m = neg_inf();
  return r;
}

FUSEDRL_HD void kahan_add(float& sum, float& comp, float v) {
  const float y = v - comp;
  const float t = sum + y;
  comp = (t - sum) - y;
  sum = t;
}

template <bool DH>
FUSEDRL_HD void stat_add(ThreadStatT<DH>& st, float z) {
  if (z == neg_inf()) return;  // masked column: contributes nothing (never exp(-inf - -inf) = NaN)
  if (z > st.m) {
    if (st.s > 0.f) {
      const float d = st.m - z;
      const float a = head::exp_f(d);
      const float s_true = st.s - st.cs;
      st.b = a * ((st.b - st.cb) + d * s_true);
      st.s = a * s_true;
      st.cs = 0.f;
      st.cb = 0.f;
      if constexpr (DH) {  // sum (z - new) e^(2(z - new)) = a^2 (b2 + (m - new) s2)
        const float a2 = a * a;
        const float s2_true = st.s2 - st.cs2;
        st.b2 = a2 * ((st.b2 - st.cb2) + d * s2_true);
        st.s2 = a2 * s2_true;
        st.cs2 = 0.f;
        st.cb2 = 0.f;
      }
    }
    st.m = z;
  }
  const float d = z - st.m;
  const float e = head::exp_f(d);
  kahan_add(st.s, st.cs, e);
  kahan_add(st.b, st.cb, d * e);
  if constexpr (DH) {
    const float e2 = e * e;
    kahan_add(st.s2, st.cs2, e2);
    kahan_add(st.b2, st.cb2, d * e2);
  }
}

template <bool DH>
FUSEDRL_HD StatT<DH> stat_fold(const ThreadStatT<DH>& st) {
  StatT<DH> r;
  r.m = st.m;
  r.s = st.s - st.cs;
  r.b = st.b - st.cb;
  if constexpr (DH) {
    r.s2 = st.s2 - st.cs2;
    r.b2 = st.b2 - st.cb2;
  }
  return r;
}

// r += x rescaled from x's max to M (x not empty).
template <bool DH>
FUSEDRL_HD void stat_accum(StatT<DH>& r, const StatT<DH>& x, float M) {
  const float d = x.m - M;
  const float a = head::exp_f(d);
  r.s += a * x.s;
  r.b += a * (x.b + d * x.s);
  if constexpr (DH) {
    const float a2 = a * a;
    r.s2 += a2 * x.s2;
    r.b2 += a2 * (x.b2 + d * x.s2);
  }
}

// Merge of two partial statistics; an empty side (s = 0 exactly, m = -inf) is skipped, so no
// -inf - -inf. The test is `!= 0`, not `> 0`: a NaN partial (a NaN logit) must reach the result,
// not vanish with its columns (fmaxf already drops a NaN max, so the sum is what carries it).
template <bool DH>
FUSEDRL_HD StatT<DH> stat_merge(const StatT<DH>& x, const StatT<DH>& y) {
  StatT<DH> r = stat_empty<DH>();
  r.m = max_f(x.m, y.m);
  if (x.s != 0.f) stat_accum(r, x, r.m);
  if (y.s != 0.f) stat_accum(r, y, r.m);
  return r;
}

struct Final {
  float lse, ent;
};

template <bool DH>
FUSEDRL_HD Final stat_final(const StatT<DH>& st) {
  const float ls = log_f(st.s);
  return Final{st.m + ls, ls - st.b / st.s};
}

// The entropy change's row sums (fusedrl/backends/base.py entropy_change): p2 = sum p^2 = s2 / s^2 and
// p2h = sum p^2 (log p + H) = (b2 - s2 b / s) / s^2 (log p + H = (z - m) - b / s: no log s to cancel).
struct SqFinal {
  float p2, p2h;
};

FUSEDRL_HD SqFinal stat_sq(const StatT<true>& st) {
  const float inv = 1.f / st.s;
  return SqFinal{(st.s2 * inv) * inv, ((st.b2 - st.s2 * (st.b * inv)) * inv) * inv};
}

#if defined(__CUDACC__)
// Block reduction of the kernels: butterfly within each warp, lane 0 of each warp to shared memory
// `sh` (BLOCK / 32 entries), warp 0 butterflies the warp results. Result valid in thread 0. Ends with
// a barrier, so `sh` (and anything thread 0 writes after it) can be reused for the next row.
template <bool DH>
__device__ __forceinline__ StatT<DH> warp_reduce(StatT<DH> st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    StatT<DH> o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.b = __shfl_xor_sync(0xffffffffu, st.b, off);
    if constexpr (DH) {
      o.s2 = __shfl_xor_sync(0xffffffffu, st.s2, off);
      o.b2 = __shfl_xor_sync(0xffffffffu, st.b2, off);
    }
    st = stat_merge(st, o);
  }
  return st;
}

template <int BLOCK, bool DH>
__device__ __forceinline__ StatT<DH> block_reduce(StatT<DH> st, StatT<DH>* sh) {
  constexpr int kWarps = BLOCK / 32;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  st = warp_reduce(st);
  if (lane == 0) sh[wid] = st;
  __syncthreads();
  if (wid == 0) {
    st = lane < kWarps ? sh[lane] : stat_empty<DH>();
    st = warp_reduce(st);
  }
  __syncthreads();
  return st;
}
#endif

// Host emulation of the kernels' block reduction (kernels: warp butterfly with __shfl_xor_sync,
// lane 0 of each warp to shared memory, warp 0 butterflies the warp results). Same merge order,
// so the host loops reproduce the device's summation tree. `st` holds BLOCK per-thread values and
// is clobbered; the result is thread 0's.
template <int BLOCK, bool DH>
inline StatT<DH> block_reduce_host(StatT<DH>* st) {
  static_assert(BLOCK % 32 == 0 && BLOCK / 32 <= 32, "BLOCK must be a multiple of 32, at most 1024");
  constexpr int kWarps = BLOCK / 32;
  StatT<DH> warp_out[kWarps];
  StatT<DH> tmp[32];
  for (int w = 0; w < kWarps; ++w) {
    StatT<DH>* lanes = st + 32 * w;
    for (int off = 16; off > 0; off >>= 1) {
      for (int l = 0; l < 32; ++l) tmp[l] = stat_merge(lanes[l], lanes[l ^ off]);
      for (int l = 0; l < 32; ++l) lanes[l] = tmp[l];
    }
    warp_out[w] = lanes[0];
  }
  StatT<DH> lanes[32];
  for (int l = 0; l < 32; ++l) lanes[l] = l < kWarps ? warp_out[l] : stat_empty<DH>();
  for (int off = 16; off > 0; off >>= 1) {
    for (int l = 0; l < 32; ++l) tmp[l] = stat_merge(lanes[l], lanes[l ^ off]);
    for (int l = 0; l < 32; ++l) lanes[l] = tmp[l];
  }
  return lanes[0];
}

// fp32 raw-logit load (the one-pass workspace and the host lanes).
struct LoadF32 {
  FUSEDRL_HD float operator()(float v) const { return v; }
};

// Four consecutive fp32 values, 16-byte aligned: one 128-bit load or store on the device (LDG.E.128 /
// STG.E.128, checked in the compiled SASS by tests/gpu_static).
struct alignas(16) F4 {
  float v[4];
};

// The F4 at p (16-byte aligned). Device: one vector load; host: a copy (no aliasing assumptions).
FUSEDRL_HD F4 load4(const float* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const F4*>(p);
#else
  F4 f;
  std::memcpy(f.v, p, sizeof(f.v));
  return f;
#endif
}

FUSEDRL_HD void store4(float* p, const F4& f) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<F4*>(p) = f;
#else
  std::memcpy(p, f.v, sizeof(f.v));
#endif
}

// F4 loads in flight per thread in the vector loops (issued together before their values are used).
constexpr int kUnroll = 4;

FUSEDRL_HD bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The bias values of columns [c, c + 4): one F4 where the bias is 16-byte aligned, else four loads.
FUSEDRL_HD F4 bias4(const float* bias, int64_t c, bool vec) {
  if (vec) return load4(bias + c);
  F4 f;
  for (int e = 0; e < 4; ++e) f.v[e] = bias[c + e];
  return f;
}

// One thread's share of a row: columns tid, tid + nthreads, ... of raw logits `row` (+ bias); `tr`
// is the row's transform. DH: the entropy change's sums too.
template <bool DH = false, typename T, typename Load>
FUSEDRL_HD StatT<DH> thread_row_stat(const T* urow, int64_t cols, const float* bias, const Transform& tr,
                                     int64_t tid, int64_t nthreads, Load load) {
  ThreadStatT<DH> ts = thread_stat_empty<DH>();
  for (int64_t j = tid; j < cols; j += nthreads) {
    float v = load(urow[j]);
    if (bias != nullptr) v += bias[j];
    stat_add(ts, logit(v, tr));
  }
  return stat_fold(ts);
}

// The same share in 16-byte vectors (urow 16-byte aligned): thread tid folds the F4 groups q = tid,
// tid + nthreads, ... (columns 4q .. 4q + 3, in order), then, of the cols % 4 tail columns, column
// 4 (cols / 4) + tid. kUnroll groups are loaded before any is folded (loads in flight on the device);
// the fold order is the sequence above either way, so the host lane (the same function) gives the
// kernel's bits. Another summation order than thread_row_stat's: same statistics to fp32 rounding.
template <bool DH = false>
FUSEDRL_HD StatT<DH> thread_row_stat_v4(const float* urow, int64_t cols, const float* bias, const Transform& tr,
                                        int64_t tid, int64_t nthreads) {
  ThreadStatT<DH> ts = thread_stat_empty<DH>();
  const int64_t nv = cols / 4;
  const bool bvec = bias != nullptr && aligned16(bias);
  int64_t q = tid;
  for (; q + (kUnroll - 1) * nthreads < nv; q += kUnroll * nthreads) {
    F4 u[kUnroll], b[kUnroll] = {};
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < kUnroll; ++k) {
      u[k] = load4(urow + 4 * (q + k * nthreads));
      if (bias != nullptr) b[k] = bias4(bias, 4 * (q + k * nthreads), bvec);
    }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < kUnroll; ++k)
      for (int e = 0; e < 4; ++e) stat_add(ts, logit(bias != nullptr ? u[k].v[e] + b[k].v[e] : u[k].v[e], tr));
  }
  for (; q < nv; q += nthreads) {
    const F4 u = load4(urow + 4 * q);
    F4 b{};
    if (bias != nullptr) b = bias4(bias, 4 * q, bvec);
    for (int e = 0; e < 4; ++e) stat_add(ts, logit(bias != nullptr ? u.v[e] + b.v[e] : u.v[e], tr));
  }
  const int64_t j = 4 * nv + tid;
  if (j < cols) stat_add(ts, logit(bias != nullptr ? urow[j] + bias[j] : urow[j], tr));
  return stat_fold(ts);
}

// Local column of target t in the chunk [col_base, col_base + cols), or -1.
FUSEDRL_HD int64_t target_col(int64_t t, int64_t col_base, int64_t cols) {
  const int64_t c = t - col_base;
  return (c >= 0 && c < cols) ? c : -1;
}

// ------------------------------------------------------------------------------------------------
// du = dz * dz/du,  dz = g_lp (1[j = target] - p) - g_H p (z - lse + ent)
// ------------------------------------------------------------------------------------------------

// Per-row constants of the du formula.
struct DuRow {
  float lse;    // LSE of the row
  float glp;    // g_lp
  float gh;     // g_H
  float shift;  // ent - lse: z - lse + ent = z + shift
  int64_t tc;   // local target column, or -1
};

// du of one element with raw logit v = u + b. A -inf logit (masked vocabulary column) has p = 0,
// and its entropy term is 0 (the limit of p z), never 0 * (-inf) = NaN.
FUSEDRL_HD float du_elem(float v, bool is_target, const DuRow& d, const Transform& tr) {
  const ZGrad zg = logit_grad(v, tr);
  const float p = head::exp_f(zg.z - d.lse);
  float dz = -d.glp * p;
  if (is_target) dz += d.glp;
  if (d.gh != 0.f && p > 0.f) dz -= d.gh * p * (zg.z + d.shift);
  return dz * zg.dzdu;
}

// ------------------------------------------------------------------------------------------------
// Recompute path, forward: row_stats over one [rows, cols] chunk (see fusedrl_cuda.h launch_row_stats)
// ------------------------------------------------------------------------------------------------

struct RowStatsArgs {
  int64_t ld, rows, cols;
  const float* BIAS;       // chunk-local [cols] or null
  const int64_t* TARGETS;  // [rows]
  int64_t col_base, vocab_start, vocab_size;
  Transform tr;  // TEMPS (if any) indexed by the chunk-local row r
  float* RUN;  // running (m, s, b[, s2, b2]): RUN[r], RUN[run_stride + r], ..., RUN[4 run_stride + r]
  int64_t run_stride;
  bool first, last;
  float* LSE;
  float* ZT;
  float* ENT;  // null: no entropy
  // the entropy change's row sums (sum p^2, sum p^2 (log p + H)) [rows] each, written on `last`; both
  // null (the default): not computed (the kernels' DH = false variant), else RUN has 5 rows
  float* P2 = nullptr;
  float* P2H = nullptr;
};

// Thread 0's part of a row: merge into the running statistics (or finish them) and pick up the
// target logit when it lies in this chunk. `tr` is the row's transform (row_transform(a.tr, r)).
template <bool DH, typename T, typename Load>
FUSEDRL_HD void row_stats_finish(const RowStatsArgs& a, const Transform& tr, const T* urow, int64_t r, StatT<DH> st,
                                 Load load) {
  const int64_t rs = a.run_stride;
  if (!a.first) {
    StatT<DH> old;
    old.m = a.RUN[r];
    old.s = a.RUN[rs + r];
    old.b = a.RUN[2 * rs + r];
    if constexpr (DH) {
      old.s2 = a.RUN[3 * rs + r];
      old.b2 = a.RUN[4 * rs + r];
    }
    st = stat_merge(old, st);
  }
  if (a.last) {
    const Final f = stat_final(st);
    a.LSE[r] = f.lse;
    if (a.ENT != nullptr) a.ENT[r] = f.ent;
    if constexpr (DH) {
      const SqFinal q = stat_sq(st);
      a.P2[r] = q.p2;
      a.P2H[r] = q.p2h;
    }
  } else {
    a.RUN[r] = st.m;
    a.RUN[rs + r] = st.s;
    a.RUN[2 * rs + r] = st.b;
    if constexpr (DH) {
      a.RUN[3 * rs + r] = st.s2;
      a.RUN[4 * rs + r] = st.b2;
    }
  }
  const int64_t t = a.TARGETS[r];
  const int64_t c = target_col(t, a.col_base, a.cols);
  if (c >= 0) {
    float v = load(urow[c]);
    if (a.BIAS != nullptr) v += a.BIAS[c];
    a.ZT[r] = logit(v, tr);
  } else if (a.first) {
    const int64_t g = t - a.vocab_start;
    if (g < 0 || g >= a.vocab_size) a.ZT[r] = 0.f;  // target in another vocab shard
  }
}

// ------------------------------------------------------------------------------------------------
// Recompute path, backward: per-row constants of the dz kernel
// ------------------------------------------------------------------------------------------------

FUSEDRL_HD DuRow du_row(const float* LSE, const float* ENT, const float* G_LP, const float* G_H,
                        const int64_t* TARGETS, int64_t r, int64_t col_base, int64_t cols) {
  DuRow d;
  d.lse = LSE[r];
  d.glp = G_LP != nullptr ? G_LP[r] : 0.f;
  d.gh = G_H != nullptr ? G_H[r] : 0.f;
  d.shift = G_H != nullptr ? ENT[r] - d.lse : 0.f;
  d.tc = target_col(TARGETS[r], col_base, cols);
  return d;
}

// ------------------------------------------------------------------------------------------------
// One-pass row epilogue (docs/one-pass.md): stats -> LSE, H, logp -> head -> g_lp, g_H -> du in place
// ------------------------------------------------------------------------------------------------

struct OnePassArgs {
  float* U;  // [rows, cols] raw logits x_c W^T (row stride ld), overwritten with du
  int64_t ld, rows, cols;
  const int64_t* TARGETS;  // [rows] in [0, cols)
  const float* BIAS;       // [cols] or null
  Transform tr;            // TEMPS (if any): [rows]
  const float* OLD;     // [rows]
  const float* ADV;     // [rows]
  const float* WEIGHT;  // [rows]; 0 = masked token (OLD / ADV / REF not read)
  const float* REF;     // [rows] or null (then kl_coef must be 0)
  head::HeadParams hp;
  float* LOGP;  // [rows]
  float* ENT;   // [rows] or null
  float* LSE;   // [rows]
  float* G_LP;  // [rows]
  float* G_H;   // [rows]
  void* DU16;   // optional 16-bit copy of du (row stride ld16), dtype chosen by the caller
  int64_t ld16;
  // du written over U (the default); false: DU16 alone receives it and U keeps the logits (the lean
  // epilogue: 16-bit inputs without a bias gradient, where nothing reads the fp32 du)
  bool du32 = true;
  // the entropy change's row sums [rows] each (as RowStatsArgs); both null (the default): not computed
  float* P2 = nullptr;
  float* P2H = nullptr;
};

// Thread 0's part of a one-pass row: LSE, H, logp from the reduced statistics, the head's
// coefficients, every per-token output written; returns the du constants to broadcast. `tr` is the
// row's transform (row_transform(a.tr, r)).
template <bool DH>
FUSEDRL_HD DuRow onepass_row(const OnePassArgs& a, const Transform& tr, int64_t r, const StatT<DH>& st) {
  const Final f = stat_final(st);
  if constexpr (DH) {
    const SqFinal q = stat_sq(st);
    a.P2[r] = q.p2;
    a.P2H[r] = q.p2h;
  }
  const int64_t t = a.TARGETS[r];
  const int64_t tc = target_col(t, 0, a.cols);
  float zt = 0.f;
  if (tc >= 0) {
    float v = a.U[r * a.ld + tc];
    if (a.BIAS != nullptr) v += a.BIAS[tc];
    zt = logit(v, tr);
  }
  const float lp = zt - f.lse;
  const head::Grads g = head::token_grads(lp, a.OLD, a.ADV, a.WEIGHT, a.REF, r, a.hp);
  a.LOGP[r] = lp;
  if (a.ENT != nullptr) a.ENT[r] = f.ent;
  a.LSE[r] = f.lse;
  a.G_LP[r] = g.g_lp;
  a.G_H[r] = g.g_H;
  DuRow d;
  d.lse = f.lse;
  d.glp = g.g_lp;
  d.gh = g.g_H;
  d.shift = f.ent - f.lse;
  d.tc = tc;
  return d;
}

// du of element j of a one-pass row (raw logit u read from the workspace, bias added here); `tr` is
// the row's transform.
FUSEDRL_HD float onepass_du(const OnePassArgs& a, const DuRow& d, const Transform& tr, float u, int64_t j) {
  if (d.glp == 0.f && d.gh == 0.f) return 0.f;  // masked token: no exp, and nothing to propagate
  const float v = a.BIAS != nullptr ? u + a.BIAS[j] : u;
  return du_elem(v, j == d.tc, d, tr);
}

// Whether a one-pass launch takes the 16-byte path (thread_row_stat_v4, F4 du): every row of U starts
// 16-byte aligned. The kernel and the host lane decide by this one test, so they fold the same columns
// in the same order. fusedrl.onepass.run pads the workspace rows to 16 elements: always true there.
FUSEDRL_HD bool onepass_vec4(const OnePassArgs& a) { return aligned16(a.U) && a.ld % 4 == 0; }

// Whether the 16-bit du copy is stored 4 values (8 bytes) at a time: every DU16 row 8-byte aligned.
FUSEDRL_HD bool onepass_du16_vec4(const OnePassArgs& a) {
  return a.DU16 != nullptr && (reinterpret_cast<uintptr_t>(a.DU16) & 7u) == 0 && a.ld16 % 4 == 0;
}

// du of columns [c, c + 4) of a one-pass row from their raw logits `u` (bias added here; `b` holds
// BIAS[c .. c + 3] when BIAS is given): onepass_du of each.
FUSEDRL_HD F4 onepass_du4(const OnePassArgs& a, const DuRow& d, const Transform& tr, const F4& u, const F4& b,
                          int64_t c) {
  F4 o;
  if (d.glp == 0.f && d.gh == 0.f) {  // masked token (as onepass_du)
    for (int e = 0; e < 4; ++e) o.v[e] = 0.f;
    return o;
  }
  for (int e = 0; e < 4; ++e)
    o.v[e] = du_elem(a.BIAS != nullptr ? u.v[e] + b.v[e] : u.v[e], c + e == d.tc, d, tr);
  return o;
}

}  // namespace row
}  // namespace fusedrl
