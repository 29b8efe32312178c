// fusedrl CUDA backend: host lanes of the row kernels (kernels.cu row_stats / dz, onepass.cu).
//
// Each loop runs the kernels' own row_math.h functions over host memory: per row, the per-thread
// shares of the statistics for thread ids 0 .. kBlock-1 (the kernels' column striding), the block
// reduction in the kernels' merge order, thread 0's part, then the element pass. The CPU test-suite
// checks these against torch / fp64; on a GPU, tests hold the kernels against them. What can differ
// from the device is only the libm (expf / logf / tanhf) and FMA contraction, i.e. a few ulp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "fusedrl_cuda.h"
#include "row_math.h"

namespace fusedrl {

using row::kBlock;

namespace {

template <bool DH>
void row_stats_host_t(const row::RowStatsArgs& a, const float* u) {
  row::StatT<DH> st[kBlock];
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* urow = u + r * a.ld;
    const Transform tr = row::row_transform(a.tr, r);
    for (int t = 0; t < kBlock; ++t)
      st[t] = row::thread_row_stat<DH>(urow, a.cols, a.BIAS, tr, t, kBlock, row::LoadF32{});
    row::row_stats_finish(a, tr, urow, r, row::block_reduce_host<kBlock>(st), row::LoadF32{});
  }
}

// onepass.cu's kernel: where row::onepass_vec4 says the kernel takes its 16-byte path, the same row
// functions over the same F4 groups (the statistics fold the same columns in the same order per thread;
// du by onepass_du4 per group, the V % 4 tail by onepass_du), else the scalar ones.
template <bool DH>
void onepass_epilogue_host_t(const row::OnePassArgs& a, int du16_dt) {
  row::StatT<DH> st[kBlock];
  const bool vec = row::onepass_vec4(a);
  const bool bvec = a.BIAS != nullptr && row::aligned16(a.BIAS);
  const int64_t nv = vec ? a.cols / 4 : 0;  // F4 groups; columns from 4 nv on one by one
  for (int64_t r = 0; r < a.rows; ++r) {
    float* urow = a.U + r * a.ld;
    const Transform tr = row::row_transform(a.tr, r);
    for (int t = 0; t < kBlock; ++t)
      st[t] = vec ? row::thread_row_stat_v4<DH>(urow, a.cols, a.BIAS, tr, t, kBlock)
                  : row::thread_row_stat<DH>(urow, a.cols, a.BIAS, tr, t, kBlock, row::LoadF32{});
    const row::DuRow d = row::onepass_row(a, tr, r, row::block_reduce_host<kBlock>(st));
    auto store16 = [&](int64_t j, float du) {
      if (a.DU16 == nullptr) return;
      if (du16_dt == kF16)
        static_cast<__half*>(a.DU16)[r * a.ld16 + j] = __float2half_rn(du);
      else
        static_cast<__nv_bfloat16*>(a.DU16)[r * a.ld16 + j] = __float2bfloat16_rn(du);
    };
    for (int64_t q = 0; q < nv; ++q) {
      const int64_t c = 4 * q;
      const row::F4 u = row::load4(urow + c);
      const row::F4 b = a.BIAS != nullptr ? row::bias4(a.BIAS, c, bvec) : row::F4{};
      const row::F4 du = row::onepass_du4(a, d, tr, u, b, c);
      if (a.du32) row::store4(urow + c, du);
      for (int e = 0; e < 4; ++e) store16(c + e, du.v[e]);
    }
    for (int64_t j = 4 * nv; j < a.cols; ++j) {
      const float du = row::onepass_du(a, d, tr, urow[j], j);
      if (a.du32) urow[j] = du;
      store16(j, du);
    }
  }
}

}  // namespace

void row_stats_host(const row::RowStatsArgs& a, const float* u) {
  if ((a.P2 == nullptr) != (a.P2H == nullptr))
    throw std::invalid_argument("fusedrl._C: row_stats_host: p2 and p2h are given together or not at all");
  if (a.P2 != nullptr)
    row_stats_host_t<true>(a, u);
  else
    row_stats_host_t<false>(a, u);
}

void dz_host(const float* u, int64_t ld_in, float* out, int64_t ld_out, int64_t rows, int64_t cols,
             const float* bias, const int64_t* targets, int64_t col_base, Transform tr, const float* lse,
             const float* ent, const float* g_lp, const float* g_H) {
  for (int64_t r = 0; r < rows; ++r) {
    const row::DuRow d = row::du_row(lse, ent, g_lp, g_H, targets, r, col_base, cols);
    const Transform trr = row::row_transform(tr, r);
    for (int64_t j = 0; j < cols; ++j) {
      float v = u[r * ld_in + j];
      if (bias != nullptr) v += bias[j];
      out[r * ld_out + j] = row::du_elem(v, j == d.tc, d, trr);
    }
  }
}

void check_onepass_args(const row::OnePassArgs& a, int du16_dt) {
  auto bad = [](const std::string& what) { throw std::invalid_argument("fusedrl._C: onepass_epilogue: " + what); };
  if (a.rows < 0) bad("rows must be >= 0");
  if (a.cols <= 0) bad("cols must be > 0");
  if (a.ld < a.cols) bad("ld must be >= cols");
  if (a.rows == 0) return;
  if (a.U == nullptr || a.TARGETS == nullptr || a.WEIGHT == nullptr || a.OLD == nullptr || a.ADV == nullptr)
    bad("u, targets, old, adv and weight are required");
  if (a.LOGP == nullptr || a.LSE == nullptr || a.G_LP == nullptr || a.G_H == nullptr)
    bad("logp, lse, g_lp and g_H outputs are required");
  if (a.hp.mode < head::kClipped || a.hp.mode > head::kUnclipped)
    bad("mode must be 0 (clipped), 1 (gpg), 2 (cispo) or 3 (unclipped), got " + std::to_string(a.hp.mode));
  if (a.hp.kl_type < head::kK1 || a.hp.kl_type > head::kK3)
    bad("kl_type must be 0 (k1), 1 (abs), 2 (k2) or 3 (k3), got " + std::to_string(a.hp.kl_type));
  if (a.hp.kl_coef != 0.f && a.REF == nullptr) bad("kl_coef != 0 needs ref");
  if (a.DU16 != nullptr) {
    if (du16_dt != kF16 && du16_dt != kBF16) bad("du16 must be float16 or bfloat16");
    if (a.ld16 < a.cols) bad("ld16 must be >= cols");
  }
  if (!a.du32 && a.DU16 == nullptr) bad("du32 = false needs du16 (du must be written somewhere)");
  if ((a.P2 == nullptr) != (a.P2H == nullptr)) bad("p2 and p2h are given together or not at all");
}

void onepass_epilogue_host(const row::OnePassArgs& a, int du16_dt) {
  check_onepass_args(a, du16_dt);
  if (a.P2 != nullptr)
    onepass_epilogue_host_t<true>(a, du16_dt);
  else
    onepass_epilogue_host_t<false>(a, du16_dt);
}

}  // namespace fusedrl
