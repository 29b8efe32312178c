// Minimal runtime-loaded cuBLAS (dlopen): the extension neither needs cuBLAS headers at build time
// nor libcublas at import time. On a GPU machine the library torch already loaded (same soname) is
// reused; otherwise the candidate paths given by the Python side are tried.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

namespace fusedrl {

// Values from cublas_api.h / library_types.h (stable since CUDA 11).
enum : int { CUBLAS_STATUS_SUCCESS_ = 0 };
enum : int { CUBLAS_OP_N_ = 0, CUBLAS_OP_T_ = 1 };
enum : int { CUDA_R_32F_ = 0, CUDA_R_16F_ = 2, CUDA_R_16BF_ = 14 };
enum : int { CUBLAS_COMPUTE_32F_ = 68, CUBLAS_COMPUTE_32F_FAST_TF32_ = 77 };
enum : int { CUBLAS_GEMM_DEFAULT_ = -1 };
enum : int { CUBLAS_DEFAULT_MATH_ = 0 };

typedef void* cublas_handle;

// Loads cuBLAS once (thread-safe). Returns "" on success, else why it could not be loaded.
// `candidates` are tried after the plain sonames (libcublas.so.13, .so.12, .so).
std::string cublas_load(const std::vector<std::string>& candidates);
bool cublas_loaded();
std::string cublas_path();
int cublas_version();  // e.g. 130100; 0 when unknown / not loaded

// Handle for (calling thread, device), bound to `stream`, with `workspace` (may be null / 0 bytes
// for cuBLAS's own default pool). Requires the device to be current.
cublas_handle cublas_handle_for(int device, cudaStream_t stream, void* workspace, size_t workspace_bytes);

// Row-major helper: see driver.cpp for the mapping. Throws on error.
void cublas_gemm(cublas_handle h, int transa, int transb, int m, int n, int k, float alpha, const void* A, int Atype,
                 int lda, const void* B, int Btype, int ldb, float beta, void* C, int Ctype, int ldc, int compute);

// Test hook: the (k+1)-th cublas_gemm from now throws once (k < 0: off).
void cublas_debug_fail_after(int64_t k);

}  // namespace fusedrl
