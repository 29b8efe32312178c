// fusedrl CUDA backend: chunk loops around cuBLAS GEMMs and the epilogue kernels.
//
// Row-major -> cuBLAS (column-major) mapping. A row-major [r, c] matrix with row stride ld is, read
// column-major, its transpose [c, r] with leading dimension ld. So, for a token chunk x_c [nc, H],
// a vocab chunk w_v [vc, H], the logits chunk L [nc, vc] (row stride Vc) and du (same layout):
//   L  = x_c w_v^T      <=>  L^T  [vc, nc] = op_T(w_v as [H, vc]) * op_N(x_c as [H, nc])
//   dx = du w_v         <=>  dx^T [H, nc]  = op_N(w_v as [H, vc]) * op_N(du as [vc, nc])
//   dw = du^T x_c       <=>  dw^T [H, vc]  = op_N(x_c as [H, nc]) * op_T(du as [vc, nc])
// Every GEMM is bounded by the chunk sizes, never [N, V]; sizes passed to cuBLAS fit in int, all
// buffer offsets are int64/size_t.
#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "cublas_dyn.h"
#include "fusedrl_cuda.h"

namespace fusedrl {

Transform make_transform(double temperature, double softcap, const float* temps) {
  if (temps == nullptr && !(temperature > 0)) throw std::invalid_argument("fusedrl._C: temperature must be > 0");
  Transform tr;
  tr.temperature = temps == nullptr ? (float)temperature : 1.f;  // per-token: replaced row by row
  tr.has_cap = softcap > 0 ? 1 : 0;
  tr.cap = softcap > 0 ? (float)softcap : 1.f;
  tr.TEMPS = temps;
  return tr;
}

namespace {

constexpr size_t kAlign = 256;
inline size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int cuda_dtype(int dt) {
  switch (dt) {
    case kF32: return CUDA_R_32F_;
    case kF16: return CUDA_R_16F_;
    case kBF16: return CUDA_R_16BF_;
  }
  throw std::invalid_argument("fusedrl._C: bad dtype code " + std::to_string(dt));
}

void check_int(const char* what, int64_t v) {
  if (v < 0 || v > INT_MAX) throw std::invalid_argument(std::string("fusedrl._C: ") + what + " out of int range");
}

void check_chunks(int64_t N, int64_t H, int64_t V, int64_t Nc, int64_t Vc) {
  if (N < 0 || H <= 0 || V <= 0) throw std::invalid_argument("fusedrl._C: need N >= 0, H > 0, V > 0");
  if (Nc <= 0 || Vc <= 0) throw std::invalid_argument("fusedrl._C: chunk sizes must be positive");
  check_int("H", H);
  check_int("chunk_tokens", Nc);
  check_int("chunk_vocab", Vc);
}

int compute_type(int dt, bool allow_tf32) {
  return (dt == kF32 && allow_tf32) ? CUBLAS_COMPUTE_32F_FAST_TF32_ : CUBLAS_COMPUTE_32F_;
}

// A side stream + events per (thread, device) for overlap mode: the memory-bound epilogue of chunk
// k runs on the side stream while the caller's stream runs the next GEMM. The side stream joins the
// caller's stream at entry and exit, so the call stays stream-ordered for the caller (and for
// torch's caching allocator, which only sees the caller's stream).
struct SidePool {
  cudaStream_t side = nullptr;
  cudaEvent_t ev_in = nullptr, ev_done = nullptr, ev_front[2] = {nullptr, nullptr}, ev_back[2] = {nullptr, nullptr};
};

SidePool& side_pool(int device) {
  thread_local std::unordered_map<int, SidePool> pools;  // never destroyed (process-exit ordering)
  auto it = pools.find(device);
  if (it != pools.end()) return it->second;
  SidePool p;
  FUSEDRL_CUDA_CHECK(cudaStreamCreateWithFlags(&p.side, cudaStreamNonBlocking));
  for (cudaEvent_t* e : {&p.ev_in, &p.ev_done, &p.ev_front[0], &p.ev_front[1], &p.ev_back[0], &p.ev_back[1]})
    FUSEDRL_CUDA_CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
  return pools.emplace(device, p).first->second;
}

// Make `waiter` wait for all work queued so far on `signaller`.
void join(cudaStream_t signaller, cudaStream_t waiter, cudaEvent_t ev) {
  FUSEDRL_CUDA_CHECK(cudaEventRecord(ev, signaller));
  FUSEDRL_CUDA_CHECK(cudaStreamWaitEvent(waiter, ev, 0));
}

// The side stream of one overlap-mode call, joined back into the caller's stream on EVERY exit.
// torch's caching allocator only sees the caller's stream: if a cuBLAS call (or a launch) throws
// while side-stream kernels still read or write the workspace, returning without the join would let
// torch hand that memory to the next allocation on the caller's stream while those kernels run.
// close() is the normal exit (errors reported); the destructor is the error path (never throws;
// when even the event join fails, the host waits for the side stream).
class SideStreamScope {
 public:
  // pool == nullptr: no overlap, the epilogue stream is the caller's stream.
  SideStreamScope(SidePool* pool, cudaStream_t stream) : stream_(stream) {
    if (pool != nullptr) join(stream, pool->side, pool->ev_in);  // side stream waits for the caller's work
    pool_ = pool;
  }
  ~SideStreamScope() {
    if (pool_ == nullptr) return;
    if (cudaEventRecord(pool_->ev_done, pool_->side) != cudaSuccess ||
        cudaStreamWaitEvent(stream_, pool_->ev_done, 0) != cudaSuccess) {
      (void)cudaGetLastError();
      (void)cudaStreamSynchronize(pool_->side);
      (void)cudaGetLastError();
    }
  }
  SideStreamScope(const SideStreamScope&) = delete;
  SideStreamScope& operator=(const SideStreamScope&) = delete;

  cudaStream_t epilogue_stream() const { return pool_ != nullptr ? pool_->side : stream_; }

  // The caller's stream waits for everything queued on the side stream.
  void close() {
    if (pool_ == nullptr) return;
    join(pool_->side, stream_, pool_->ev_done);
    pool_ = nullptr;
  }

 private:
  SidePool* pool_ = nullptr;
  cudaStream_t stream_;
};

template <typename T>
T* at(uintptr_t base, size_t off) {
  return reinterpret_cast<T*>(base + off);
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// Workspace layouts (one torch-allocated byte buffer, sub-buffers 256-byte aligned)
// ----------------------------------------------------------------------------------------------
// nbuf = 2 (overlap mode) double-buffers the chunk buffers.
struct FwdLayout {
  size_t off_cublas = 0, off_logits[2] = {0, 0}, off_run = 0, total = 0;
};

// dh: the running statistics have 5 rows (m, s, b, s2, b2: the entropy change's sums too), else 3.
FwdLayout fwd_layout(int64_t Nc, int64_t Vc, int64_t cublas_ws, int nbuf, bool dh) {
  if (nbuf != 1 && nbuf != 2) throw std::invalid_argument("fusedrl._C: nbuf must be 1 or 2");
  FwdLayout l;
  size_t off = align_up((size_t)cublas_ws);
  for (int i = 0; i < nbuf; ++i) {
    l.off_logits[i] = off;
    off += align_up((size_t)Nc * (size_t)Vc * 4);
  }
  if (nbuf == 1) l.off_logits[1] = l.off_logits[0];
  l.off_run = off;
  l.total = off + align_up((size_t)Nc * (dh ? 5 : 3) * 4);
  return l;
}

enum Order : int { kVocabOuter = 0, kTokenOuter = 1 };

struct BwdLayout {
  // dx accumulator: direct (into dx itself, in dx's dtype), full fp32 [N, H], or chunk fp32 [Nc, H]
  bool dx_direct = false, dx_full = false;
  bool dw_direct = false, dw_full = false;
  size_t off_cublas = 0, off_logits[2] = {0, 0}, off_du[2] = {0, 0}, off_dx = 0, off_dw = 0, total = 0;
};

BwdLayout bwd_layout(int64_t N, int64_t H, int64_t V, int64_t Nc, int64_t Vc, int dt, int order, bool lean,
                     bool need_dx, bool need_dw, int64_t cublas_ws, int nbuf) {
  if (order != kVocabOuter && order != kTokenOuter) throw std::invalid_argument("fusedrl._C: order must be 0 or 1");
  if (nbuf != 1 && nbuf != 2) throw std::invalid_argument("fusedrl._C: nbuf must be 1 or 2");
  BwdLayout l;
  const size_t es = dtype_size(dt);
  size_t off = align_up((size_t)cublas_ws);
  for (int i = 0; i < nbuf; ++i) {
    l.off_logits[i] = off;
    off += align_up((size_t)Nc * (size_t)Vc * 4);
    l.off_du[i] = l.off_logits[i];  // fp32: du overwrites the logits chunk in place
    if (dt != kF32) {
      l.off_du[i] = off;
      off += align_up((size_t)Nc * (size_t)Vc * es);
    }
  }
  if (nbuf == 1) {
    l.off_logits[1] = l.off_logits[0];
    l.off_du[1] = l.off_du[0];
  }
  l.off_dx = off;
  if (need_dx) {
    if (dt == kF32 || (lean && order == kVocabOuter)) {
      l.dx_direct = true;
    } else if (order == kTokenOuter) {
      off += align_up((size_t)Nc * (size_t)H * 4);
    } else {
      l.dx_full = true;
      off += align_up((size_t)N * (size_t)H * 4);
    }
  }
  l.off_dw = off;
  if (need_dw) {
    if (dt == kF32 || (lean && order == kTokenOuter)) {
      l.dw_direct = true;
    } else if (order == kVocabOuter) {
      off += align_up((size_t)Vc * (size_t)H * 4);
    } else {
      l.dw_full = true;
      off += align_up((size_t)V * (size_t)H * 4);
    }
  }
  l.total = off;
  return l;
}

int64_t fwd_workspace_bytes(int64_t Nc, int64_t Vc, int64_t cublas_ws, bool overlap, bool dh) {
  return (int64_t)fwd_layout(Nc, Vc, cublas_ws, overlap ? 2 : 1, dh).total;
}

int64_t bwd_workspace_bytes(int64_t N, int64_t H, int64_t V, int64_t Nc, int64_t Vc, int dt, int order, bool lean,
                            bool need_dx, bool need_dw, int64_t cublas_ws, bool overlap) {
  return (int64_t)bwd_layout(N, H, V, Nc, Vc, dt, order, lean, need_dx, need_dw, cublas_ws, overlap ? 2 : 1).total;
}

// ----------------------------------------------------------------------------------------------
// Forward: token chunks outer, vocab chunks inner; logits chunk fp32 [nc, vc] (row stride Vc),
// online per-token stats merged across vocab chunks. Saves nothing but lse / ent.
// overlap: GEMM k+1 (caller's stream) runs while the epilogue of chunk k runs on the side stream
// (two logits buffers; the GEMM into a buffer waits for the epilogue that last read it).
// p2 / p2h (0 = none; both or neither): the entropy change's row sums [N] each (fusedrl_cuda.h
// launch_row_stats); the workspace then holds 5 running rows (fwd_workspace_bytes(..., dh = true)).
// ----------------------------------------------------------------------------------------------
void linear_forward(int device, uintptr_t stream_, uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t targets,
                    int64_t N, int64_t H, int64_t V, int dt, int64_t vocab_start, double temperature,
                    uintptr_t temperatures, double softcap, uintptr_t lse, uintptr_t zt, uintptr_t ent, uintptr_t ws,
                    int64_t ws_bytes, int64_t Nc, int64_t Vc, int64_t cublas_ws, bool allow_tf32, bool overlap,
                    uintptr_t p2, uintptr_t p2h) {
  check_chunks(N, H, V, Nc, Vc);
  if ((p2 == 0) != (p2h == 0)) throw std::invalid_argument("fusedrl._C: p2 and p2h are given together or not at all");
  if (N == 0) return;
  const int nbuf = overlap ? 2 : 1;
  const bool dh = p2 != 0;
  const FwdLayout lay = fwd_layout(Nc, Vc, cublas_ws, nbuf, dh);
  if ((size_t)ws_bytes < lay.total)
    throw std::invalid_argument("fusedrl._C: forward workspace too small: " + std::to_string(ws_bytes) + " < " +
                                std::to_string(lay.total));
  const Transform tr = make_transform(temperature, softcap, reinterpret_cast<const float*>(temperatures));
  const size_t es = dtype_size(dt);
  const int ct = cuda_dtype(dt);
  DeviceGuard guard(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_);
  cublas_handle h = cublas_handle_for(device, stream, cublas_ws > 0 ? at<void>(ws, lay.off_cublas) : nullptr,
                                      (size_t)cublas_ws);
  SidePool* pool = overlap ? &side_pool(device) : nullptr;
  SideStreamScope side(pool, stream);  // joins the side stream on every exit, exceptions included
  cudaStream_t epi = side.epilogue_stream();
  float* run = at<float>(ws, lay.off_run);
  const float* b = reinterpret_cast<const float*>(bias);
  const int64_t* tg = reinterpret_cast<const int64_t*>(targets);
  float* lse_p = reinterpret_cast<float*>(lse);
  float* zt_p = reinterpret_cast<float*>(zt);
  float* ent_p = reinterpret_cast<float*>(ent);
  float* p2_p = reinterpret_cast<float*>(p2);
  float* p2h_p = reinterpret_cast<float*>(p2h);
  const int comp = compute_type(dt, allow_tf32);
  int64_t k = 0;
  for (int64_t n0 = 0; n0 < N; n0 += Nc) {
    const int64_t nc = std::min(Nc, N - n0);
    const Transform trc = row::rows_from(tr, n0);  // per-token temperatures of this token chunk
    for (int64_t v0 = 0; v0 < V; v0 += Vc, ++k) {
      const int64_t vc = std::min(Vc, V - v0);
      const int slot = (int)(k % nbuf);
      float* L = at<float>(ws, lay.off_logits[slot]);
      if (overlap && k >= nbuf) FUSEDRL_CUDA_CHECK(cudaStreamWaitEvent(stream, pool->ev_back[slot], 0));
      cublas_gemm(h, CUBLAS_OP_T_, CUBLAS_OP_N_, (int)vc, (int)nc, (int)H, 1.f,
                  reinterpret_cast<const char*>(w) + (size_t)v0 * H * es, ct, (int)H,
                  reinterpret_cast<const char*>(x) + (size_t)n0 * H * es, ct, (int)H, 0.f, L, CUDA_R_32F_, (int)Vc,
                  comp);
      if (overlap) join(stream, epi, pool->ev_front[slot]);
      launch_row_stats(kF32, L, Vc, nc, vc, b ? b + v0 : nullptr, tg + n0, vocab_start + v0, vocab_start, V, trc, run,
                       Nc, v0 == 0, v0 + vc >= V, lse_p + n0, zt_p + n0, ent_p ? ent_p + n0 : nullptr, epi,
                       dh ? p2_p + n0 : nullptr, dh ? p2h_p + n0 : nullptr);
      if (overlap) FUSEDRL_CUDA_CHECK(cudaEventRecord(pool->ev_back[slot], epi));
    }
  }
  side.close();
}

// ----------------------------------------------------------------------------------------------
// Backward: recompute each logits chunk, turn it into du in place, then dx += du w_v and
// dw_v += du^T x_c (fp32 accumulation; beta = 0 on the first contribution, so no memset).
// order kVocabOuter keeps a [Vc, H] fp32 dw accumulator per vocab chunk and a full [N, H] fp32 dx
// accumulator; kTokenOuter the reverse. fp32 inputs accumulate straight into dx / dw. `lean`
// accumulates the cross-outer-loop gradient directly in its (16-bit) output instead.
// overlap: the caller's stream runs logits GEMM k+1 and gradient GEMMs k while the side stream
// turns chunk k+1 into du (double-buffered logits / du).
// ----------------------------------------------------------------------------------------------
void linear_backward(int device, uintptr_t stream_, uintptr_t x, uintptr_t w, uintptr_t bias, uintptr_t targets,
                     int64_t N, int64_t H, int64_t V, int dt, int64_t vocab_start, double temperature,
                     uintptr_t temperatures, double softcap, uintptr_t lse, uintptr_t ent, uintptr_t g_lp,
                     uintptr_t g_H, uintptr_t dx, uintptr_t dw, uintptr_t db, uintptr_t ws, int64_t ws_bytes,
                     int64_t Nc, int64_t Vc, int order, bool lean, int64_t cublas_ws, bool allow_tf32, bool overlap) {
  check_chunks(N, H, V, Nc, Vc);
  const bool need_dx = dx != 0, need_dw = dw != 0, need_db = db != 0;
  if (g_H != 0 && ent == 0) throw std::invalid_argument("fusedrl._C: g_H given without ent");
  const int nbuf = overlap ? 2 : 1;
  const BwdLayout lay = bwd_layout(N, H, V, Nc, Vc, dt, order, lean, need_dx, need_dw, cublas_ws, nbuf);
  if ((size_t)ws_bytes < lay.total)
    throw std::invalid_argument("fusedrl._C: backward workspace too small: " + std::to_string(ws_bytes) + " < " +
                                std::to_string(lay.total));
  if (N == 0 || (!need_dx && !need_dw && !need_db)) return;  // caller zero-fills dw / db for N == 0
  const Transform tr = make_transform(temperature, softcap, reinterpret_cast<const float*>(temperatures));
  const size_t es = dtype_size(dt);
  const int ct = cuda_dtype(dt);
  DeviceGuard guard(device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_);
  cublas_handle h = cublas_handle_for(device, stream, cublas_ws > 0 ? at<void>(ws, lay.off_cublas) : nullptr,
                                      (size_t)cublas_ws);
  SidePool* pool = overlap ? &side_pool(device) : nullptr;
  SideStreamScope side(pool, stream);  // joins the side stream on every exit, exceptions included
  cudaStream_t epi = side.epilogue_stream();
  const int comp = compute_type(dt, allow_tf32);

  float* dx_acc = at<float>(ws, lay.off_dx);
  float* dw_acc = at<float>(ws, lay.off_dw);
  const float* b = reinterpret_cast<const float*>(bias);
  const int64_t* tg = reinterpret_cast<const int64_t*>(targets);
  const float* lse_p = reinterpret_cast<const float*>(lse);
  const float* ent_p = reinterpret_cast<const float*>(ent);
  const float* glp_p = reinterpret_cast<const float*>(g_lp);
  const float* gh_p = reinterpret_cast<const float*>(g_H);
  float* db_p = reinterpret_cast<float*>(db);
  const char* xb = reinterpret_cast<const char*>(x);
  const char* wb = reinterpret_cast<const char*>(w);

  const int64_t n_chunks = cdiv(N, Nc), v_chunks = cdiv(V, Vc);
  const bool vocab_outer = order == kVocabOuter;
  const int64_t inner = vocab_outer ? n_chunks : v_chunks;
  const int64_t K = n_chunks * v_chunks;
  struct Chunk {
    int64_t ni, vi, n0, v0, nc, vc;
  };
  auto chunk = [&](int64_t k) {
    Chunk c;
    const int64_t o = k / inner, i = k % inner;
    c.ni = vocab_outer ? i : o;
    c.vi = vocab_outer ? o : i;
    c.n0 = c.ni * Nc;
    c.v0 = c.vi * Vc;
    c.nc = std::min(Nc, N - c.n0);
    c.vc = std::min(Vc, V - c.v0);
    return c;
  };

  // logits GEMM (caller's stream) + du and bias-grad column sums (epilogue stream)
  auto front = [&](int64_t k) {
    const Chunk c = chunk(k);
    const int slot = (int)(k % nbuf);
    float* L = at<float>(ws, lay.off_logits[slot]);
    void* du = at<void>(ws, lay.off_du[slot]);
    cublas_gemm(h, CUBLAS_OP_T_, CUBLAS_OP_N_, (int)c.vc, (int)c.nc, (int)H, 1.f, wb + (size_t)c.v0 * H * es, ct,
                (int)H, xb + (size_t)c.n0 * H * es, ct, (int)H, 0.f, L, CUDA_R_32F_, (int)Vc, comp);
    if (overlap) join(stream, epi, pool->ev_front[slot]);
    launch_dz(kF32, L, Vc, dt, du, Vc, (need_db && dt != kF32) ? L : nullptr, Vc, c.nc, c.vc,
              b ? b + c.v0 : nullptr, tg + c.n0, vocab_start + c.v0, row::rows_from(tr, c.n0), lse_p + c.n0,
              ent_p ? ent_p + c.n0 : nullptr, glp_p ? glp_p + c.n0 : nullptr, gh_p ? gh_p + c.n0 : nullptr, epi);
    if (need_db) launch_colsum(L, Vc, c.nc, c.vc, db_p + c.v0, c.n0 > 0, epi);
    if (overlap) FUSEDRL_CUDA_CHECK(cudaEventRecord(pool->ev_back[slot], epi));
  };

  // gradient GEMMs (caller's stream) + casts of finished fp32 accumulators
  auto back = [&](int64_t k) {
    const Chunk c = chunk(k);
    const int slot = (int)(k % nbuf);
    const void* du = at<void>(ws, lay.off_du[slot]);
    if (overlap) FUSEDRL_CUDA_CHECK(cudaStreamWaitEvent(stream, pool->ev_back[slot], 0));
    if (need_dx) {  // dx rows [n0, n0 + nc) += du @ w_v
      void* C;
      int Ct;
      if (lay.dx_direct) {
        C = reinterpret_cast<char*>(dx) + (size_t)c.n0 * H * es;
        Ct = ct;
      } else {
        C = lay.dx_full ? dx_acc + (size_t)c.n0 * H : dx_acc;
        Ct = CUDA_R_32F_;
      }
      cublas_gemm(h, CUBLAS_OP_N_, CUBLAS_OP_N_, (int)H, (int)c.nc, (int)c.vc, 1.f, wb + (size_t)c.v0 * H * es, ct,
                  (int)H, du, ct, (int)Vc, c.v0 > 0 ? 1.f : 0.f, C, Ct, (int)H, comp);
      if (!lay.dx_direct && c.vi == v_chunks - 1)
        launch_cast_from_f32(static_cast<const float*>(C), dt, reinterpret_cast<char*>(dx) + (size_t)c.n0 * H * es,
                             c.nc * H, stream);
    }
    if (need_dw) {  // dw rows [v0, v0 + vc) += du^T @ x_c
      void* C;
      int Ct;
      if (lay.dw_direct) {
        C = reinterpret_cast<char*>(dw) + (size_t)c.v0 * H * es;
        Ct = ct;
      } else {
        C = lay.dw_full ? dw_acc + (size_t)c.v0 * H : dw_acc;
        Ct = CUDA_R_32F_;
      }
      cublas_gemm(h, CUBLAS_OP_N_, CUBLAS_OP_T_, (int)H, (int)c.vc, (int)c.nc, 1.f, xb + (size_t)c.n0 * H * es, ct,
                  (int)H, du, ct, (int)Vc, c.n0 > 0 ? 1.f : 0.f, C, Ct, (int)H, comp);
      if (!lay.dw_direct && c.ni == n_chunks - 1)
        launch_cast_from_f32(static_cast<const float*>(C), dt, reinterpret_cast<char*>(dw) + (size_t)c.v0 * H * es,
                             c.vc * H, stream);
    }
  };

  const bool gemms = need_dx || need_dw;
  if (!overlap) {
    for (int64_t k = 0; k < K; ++k) {
      front(k);
      if (gemms) back(k);
    }
    return;
  }
  // Pipeline on the caller's stream: L0, L1, G0, L2, G1, ... ; the side stream runs dz(k) after L(k).
  // Buffer reuse: L(k+2) is queued after G(k) on the caller's stream, and G(k) waited for dz(k),
  // so neither the logits nor the du buffer of slot k%2 is overwritten while still being read.
  front(0);
  for (int64_t k = 0; k < K; ++k) {
    if (k + 1 < K) front(k + 1);
    if (gemms) back(k);
    else FUSEDRL_CUDA_CHECK(cudaStreamWaitEvent(stream, pool->ev_back[k % 2], 0));
  }
  side.close();
}

// ----------------------------------------------------------------------------------------------
// Logits given: one row per block over the whole [N, V] row (no GEMM, no cuBLAS).
// ----------------------------------------------------------------------------------------------
void logits_forward(int device, uintptr_t stream_, uintptr_t logits, int64_t N, int64_t V, int dt,
                    double temperature, uintptr_t temperatures, double softcap, uintptr_t targets, uintptr_t lse,
                    uintptr_t zt, uintptr_t ent, uintptr_t p2, uintptr_t p2h) {
  if (N < 0 || V <= 0) throw std::invalid_argument("fusedrl._C: need N >= 0, V > 0");
  if ((p2 == 0) != (p2h == 0)) throw std::invalid_argument("fusedrl._C: p2 and p2h are given together or not at all");
  if (N == 0) return;
  const Transform tr = make_transform(temperature, softcap, reinterpret_cast<const float*>(temperatures));
  DeviceGuard guard(device);
  launch_row_stats(dt, reinterpret_cast<const void*>(logits), V, N, V, nullptr,
                   reinterpret_cast<const int64_t*>(targets), 0, 0, V, tr, nullptr, 0, true, true,
                   reinterpret_cast<float*>(lse), reinterpret_cast<float*>(zt), reinterpret_cast<float*>(ent),
                   reinterpret_cast<cudaStream_t>(stream_), reinterpret_cast<float*>(p2),
                   reinterpret_cast<float*>(p2h));
}

void logits_backward(int device, uintptr_t stream_, uintptr_t logits, uintptr_t out, int64_t N, int64_t V, int dt,
                     double temperature, uintptr_t temperatures, double softcap, uintptr_t targets, uintptr_t lse,
                     uintptr_t ent, uintptr_t g_lp, uintptr_t g_H) {
  if (N < 0 || V <= 0) throw std::invalid_argument("fusedrl._C: need N >= 0, V > 0");
  if (g_H != 0 && ent == 0) throw std::invalid_argument("fusedrl._C: g_H given without ent");
  if (N == 0) return;
  const Transform tr = make_transform(temperature, softcap, reinterpret_cast<const float*>(temperatures));
  DeviceGuard guard(device);
  launch_dz(dt, reinterpret_cast<const void*>(logits), V, dt, reinterpret_cast<void*>(out), V, nullptr, 0, N, V,
            nullptr, reinterpret_cast<const int64_t*>(targets), 0, tr, reinterpret_cast<const float*>(lse),
            reinterpret_cast<const float*>(ent), reinterpret_cast<const float*>(g_lp),
            reinterpret_cast<const float*>(g_H), reinterpret_cast<cudaStream_t>(stream_));
}

}  // namespace fusedrl
