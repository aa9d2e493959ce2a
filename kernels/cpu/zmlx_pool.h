// The persistent worker pool the CPU kernels run on (zmlx_pool.cpp).
//
// Why persistent: a 48-layer MoE model makes ~200 kernel calls per decoded token; creating and
// joining threads per call (tens of microseconds each) cost more than the work of a small call.
// Workers spin briefly after a job (the next call usually comes within microseconds), then sleep.
// Size: ZMLX_CPU_THREADS, else the CPUs this process may actually use — the affinity mask and
// the cgroup CPU quota (cgroup v2 cpu.max or v1 cfs_quota/period), at most 64.
#pragma once
#include <cstddef>
#include <type_traits>

namespace zmlx_pool {

// Worker count including the calling thread (>= 1).
int threads();

// The CPUs available to this process: min(affinity mask, ceil(cgroup quota)), >= 1.
int available_cpus();

// Runs job(ctx, i) for every i in [0, n), items handed out one at a time to the calling thread
// and the workers. Returns when all are done. job must not throw and must not call run() itself.
// If the pool is busy (another thread is inside run()), the items run on the calling thread.
void run(size_t n, void (*job)(void*, size_t), void* ctx);

template <class F>
void parallel_items(size_t n, F&& f) {
  if (n == 0) return;
  if (n == 1 || threads() == 1) {
    for (size_t i = 0; i < n; ++i) f(i);
    return;
  }
  using Fn = std::remove_reference_t<F>;
  run(n, [](void* c, size_t i) { (*static_cast<Fn*>(c))(i); }, const_cast<void*>(static_cast<const void*>(&f)));
}

// f(begin, end) over [0, n) in at most threads() contiguous ranges.
template <class F>
void parallel_ranges(size_t n, F&& f) {
  size_t t = size_t(threads()) < n ? size_t(threads()) : n;
  if (t <= 1) {
    if (n) f(size_t(0), n);
    return;
  }
  size_t step = (n + t - 1) / t;
  parallel_items(t, [&](size_t i) {
    size_t b = i * step, e = b + step < n ? b + step : n;
    if (b < e) f(b, e);
  });
}

}  // namespace zmlx_pool
