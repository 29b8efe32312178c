#include "cublas_dyn.h"

#include <dlfcn.h>

#include <atomic>
#include <mutex>
#include <stdexcept>
#include <unordered_map>

namespace fusedrl {
namespace {

typedef int (*create_fn)(cublas_handle*);
typedef int (*set_stream_fn)(cublas_handle, cudaStream_t);
typedef int (*set_workspace_fn)(cublas_handle, void*, size_t);
typedef int (*set_math_mode_fn)(cublas_handle, int);
typedef int (*get_version_fn)(cublas_handle, int*);
typedef const char* (*status_string_fn)(int);
typedef int (*gemm_ex_fn)(cublas_handle, int, int, int, int, int, const void*, const void*, int, int, const void*,
                          int, int, const void*, void*, int, int, int, int);

struct Api {
  void* lib = nullptr;
  std::string path;
  create_fn create = nullptr;
  set_stream_fn set_stream = nullptr;
  set_workspace_fn set_workspace = nullptr;
  set_math_mode_fn set_math_mode = nullptr;
  get_version_fn get_version = nullptr;
  status_string_fn status_string = nullptr;
  gemm_ex_fn gemm_ex = nullptr;
  int version = 0;
};

std::mutex g_mu;
Api g_api;
bool g_loaded = false;

template <typename F>
bool sym(void* lib, const char* name, F& out) {
  out = reinterpret_cast<F>(dlsym(lib, name));
  return out != nullptr;
}

std::string try_open(const std::string& name, Api& api) {
  void* lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* e = dlerror();
    return e ? e : "dlopen failed";
  }
  Api a;
  a.lib = lib;
  a.path = name;
  if (!sym(lib, "cublasCreate_v2", a.create) || !sym(lib, "cublasSetStream_v2", a.set_stream) ||
      !sym(lib, "cublasSetMathMode", a.set_math_mode) || !sym(lib, "cublasGemmEx", a.gemm_ex)) {
    dlclose(lib);
    return name + ": missing cuBLAS symbols";
  }
  sym(lib, "cublasSetWorkspace_v2", a.set_workspace);  // optional (CUDA >= 11.0)
  sym(lib, "cublasGetVersion_v2", a.get_version);
  sym(lib, "cublasGetStatusString", a.status_string);
  api = a;
  return "";
}

std::string status_text(int st) {
  std::string s = "cuBLAS status " + std::to_string(st);
  if (g_api.status_string != nullptr) {
    const char* t = g_api.status_string(st);
    if (t != nullptr) s += std::string(" (") + t + ")";
  }
  return s;
}

}  // namespace

std::string cublas_load(const std::vector<std::string>& candidates) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_loaded) return "";
  std::vector<std::string> names = {"libcublas.so.13", "libcublas.so.12"};
  names.insert(names.end(), candidates.begin(), candidates.end());
  names.push_back("libcublas.so");
  std::string errors;
  for (const auto& n : names) {
    Api a;
    std::string e = try_open(n, a);
    if (e.empty()) {
      g_api = a;
      g_loaded = true;
      return "";
    }
    errors += (errors.empty() ? "" : "; ") + e;
  }
  return "cuBLAS could not be loaded (" + errors + ")";
}

bool cublas_loaded() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_loaded;
}

std::string cublas_path() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_loaded) return "";
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(g_api.gemm_ex), &info) != 0 && info.dli_fname != nullptr) return info.dli_fname;
  return g_api.path;
}

int cublas_version() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_api.version;
}

cublas_handle cublas_handle_for(int device, cudaStream_t stream, void* workspace, size_t workspace_bytes) {
  if (!cublas_loaded()) throw std::runtime_error("fusedrl._C: cuBLAS is not loaded (call load_cublas first)");
  // One handle per (thread, device): cuBLAS handles must not be shared by threads concurrently.
  thread_local std::unordered_map<int, cublas_handle> handles;
  cublas_handle h;
  auto it = handles.find(device);
  if (it == handles.end()) {
    int st = g_api.create(&h);
    if (st != CUBLAS_STATUS_SUCCESS_) throw std::runtime_error("fusedrl._C: cublasCreate failed: " + status_text(st));
    g_api.set_math_mode(h, CUBLAS_DEFAULT_MATH_);
    if (g_api.get_version != nullptr) {
      int v = 0;
      if (g_api.get_version(h, &v) == CUBLAS_STATUS_SUCCESS_) {
        std::lock_guard<std::mutex> lock(g_mu);
        g_api.version = v;
      }
    }
    handles.emplace(device, h);  // intentionally never destroyed (process-exit ordering with the driver)
  } else {
    h = it->second;
  }
  int st = g_api.set_stream(h, stream);
  if (st != CUBLAS_STATUS_SUCCESS_) throw std::runtime_error("fusedrl._C: cublasSetStream failed: " + status_text(st));
  // cublasSetStream resets the workspace to cuBLAS's default pool; bind ours (allocated by torch on
  // this stream) so concurrent streams never share a workspace.
  if (workspace != nullptr && workspace_bytes > 0 && g_api.set_workspace != nullptr) {
    st = g_api.set_workspace(h, workspace, workspace_bytes);
    if (st != CUBLAS_STATUS_SUCCESS_)
      throw std::runtime_error("fusedrl._C: cublasSetWorkspace failed: " + status_text(st));
  }
  return h;
}

namespace {
// Test hook: < 0 off; k >= 0: the (k+1)-th cublas_gemm from now throws (once), as a failing cuBLAS call
// would. Lets a GPU test drive the error paths of the chunk loops (side-stream join).
std::atomic<int64_t> g_fail_after{-1};
}  // namespace

void cublas_debug_fail_after(int64_t k) { g_fail_after.store(k); }

void cublas_gemm(cublas_handle h, int transa, int transb, int m, int n, int k, float alpha, const void* A, int Atype,
                 int lda, const void* B, int Btype, int ldb, float beta, void* C, int Ctype, int ldc, int compute) {
  if (g_fail_after.load(std::memory_order_relaxed) >= 0 && g_fail_after.fetch_sub(1) == 0)
    throw std::runtime_error("fusedrl._C: cublasGemmEx failed: injected failure (test hook)");
  int st = g_api.gemm_ex(h, transa, transb, m, n, k, &alpha, A, Atype, lda, B, Btype, ldb, &beta, C, Ctype, ldc,
                         compute, CUBLAS_GEMM_DEFAULT_);
  if (st != CUBLAS_STATUS_SUCCESS_) {
    throw std::runtime_error("fusedrl._C: cublasGemmEx(m=" + std::to_string(m) + ", n=" + std::to_string(n) +
                             ", k=" + std::to_string(k) + ", lda=" + std::to_string(lda) + ", ldb=" +
                             std::to_string(ldb) + ", ldc=" + std::to_string(ldc) + ") failed: " + status_text(st));
  }
}

}  // namespace fusedrl
