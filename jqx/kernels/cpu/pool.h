// The persistent thread pool of jqx's native CPU kernels, included by
// int8_gemm.cc, gguf_gemv.cc and conv_int8.cc (one copy of the code; native.py's
// build cache key hashes this header with each source, so editing it rebuilds
// all three).
//
// Design: threads claim chunks of a job from a shared counter, the calling
// thread too, so a worker the OS has not scheduled (a busy, shared machine)
// claims nothing and the others finish the job: a call never waits for a
// sleeping thread, only for chunks already being computed (an even split was up
// to 10x slower under load). Workers spin briefly (kPoolSpinNs, yielding the
// core to any other runnable thread) for the next job, then sleep on a
// condition variable, so back-to-back calls (the products of one layer) never
// start threads. A call that finds the pool busy (another XLA thread owns it)
// runs its chunks on the calling thread. Inside an FFI call of more than
// kXlaPoolRows rows (XlaPoolScope) the helpers are tasks on XLA's own
// intra-op pool instead (RunOnXla).
//
// One pool per process, shared by the three libraries: each library is a
// separate shared object with its own copy of this code, so native.py hands the
// first library's pool to the others (jqx_pool_handle / jqx_pool_adopt below)
// right after loading them, before any kernel runs. Only a library that passed
// its CPU check creates the pool, so its workers run code this CPU executes.
// The pool is never destroyed (its threads are detached and parked at exit); a
// forked child, which has no workers, gets its own.
//
// Size: $JQX_NUM_THREADS when set to a positive integer before the pool is
// created, else the CPUs this process may run on (sched_getaffinity).

#ifndef JQX_KERNELS_CPU_POOL_H_
#define JQX_KERNELS_CPU_POOL_H_

#include <immintrin.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace {

// How long a worker spins for the next job before it sleeps: long enough to
// bridge the gaps between the products of a layer, short enough not to burn a
// shared core between calls.
constexpr int64_t kPoolSpinNs = 200 * 1000;

inline int64_t PoolNowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

// Spins (pausing) until done() or kPoolSpinNs have passed; returns done().
// ``yield``: every 64 pauses also offer the core to another runnable thread
// (sched_yield returns at once when there is none). An idle worker spins with
// it: between jqx's products XLA runs its own fusions on its own threads, and
// a worker that only paused kept one of their cores for up to kPoolSpinNs
// (MiniLM at batch 1: 12-15% of the call; benchmarks/bert_cpu.md).
template <typename F>
inline bool SpinUntil(F done, bool yield = false) {
  if (done()) return true;
  const int64_t start = PoolNowNs();
  for (int i = 1;; ++i) {
    _mm_pause();
    if (done()) return true;
    if (i % 64 == 0) {
      if (PoolNowNs() - start > kPoolSpinNs) return false;
      if (yield) sched_yield();
    }
  }
}

using ChunkFn = void (*)(const void* ctx, int64_t chunk);

// XLA's intra-op thread pool (the Eigen pool XLA:CPU runs its own fusions on),
// for the duration of one FFI call (XlaPoolScope in the handler of a call with
// more than kXlaPoolRows rows). While it is set, Pool::Run hands its helpers to
// that pool instead of jqx's own workers: XLA's threads sit idle, spinning,
// while a jqx kernel runs, and jqx's own worker then competed with them for
// the same cores (on 2 cores it joined hardly any call; MiniLM at batch 1,
// docs/benchmarks/bert_cpu.md).
constexpr int64_t kXlaPoolRows = 16;
thread_local xla::ffi::ThreadPool* t_xla_pool = nullptr;
thread_local int64_t t_xla_threads = 0;

// The rows of an (..., K) operand: every axis but the last.
template <typename Dims>
inline int64_t RowsOf(const Dims& dims) {
  int64_t r = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) r *= dims[i];
  return r;
}

class XlaPoolScope {
 public:
  // ``use`` false leaves jqx's own workers in charge: decode-sized calls (a few
  // rows, tens of microseconds each, back to back) are faster on a worker that
  // is already spinning than on XLA's threads, which sleep between XLA's own
  // fusions and take a wake-up per call (SmolLM2 decode 134-140 -> 109-113
  // tokens/s when every call went to XLA's pool).
  XlaPoolScope(xla::ffi::ThreadPool& pool, bool use)
      : prev_(t_xla_pool), prev_threads_(t_xla_threads) {
    if (!use) return;
    t_xla_pool = &pool;
    t_xla_threads = pool.num_threads();
  }
  ~XlaPoolScope() {
    t_xla_pool = prev_;
    t_xla_threads = prev_threads_;
  }
  XlaPoolScope(const XlaPoolScope&) = delete;
  XlaPoolScope& operator=(const XlaPoolScope&) = delete;

 private:
  xla::ffi::ThreadPool* prev_;
  int64_t prev_threads_;
};

// Claims chunks from ``next`` until none is left, running each and counting it
// in ``done`` (a job's loop, on jqx's workers and on XLA's alike).
inline void ClaimChunks(std::atomic<int64_t>& next, std::atomic<int64_t>& done, ChunkFn fn,
                        const void* ctx, int64_t chunks) {
  for (;;) {
    const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
    if (c >= chunks) return;
    fn(ctx, c);
    done.fetch_add(1, std::memory_order_release);
  }
}

// One job on XLA's pool: chunks claimed from a shared counter by the caller and
// by helper tasks. A helper that starts after every chunk was claimed (XLA's
// threads were busy) finds nothing to do and touches only this heap object,
// which it keeps alive; ``ctx`` (the caller's stack) is read only for a chunk
// claimed before the caller returns.
struct XlaJob {
  std::atomic<int64_t> next{0}, done{0};
  ChunkFn fn = nullptr;
  const void* ctx = nullptr;
  int64_t chunks = 0;
  void Work() { ClaimChunks(next, done, fn, ctx, chunks); }
};

class Pool {
 public:
  explicit Pool(int threads) : threads_(std::max(1, threads)) {
    for (int i = 1; i < threads_; ++i) std::thread([this] { Worker(); }).detach();
  }

  int threads() const { return threads_; }

  // Runs fn(ctx, c) for every c in [0, chunks); returns when all are done.
  void Run(ChunkFn fn, const void* ctx, int64_t chunks) {
    if (chunks > 1 && threads_ > 1 && t_xla_pool != nullptr && t_xla_threads > 1) {
      RunOnXla(fn, ctx, chunks);
      return;
    }
    if (chunks <= 1 || threads_ == 1 || !busy_.try_lock()) {
      // One chunk, no workers, or another call owns them: all on this thread.
      for (int64_t c = 0; c < chunks; ++c) fn(ctx, c);
      return;
    }
    fn_ = fn;
    ctx_ = ctx;
    chunks_ = chunks;
    next_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    open_.store(true);  // seq_cst: publishes the fields above to the workers
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    Work();
    const auto all_done = [&] { return done_.load(std::memory_order_acquire) == chunks; };
    while (!SpinUntil(all_done)) std::this_thread::yield();  // a chunk's thread was preempted
    // Close the job, then wait for workers that joined it to leave before the
    // fields (and ctx, on the caller's stack) change.
    open_.store(false);
    const auto no_guests = [&] { return active_.load() == 0; };
    while (!SpinUntil(no_guests)) std::this_thread::yield();
    busy_.unlock();
  }

  // Runs f(i) for every i in [0, n) on the pool (any callable; a lambda's
  // captures live on the caller's stack for the whole call).
  template <typename F>
  void ForEach(int64_t n, F& f) {
    Run([](const void* ctx, int64_t i) { (*static_cast<F*>(const_cast<void*>(ctx)))(i); }, &f,
        n);
  }

 private:
  void RunOnXla(ChunkFn fn, const void* ctx, int64_t chunks) {
    auto job = std::make_shared<XlaJob>();
    job->fn = fn;
    job->ctx = ctx;
    job->chunks = chunks;
    const int64_t helpers =
        std::min<int64_t>({int64_t{threads_} - 1, t_xla_threads - 1, chunks - 1});
    for (int64_t h = 0; h < helpers; ++h) t_xla_pool->Schedule([job] { job->Work(); });
    job->Work();
    const auto all_done = [&] { return job->done.load(std::memory_order_acquire) == chunks; };
    while (!SpinUntil(all_done)) std::this_thread::yield();  // a chunk's thread was preempted
  }

  void Work() { ClaimChunks(next_, done_, fn_, ctx_, chunks_); }

  void Worker() {
    uint64_t seen = 0;
    for (;;) {
      const auto posted = [&] { return gen_.load(std::memory_order_acquire) != seen; };
      if (!SpinUntil(posted, /*yield=*/true)) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, posted);
      }
      seen = gen_.load(std::memory_order_acquire);
      // seq_cst pair with Run(): either Run() sees this thread active and waits
      // for it, or this thread sees the job closed and leaves it alone.
      active_.fetch_add(1);
      if (open_.load()) Work();
      active_.fetch_sub(1);
    }
  }

  const int threads_;
  std::mutex busy_;  // held by the call that owns the workers
  std::mutex mu_;    // with cv_: sleeping workers
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};  // bumped once per job: wakes the workers
  std::atomic<bool> open_{false};
  std::atomic<int> active_{0};  // workers inside the current job
  std::atomic<int64_t> next_{0}, done_{0};
  ChunkFn fn_ = nullptr;
  const void* ctx_ = nullptr;
  int64_t chunks_ = 0;
};

inline int DefaultThreads() {
  if (const char* s = getenv("JQX_NUM_THREADS")) {
    char* end = nullptr;
    const long v = strtol(s, &end, 10);
    if (end != s && *end == '\0' && v >= 1) return static_cast<int>(std::min<long>(v, 1024));
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

std::mutex g_pool_mu;
Pool* g_pool = nullptr;
pid_t g_pool_pid = 0;

// The process's pool (this library's, or the one adopted from another).
Pool* GetPool() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  const pid_t pid = getpid();
  if (g_pool == nullptr || g_pool_pid != pid) {
    g_pool = new Pool(DefaultThreads());
    g_pool_pid = pid;
  }
  return g_pool;
}

// Bump when Pool's layout or protocol changes: libraries only share a pool of
// the same version and size.
constexpr int64_t kPoolAbi = 1;

}  // namespace

// Every library exports these four (the names are the same in each, so
// native.py reaches each through its own ctypes handle, never by global lookup).
//
// jqx_pool_abi: what a pool handle must match to be adopted.
extern "C" int64_t jqx_pool_abi() { return kPoolAbi * 1000000 + int64_t{sizeof(Pool)}; }

// jqx_pool_handle: this library's pool (creating it).
extern "C" void* jqx_pool_handle() { return GetPool(); }

// jqx_pool_threads: the threads of this library's pool (creating it).
extern "C" int jqx_pool_threads() { return GetPool()->threads(); }

// jqx_pool_adopt: use `pool` (another library's jqx_pool_handle, of the same
// jqx_pool_abi) from now on. Returns 1, or 0 (nothing changed) where this
// library already made its own pool.
extern "C" int jqx_pool_adopt(void* pool) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (pool == nullptr || (g_pool != nullptr && g_pool != pool)) return 0;
  g_pool = static_cast<Pool*>(pool);
  g_pool_pid = getpid();
  return 1;
}

#endif  // JQX_KERNELS_CPU_POOL_H_
