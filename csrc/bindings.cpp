// pybind11 module fusedrl._C. Torch-independent: raw device pointers (int), sizes, dtype codes
// (0 = float32, 1 = float16, 2 = bfloat16) and the caller's cudaStream_t as an int.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <utility>
#include <string>
#include <vector>

#include "cublas_dyn.h"
#include "fusedrl_cuda.h"

#ifndef FUSEDRL_CUDA_ARCHS_STR
#define FUSEDRL_CUDA_ARCHS_STR ""
#endif
#ifndef FUSEDRL_VERSION_STR
#define FUSEDRL_VERSION_STR "0"
#endif

namespace py = pybind11;

namespace fusedrl {
int64_t fwd_workspace_bytes(int64_t Nc, int64_t Vc, int64_t cublas_ws, bool overlap, bool dh);
int64_t bwd_workspace_bytes(int64_t N, int64_t H, int64_t V, int64_t Nc, int64_t Vc, int dt, int order, bool lean,
                            bool need_dx, bool need_dw, int64_t cublas_ws, bool overlap);
void linear_forward(int device, uintptr_t stream, uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t targets,
                    int64_t N, int64_t H, int64_t V, int dt, int64_t vocab_start, double temperature,
                    uintptr_t temperatures, double softcap, uintptr_t lse, uintptr_t zt, uintptr_t ent, uintptr_t ws,
                    int64_t ws_bytes, int64_t Nc, int64_t Vc, int64_t cublas_ws, bool allow_tf32, bool overlap,
                    uintptr_t p2, uintptr_t p2h);
void linear_backward(int device, uintptr_t stream, uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t targets,
                     int64_t N, int64_t H, int64_t V, int dt, int64_t vocab_start, double temperature,
                     uintptr_t temperatures, double softcap, uintptr_t lse, uintptr_t ent, uintptr_t g_lp,
                     uintptr_t g_H, uintptr_t dx, uintptr_t dw, uintptr_t db, uintptr_t ws, int64_t ws_bytes,
                     int64_t Nc, int64_t Vc, int order, bool lean, int64_t cublas_ws, bool allow_tf32, bool overlap);
void logits_forward(int device, uintptr_t stream, uintptr_t logits, int64_t N, int64_t V, int dt, double temperature,
                    uintptr_t temperatures, double softcap, uintptr_t targets, uintptr_t lse, uintptr_t zt,
                    uintptr_t ent, uintptr_t p2, uintptr_t p2h);
void logits_backward(int device, uintptr_t stream, uintptr_t logits, uintptr_t out, int64_t N, int64_t V, int dt,
                     double temperature, uintptr_t temperatures, double softcap, uintptr_t targets, uintptr_t lse,
                     uintptr_t ent, uintptr_t g_lp, uintptr_t g_H);
void head_vanilla(int device, uintptr_t stream, uintptr_t logp, uintptr_t old, uintptr_t adv, uintptr_t mask,
                  int64_t n, float lo, float hi, float c, bool has_dual, uintptr_t loss, uintptr_t clipped,
                  uintptr_t lower, uintptr_t neg_d, uintptr_t coef);
void head_vanilla_host(uintptr_t logp, uintptr_t old, uintptr_t adv, uintptr_t mask, int64_t n, float lo, float hi,
                       float c, bool has_dual, uintptr_t loss, uintptr_t clipped, uintptr_t lower, uintptr_t neg_d,
                       uintptr_t coef);
void head_cov(int device, uintptr_t stream, uintptr_t logp, uintptr_t old, uintptr_t adv, uintptr_t mask,
              uintptr_t means, int64_t n, float lo, float hi, float lb, float ub, uintptr_t cov, uintptr_t cand);
void head_cov_host(uintptr_t logp, uintptr_t old, uintptr_t adv, uintptr_t mask, uintptr_t means, int64_t n, float lo,
                   float hi, float lb, float ub, uintptr_t cov, uintptr_t cand);
}  // namespace fusedrl

namespace {

std::vector<std::string> split_archs(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == ';' || c == ',' || c == ' ') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

std::pair<bool, std::string> device_check(int device) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return std::make_pair(false, std::string("no usable CUDA device: ") + cudaGetErrorName(e) + ": " +
                                     cudaGetErrorString(e));
  }
  if (device < 0 || device >= count)
    return std::make_pair(false, "CUDA device " + std::to_string(device) + " out of range (" + std::to_string(count) +
                                     " devices)");
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess) prev = device;
  if ((e = cudaSetDevice(device)) != cudaSuccess) {
    (void)cudaGetLastError();
    return std::make_pair(false, std::string("cudaSetDevice failed: ") + cudaGetErrorString(e));
  }
  std::string why = fusedrl::kernel_image_check();
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (prev != device) cudaSetDevice(prev);
  if (!why.empty())
    return std::make_pair(false, "no kernel image for sm_" + std::to_string(major) + std::to_string(minor) +
                                     " in this build (compiled archs: " FUSEDRL_CUDA_ARCHS_STR "; rebuild with "
                                     "FUSEDRL_CUDA_ARCHS): " + why);
  return std::make_pair(true, std::string());
}

}  // namespace

namespace {

// One-pass epilogue arguments from Python integers / floats (pointers as uintptr_t, 0 = null).
fusedrl::row::OnePassArgs onepass_args(uintptr_t u, int64_t ld, int64_t rows, int64_t cols, uintptr_t targets,
                                       uintptr_t bias, double temperature, uintptr_t temperatures, double softcap,
                                       uintptr_t old, uintptr_t adv, uintptr_t weight, uintptr_t ref, int mode,
                                       float lo, float hi, float c, bool dual, float ent_coef, float kl_coef,
                                       int kl_type, bool kl_st, uintptr_t logp, uintptr_t ent, uintptr_t lse,
                                       uintptr_t g_lp, uintptr_t g_H, uintptr_t du16, int64_t ld16, uintptr_t p2,
                                       uintptr_t p2h, bool du32) {
  fusedrl::row::OnePassArgs a;
  a.U = reinterpret_cast<float*>(u);
  a.ld = ld;
  a.rows = rows;
  a.cols = cols;
  a.TARGETS = reinterpret_cast<const int64_t*>(targets);
  a.BIAS = reinterpret_cast<const float*>(bias);
  a.tr = fusedrl::make_transform(temperature, softcap, reinterpret_cast<const float*>(temperatures));
  a.OLD = reinterpret_cast<const float*>(old);
  a.ADV = reinterpret_cast<const float*>(adv);
  a.WEIGHT = reinterpret_cast<const float*>(weight);
  a.REF = reinterpret_cast<const float*>(ref);
  a.hp = fusedrl::head::HeadParams{mode, lo, hi, c, dual, ent_coef, kl_coef, kl_type, kl_st};
  a.LOGP = reinterpret_cast<float*>(logp);
  a.ENT = reinterpret_cast<float*>(ent);
  a.LSE = reinterpret_cast<float*>(lse);
  a.G_LP = reinterpret_cast<float*>(g_lp);
  a.G_H = reinterpret_cast<float*>(g_H);
  a.DU16 = reinterpret_cast<void*>(du16);
  a.ld16 = ld16;
  a.P2 = reinterpret_cast<float*>(p2);
  a.P2H = reinterpret_cast<float*>(p2h);
  a.du32 = du32;
  return a;
}

#define FUSEDRL_ONEPASS_PARAMS                                                                                 \
  uintptr_t u, int64_t ld, int64_t rows, int64_t cols, uintptr_t targets, uintptr_t bias, double temperature, \
      uintptr_t temperatures, double softcap, uintptr_t old, uintptr_t adv, uintptr_t weight, uintptr_t ref,  \
      int mode, float lo, float hi, float c, bool dual, float ent_coef, float kl_coef, int kl_type, bool kl_st, \
      uintptr_t logp, uintptr_t ent, uintptr_t lse, uintptr_t g_lp, uintptr_t g_H, uintptr_t du16, int64_t ld16, \
      int du16_dtype, uintptr_t p2, uintptr_t p2h, bool du32
#define FUSEDRL_ONEPASS_ARGS                                                                                  \
  onepass_args(u, ld, rows, cols, targets, bias, temperature, temperatures, softcap, old, adv, weight, ref,  \
               mode, lo, hi, c, dual, ent_coef, kl_coef, kl_type, kl_st, logp, ent, lse, g_lp, g_H, du16, ld16, \
               p2, p2h, du32)
#define FUSEDRL_ONEPASS_PYARGS                                                                                \
  py::arg("u"), py::arg("ld"), py::arg("rows"), py::arg("cols"), py::arg("targets"), py::arg("bias"),        \
      py::arg("temperature"), py::arg("temperatures"), py::arg("softcap"), py::arg("old"), py::arg("adv"),    \
      py::arg("weight"), py::arg("ref"), py::arg("mode"), py::arg("lo"), py::arg("hi"), py::arg("clip_c"),   \
      py::arg("dual"), py::arg("ent_coef"), py::arg("kl_coef"), py::arg("kl_type"), py::arg("kl_st"),         \
      py::arg("logp"), py::arg("ent"), py::arg("lse"), py::arg("g_lp"), py::arg("g_H"), py::arg("du16"),      \
      py::arg("ld16"), py::arg("du16_dtype"), py::arg("p2") = 0, py::arg("p2h") = 0, py::arg("du32") = true

void onepass_epilogue(int device, uintptr_t stream, FUSEDRL_ONEPASS_PARAMS) {
  const fusedrl::row::OnePassArgs a = FUSEDRL_ONEPASS_ARGS;
  fusedrl::check_onepass_args(a, du16_dtype);
  if (rows == 0) return;
  fusedrl::DeviceGuard guard(device);
  fusedrl::launch_onepass_epilogue(a, du16_dtype, reinterpret_cast<cudaStream_t>(stream));
}

void onepass_epilogue_host(FUSEDRL_ONEPASS_PARAMS) { fusedrl::onepass_epilogue_host(FUSEDRL_ONEPASS_ARGS, du16_dtype); }

void row_stats_host(uintptr_t u, int64_t ld, int64_t rows, int64_t cols, uintptr_t bias, uintptr_t targets,
                    int64_t col_base, int64_t vocab_start, int64_t vocab_size, double temperature,
                    uintptr_t temperatures, double softcap, uintptr_t run, int64_t run_stride, bool first, bool last,
                    uintptr_t lse, uintptr_t zt, uintptr_t ent, uintptr_t p2, uintptr_t p2h) {
  if (rows < 0 || cols <= 0 || ld < cols) throw std::invalid_argument("fusedrl._C: row_stats_host: bad sizes");
  const fusedrl::row::RowStatsArgs a{ld,
                                     rows,
                                     cols,
                                     reinterpret_cast<const float*>(bias),
                                     reinterpret_cast<const int64_t*>(targets),
                                     col_base,
                                     vocab_start,
                                     vocab_size,
                                     fusedrl::make_transform(temperature, softcap,
                                                             reinterpret_cast<const float*>(temperatures)),
                                     reinterpret_cast<float*>(run),
                                     run_stride,
                                     first,
                                     last,
                                     reinterpret_cast<float*>(lse),
                                     reinterpret_cast<float*>(zt),
                                     reinterpret_cast<float*>(ent),
                                     reinterpret_cast<float*>(p2),
                                     reinterpret_cast<float*>(p2h)};
  fusedrl::row_stats_host(a, reinterpret_cast<const float*>(u));
}

void dz_host(uintptr_t u, int64_t ld_in, uintptr_t out, int64_t ld_out, int64_t rows, int64_t cols, uintptr_t bias,
             uintptr_t targets, int64_t col_base, double temperature, uintptr_t temperatures, double softcap,
             uintptr_t lse, uintptr_t ent, uintptr_t g_lp, uintptr_t g_H) {
  if (rows < 0 || cols <= 0 || ld_in < cols || ld_out < cols)
    throw std::invalid_argument("fusedrl._C: dz_host: bad sizes");
  if (g_H != 0 && ent == 0) throw std::invalid_argument("fusedrl._C: dz_host: g_H given without ent");
  fusedrl::dz_host(reinterpret_cast<const float*>(u), ld_in, reinterpret_cast<float*>(out), ld_out, rows, cols,
                   reinterpret_cast<const float*>(bias), reinterpret_cast<const int64_t*>(targets), col_base,
                   fusedrl::make_transform(temperature, softcap, reinterpret_cast<const float*>(temperatures)),
                   reinterpret_cast<const float*>(lse), reinterpret_cast<const float*>(ent),
                   reinterpret_cast<const float*>(g_lp), reinterpret_cast<const float*>(g_H));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedrl CUDA kernels (cuBLAS-chunked GEMMs + fused LSE/entropy/dz epilogues); torch-ABI independent";
  m.attr("__version__") = FUSEDRL_VERSION_STR;
  m.attr("DTYPE_F32") = (int)fusedrl::kF32;
  m.attr("DTYPE_F16") = (int)fusedrl::kF16;
  m.attr("DTYPE_BF16") = (int)fusedrl::kBF16;
  m.attr("ORDER_VOCAB_OUTER") = 0;
  m.attr("ORDER_TOKEN_OUTER") = 1;

  m.def("ops", []() {
    return std::vector<std::string>{"linear_forward", "linear_backward", "logits_forward", "logits_backward",
                                    "head_vanilla", "head_cov", "onepass_epilogue"};
  }, "Names of the compute entry points of this module.");
  m.def("host_lanes", []() {
    return std::vector<std::string>{"row_stats_host", "dz_host", "onepass_epilogue_host", "head_vanilla_host",
                                    "head_cov_host"};
  }, "Host loops running the kernels' own __host__ __device__ code over CPU memory.");
  m.def("kernels", []() {
    return std::vector<std::string>{"row_stats<float|half|bfloat16>", "dz<float->float|half|bfloat16, half->half, "
                                    "bfloat16->bfloat16>", "colsum", "cast<half|bfloat16>", "head_vanilla",
                                    "head_cov", "onepass<none|half|bfloat16>"};
  }, "CUDA kernels compiled into this module.");
  m.def("compiled_archs", []() { return split_archs(FUSEDRL_CUDA_ARCHS_STR); },
        "CMAKE_CUDA_ARCHITECTURES this module was compiled for (e.g. ['80', '90a']).");
  m.def("cuda_runtime_version", []() {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  }, "Version of the (statically linked) CUDA runtime, e.g. 13000.");
  m.def("cuda_driver_version", []() {
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;
    return v;
  }, "CUDA driver version (0 without a driver).");
  m.def("device_check", &device_check, py::arg("device"), py::call_guard<py::gil_scoped_release>(),
        "(ok, reason): whether a CUDA device is usable and this build has a kernel image for it.");
  m.def("load_cublas", [](const std::vector<std::string>& candidates) { return fusedrl::cublas_load(candidates); },
        py::arg("candidates") = std::vector<std::string>{},
        "dlopen cuBLAS (sonames first, then `candidates`); returns '' on success else the reason.");
  m.def("cublas_loaded", &fusedrl::cublas_loaded);
  m.def("cublas_path", &fusedrl::cublas_path);
  m.def("cublas_version", &fusedrl::cublas_version);

  m.def("fwd_workspace_bytes", &fusedrl::fwd_workspace_bytes, py::arg("chunk_tokens"), py::arg("chunk_vocab"),
        py::arg("cublas_ws_bytes"), py::arg("overlap"), py::arg("dh") = false,
        "dh: room for the entropy change's two more running sums (linear_forward with p2 / p2h).");
  m.def("bwd_workspace_bytes", &fusedrl::bwd_workspace_bytes, py::arg("N"), py::arg("H"), py::arg("V"),
        py::arg("chunk_tokens"), py::arg("chunk_vocab"), py::arg("dtype"), py::arg("order"), py::arg("lean"),
        py::arg("need_dx"), py::arg("need_dw"), py::arg("cublas_ws_bytes"), py::arg("overlap"));

  m.def("linear_forward", &fusedrl::linear_forward, py::call_guard<py::gil_scoped_release>(), py::arg("device"),
        py::arg("stream"), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("targets"), py::arg("N"), py::arg("H"),
        py::arg("V"), py::arg("dtype"), py::arg("vocab_start"), py::arg("temperature"), py::arg("temperatures"),
        py::arg("softcap"), py::arg("lse"), py::arg("zt"), py::arg("ent"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("chunk_tokens"), py::arg("chunk_vocab"), py::arg("cublas_ws_bytes"),
        py::arg("allow_tf32"), py::arg("overlap"), py::arg("p2") = 0, py::arg("p2h") = 0,
        "lse/zt/ent [N] fp32 from x [N,H] and w [V,H] (pointers); bias fp32 [V] or 0; ent 0 to skip; softcap <= 0: "
        "none; temperatures fp32 [N] per-token (then temperature is not read) or 0; p2/p2h fp32 [N] (both or "
        "neither): the entropy change's row sums sum p^2 and sum p^2 (log p + H).");
  m.def("linear_backward", &fusedrl::linear_backward, py::call_guard<py::gil_scoped_release>(), py::arg("device"),
        py::arg("stream"), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("targets"), py::arg("N"), py::arg("H"),
        py::arg("V"), py::arg("dtype"), py::arg("vocab_start"), py::arg("temperature"), py::arg("temperatures"),
        py::arg("softcap"), py::arg("lse"), py::arg("ent"), py::arg("g_lp"), py::arg("g_H"), py::arg("dx"),
        py::arg("dw"), py::arg("db"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("chunk_tokens"),
        py::arg("chunk_vocab"), py::arg("order"), py::arg("lean"), py::arg("cublas_ws_bytes"), py::arg("allow_tf32"),
        py::arg("overlap"),
        "dx [N,H] / dw [V,H] in the input dtype, db fp32 [V]; pass 0 for any not needed.");
  m.def("logits_forward", &fusedrl::logits_forward, py::call_guard<py::gil_scoped_release>(), py::arg("device"),
        py::arg("stream"), py::arg("logits"), py::arg("N"), py::arg("V"), py::arg("dtype"), py::arg("temperature"),
        py::arg("temperatures"), py::arg("softcap"), py::arg("targets"), py::arg("lse"), py::arg("zt"),
        py::arg("ent"), py::arg("p2") = 0, py::arg("p2h") = 0);
  m.def("logits_backward", &fusedrl::logits_backward, py::call_guard<py::gil_scoped_release>(), py::arg("device"),
        py::arg("stream"), py::arg("logits"), py::arg("out"), py::arg("N"), py::arg("V"), py::arg("dtype"),
        py::arg("temperature"), py::arg("temperatures"), py::arg("softcap"), py::arg("targets"), py::arg("lse"),
        py::arg("ent"), py::arg("g_lp"), py::arg("g_H"));

  // Policy-loss head (head.cu): flat fp32 [n] inputs, uint8 mask or 0; lo = 1 - clip_low, hi = 1 + clip_high.
  m.def("head_vanilla", &fusedrl::head_vanilla, py::call_guard<py::gil_scoped_release>(), py::arg("device"),
        py::arg("stream"), py::arg("logp"), py::arg("old_logp"), py::arg("advantages"), py::arg("mask"), py::arg("n"),
        py::arg("lo"), py::arg("hi"), py::arg("clip_c"), py::arg("has_dual"), py::arg("loss"), py::arg("clipped"),
        py::arg("lower"), py::arg("neg_d"), py::arg("coef"),
        "Vanilla PPO per token: loss, clipped/lower (uint8), neg_d, coef = dloss/dlogp (device pointers).");
  m.def("head_vanilla_host", &fusedrl::head_vanilla_host, py::call_guard<py::gil_scoped_release>(), py::arg("logp"),
        py::arg("old_logp"), py::arg("advantages"), py::arg("mask"), py::arg("n"), py::arg("lo"), py::arg("hi"),
        py::arg("clip_c"), py::arg("has_dual"), py::arg("loss"), py::arg("clipped"), py::arg("lower"),
        py::arg("neg_d"), py::arg("coef"), "head_vanilla's per-token code run over host memory (CPU pointers).");
  m.def("head_cov", &fusedrl::head_cov, py::call_guard<py::gil_scoped_release>(), py::arg("device"),
        py::arg("stream"), py::arg("logp"), py::arg("old_logp"), py::arg("advantages"), py::arg("mask"),
        py::arg("means"), py::arg("n"), py::arg("lo"), py::arg("hi"), py::arg("lb"), py::arg("ub"), py::arg("cov"),
        py::arg("candidates"),
        "Covariance (A - mean_A)(logp - mean_logp) per token; means = device [mean_A, mean_logp]; candidates "
        "(uint8, or 0 to skip) = Clip-Cov's valid & not clipped & lb < cov < ub.");
  // Row kernels' host lanes (host_lanes.cpp): fp32, CPU pointers; same arguments as the kernels. Everywhere,
  // `temperatures` is 0 (scalar `temperature`) or a pointer to fp32 per-row temperatures of the call's rows.
  m.def("row_stats_host", &row_stats_host, py::call_guard<py::gil_scoped_release>(), py::arg("u"), py::arg("ld"),
        py::arg("rows"), py::arg("cols"), py::arg("bias"), py::arg("targets"), py::arg("col_base"),
        py::arg("vocab_start"), py::arg("vocab_size"), py::arg("temperature"), py::arg("temperatures"),
        py::arg("softcap"), py::arg("run"),
        py::arg("run_stride"), py::arg("first"), py::arg("last"), py::arg("lse"), py::arg("zt"), py::arg("ent"),
        py::arg("p2") = 0, py::arg("p2h") = 0,
        "row_stats kernel's code over host memory: one [rows, cols] fp32 chunk merged into run[3, run_stride] "
        "(run[5, run_stride] with p2 / p2h, the entropy change's row sums).");
  m.def("dz_host", &dz_host, py::call_guard<py::gil_scoped_release>(), py::arg("u"), py::arg("ld_in"), py::arg("out"),
        py::arg("ld_out"), py::arg("rows"), py::arg("cols"), py::arg("bias"), py::arg("targets"), py::arg("col_base"),
        py::arg("temperature"), py::arg("temperatures"), py::arg("softcap"), py::arg("lse"), py::arg("ent"),
        py::arg("g_lp"), py::arg("g_H"),
        "dz kernel's code over host memory: du of one fp32 chunk into out (may alias u).");
  // One-pass row epilogue (onepass.cu): du written over u (du32 = false: not; then du16 is required); du16
  // (0 = none) as du16_dtype (1 fp16, 2 bf16).
  m.def("onepass_epilogue", &onepass_epilogue, py::call_guard<py::gil_scoped_release>(), py::arg("device"),
        py::arg("stream"), FUSEDRL_ONEPASS_PYARGS,
        "One-pass row epilogue kernel on `stream`: logp/ent/lse/g_lp/g_H [rows] and du in place (device pointers).");
  m.def("onepass_epilogue_host", &onepass_epilogue_host, py::call_guard<py::gil_scoped_release>(),
        FUSEDRL_ONEPASS_PYARGS, "onepass_epilogue's code over host memory (CPU pointers), row by row.");
  m.def("_debug_fail_gemm_after", &fusedrl::cublas_debug_fail_after, py::arg("k"),
        "Test hook: the (k+1)-th cuBLAS GEMM from now throws once; k < 0 disarms.");
  m.def("head_cov_host", &fusedrl::head_cov_host, py::call_guard<py::gil_scoped_release>(), py::arg("logp"),
        py::arg("old_logp"), py::arg("advantages"), py::arg("mask"), py::arg("means"), py::arg("n"), py::arg("lo"),
        py::arg("hi"), py::arg("lb"), py::arg("ub"), py::arg("cov"), py::arg("candidates"),
        "head_cov's per-token code run over host memory (CPU pointers).");
}
