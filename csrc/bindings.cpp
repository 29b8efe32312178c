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
int64_t fwd_workspace_bytes(int64_t Nc, int64_t Vc, int64_t cublas_ws, bool overlap);
int64_t bwd_workspace_bytes(int64_t N, int64_t H, int64_t V, int64_t Nc, int64_t Vc, int dt, int order, bool lean,
                            bool need_dx, bool need_dw, int64_t cublas_ws, bool overlap);
void linear_forward(int device, uintptr_t stream, uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t targets,
                    int64_t N, int64_t H, int64_t V, int dt, int64_t vocab_start, double temperature, double softcap,
                    uintptr_t lse, uintptr_t zt, uintptr_t ent, uintptr_t ws, int64_t ws_bytes, int64_t Nc,
                    int64_t Vc, int64_t cublas_ws, bool allow_tf32, bool overlap);
void linear_backward(int device, uintptr_t stream, uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t targets,
                     int64_t N, int64_t H, int64_t V, int dt, int64_t vocab_start, double temperature, double softcap,
                     uintptr_t lse, uintptr_t ent, uintptr_t g_lp, uintptr_t g_H, uintptr_t dx, uintptr_t dw,
                     uintptr_t db, uintptr_t ws, int64_t ws_bytes, int64_t Nc, int64_t Vc, int order, bool lean,
                     int64_t cublas_ws, bool allow_tf32, bool overlap);
void logits_forward(int device, uintptr_t stream, uintptr_t logits, int64_t N, int64_t V, int dt, double temperature,
                    double softcap, uintptr_t targets, uintptr_t lse, uintptr_t zt, uintptr_t ent);
void logits_backward(int device, uintptr_t stream, uintptr_t logits, uintptr_t out, int64_t N, int64_t V, int dt,
                     double temperature, double softcap, uintptr_t targets, uintptr_t lse, uintptr_t ent,
                     uintptr_t g_lp, uintptr_t g_H);
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
                                    "head_vanilla", "head_cov"};
  }, "Names of the compute entry points of this module.");
  m.def("kernels", []() {
    return std::vector<std::string>{"row_stats<float|half|bfloat16>", "dz<float->float|half|bfloat16, half->half, "
                                    "bfloat16->bfloat16>", "colsum", "cast<half|bfloat16>", "head_vanilla",
                                    "head_cov"};
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
        py::arg("cublas_ws_bytes"), py::arg("overlap"));
  m.def("bwd_workspace_bytes", &fusedrl::bwd_workspace_bytes, py::arg("N"), py::arg("H"), py::arg("V"),
        py::arg("chunk_tokens"), py::arg("chunk_vocab"), py::arg("dtype"), py::arg("order"), py::arg("lean"),
        py::arg("need_dx"), py::arg("need_dw"), py::arg("cublas_ws_bytes"), py::arg("overlap"));

  m.def("linear_forward", &fusedrl::linear_forward, py::call_guard<py::gil_scoped_release>(), py::arg("device"),
        py::arg("stream"), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("targets"), py::arg("N"), py::arg("H"),
        py::arg("V"), py::arg("dtype"), py::arg("vocab_start"), py::arg("temperature"), py::arg("softcap"),
        py::arg("lse"), py::arg("zt"), py::arg("ent"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("chunk_tokens"), py::arg("chunk_vocab"), py::arg("cublas_ws_bytes"), py::arg("allow_tf32"), py::arg("overlap"),
        "lse/zt/ent [N] fp32 from x [N,H] and w [V,H] (pointers); bias fp32 [V] or 0; ent 0 to skip; softcap <= 0: none.");
  m.def("linear_backward", &fusedrl::linear_backward, py::call_guard<py::gil_scoped_release>(), py::arg("device"),
        py::arg("stream"), py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("targets"), py::arg("N"), py::arg("H"),
        py::arg("V"), py::arg("dtype"), py::arg("vocab_start"), py::arg("temperature"), py::arg("softcap"),
        py::arg("lse"), py::arg("ent"), py::arg("g_lp"), py::arg("g_H"), py::arg("dx"), py::arg("dw"), py::arg("db"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("chunk_tokens"), py::arg("chunk_vocab"),
        py::arg("order"), py::arg("lean"), py::arg("cublas_ws_bytes"), py::arg("allow_tf32"), py::arg("overlap"),
        "dx [N,H] / dw [V,H] in the input dtype, db fp32 [V]; pass 0 for any not needed.");
  m.def("logits_forward", &fusedrl::logits_forward, py::call_guard<py::gil_scoped_release>(), py::arg("device"),
        py::arg("stream"), py::arg("logits"), py::arg("N"), py::arg("V"), py::arg("dtype"), py::arg("temperature"),
        py::arg("softcap"), py::arg("targets"), py::arg("lse"), py::arg("zt"), py::arg("ent"));
  m.def("logits_backward", &fusedrl::logits_backward, py::call_guard<py::gil_scoped_release>(), py::arg("device"),
        py::arg("stream"), py::arg("logits"), py::arg("out"), py::arg("N"), py::arg("V"), py::arg("dtype"),
        py::arg("temperature"), py::arg("softcap"), py::arg("targets"), py::arg("lse"), py::arg("ent"),
        py::arg("g_lp"), py::arg("g_H"));

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
  m.def("head_cov_host", &fusedrl::head_cov_host, py::call_guard<py::gil_scoped_release>(), py::arg("logp"),
        py::arg("old_logp"), py::arg("advantages"), py::arg("mask"), py::arg("means"), py::arg("n"), py::arg("lo"),
        py::arg("hi"), py::arg("lb"), py::arg("ub"), py::arg("cov"), py::arg("candidates"),
        "head_cov's per-token code run over host memory (CPU pointers).");
}
