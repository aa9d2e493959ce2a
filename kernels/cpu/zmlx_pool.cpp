// The persistent worker pool of the CPU kernels (interface and rationale: zmlx_pool.h).
//
// Work hand-out: one 64-bit ticket word = generation (24 bits) | item count n (20) | next item (20).
// A thread claims item i of the current run by a compare-and-swap (i < n). A successful claim
// means that run is still in progress (it cannot finish before item i is done), so the job
// pointer it then reads is that run's — a worker that wakes late can never run a stale job.
#include "zmlx_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#define ZMLX_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define ZMLX_PAUSE() asm volatile("yield")
#else
#define ZMLX_PAUSE() ((void)0)
#endif

namespace zmlx_pool {
namespace {

constexpr int MAX_THREADS = 64;
constexpr uint64_t FIELD = 20, MASK = (uint64_t(1) << FIELD) - 1;
constexpr size_t MAX_ITEMS = size_t(MASK);

uint64_t pack(uint64_t gen, uint64_t n, uint64_t i) { return (gen << (2 * FIELD)) | (n << FIELD) | i; }

// ceil(quota / period) of the cgroup CPU limit, or 0 when there is none.
int cgroup_cpus() {
  auto quota_of = [](const std::string& path) -> int {
    std::ifstream f(path);
    std::string q, p;
    if (!(f >> q >> p) || q == "max") return 0;
    double quota = std::atof(q.c_str()), period = std::atof(p.c_str());
    return quota > 0 && period > 0 ? int((quota + period - 1) / period) : 0;
  };
  // cgroup v2: "0::/path" in /proc/self/cgroup, the limit in <mount>/<path>/cpu.max.
  std::ifstream self("/proc/self/cgroup");
  std::string line;
  while (std::getline(self, line))
    if (line.rfind("0::", 0) == 0) {
      std::string rel = line.substr(3);
      if (int n = quota_of("/sys/fs/cgroup" + rel + "/cpu.max")) return n;
    }
  if (int n = quota_of("/sys/fs/cgroup/cpu.max")) return n;
  // cgroup v1: two files.
  for (const char* dir : {"/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"}) {
    std::ifstream q(std::string(dir) + "/cpu.cfs_quota_us"), p(std::string(dir) + "/cpu.cfs_period_us");
    long quota = 0, period = 0;
    if ((q >> quota) && (p >> period) && quota > 0 && period > 0) return int((quota + period - 1) / period);
  }
  return 0;
}

struct Pool {
  std::vector<std::thread> workers;
  std::mutex busy;  // one run() at a time; others run inline
  std::mutex sleep_m;
  std::condition_variable wake;
  std::atomic<int> sleeping{0};
  std::atomic<uint64_t> ticket{0};
  std::atomic<size_t> done{0};
  void (*job)(void*, size_t) = nullptr;
  void* ctx = nullptr;
  uint64_t gen = 0;

  // Claims and runs items of the current run until none is left; true if it ran any.
  bool work() {
    bool any = false;
    uint64_t t = ticket.load(std::memory_order_acquire);
    for (;;) {
      uint64_t n = (t >> FIELD) & MASK, i = t & MASK;
      if (i >= n) return any;
      if (!ticket.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      job(ctx, size_t(i));
      done.fetch_add(1, std::memory_order_release);
      any = true;
      t = ticket.load(std::memory_order_acquire);
    }
  }

  // seq_cst here and in run(): the store of a new ticket and a sleeper's check must not both
  // miss each other (a lost wake-up).
  bool claimable() const {
    uint64_t t = ticket.load();
    return (t & MASK) < ((t >> FIELD) & MASK);
  }

  void worker_loop() {
    for (;;) {
      if (work()) continue;
      // Spin a little: in decode the next kernel call usually follows within microseconds.
      bool found = false;
      for (int s = 0; s < 4000 && !found; ++s) {
        ZMLX_PAUSE();
        found = claimable();
      }
      if (found) continue;
      std::unique_lock<std::mutex> lk(sleep_m);
      sleeping.fetch_add(1);
      wake.wait(lk, [&] { return claimable(); });
      sleeping.fetch_sub(1);
    }
  }

  explicit Pool(int n) {
    for (int i = 1; i < n; ++i) workers.emplace_back([this] { worker_loop(); });
    // Detached at exit: the process ends with them (joining would need a stop protocol that
    // every exit path honours, and they hold no resources).
    for (auto& w : workers) w.detach();
  }
};

Pool& pool() {
  // Leaked on purpose: detached workers reference it until the process ends.
  static Pool* p = new Pool(threads());
  return *p;
}

}  // namespace

int available_cpus() {
  static int n = [] {
    unsigned hw = std::thread::hardware_concurrency();
    int cpus = hw == 0 ? 1 : int(hw);
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = std::max(1, CPU_COUNT(&set));
#endif
    if (int q = cgroup_cpus(); q > 0) cpus = std::min(cpus, q);
    return std::max(1, cpus);
  }();
  return n;
}

int threads() {
  static int n = [] {
    // Validated by zmlx's settings (1..=64) before any kernel runs; clamp anyway for C callers.
    if (const char* v = std::getenv("ZMLX_CPU_THREADS")) {
      int t = std::atoi(v);
      if (t >= 1) return std::min(t, MAX_THREADS);
    }
    return std::min(available_cpus(), MAX_THREADS);
  }();
  return n;
}

void run(size_t n, void (*job)(void*, size_t), void* ctx) {
  Pool& p = pool();
  std::unique_lock<std::mutex> lk(p.busy, std::try_to_lock);
  if (!lk.owns_lock() || n > MAX_ITEMS) {
    for (size_t i = 0; i < n; ++i) job(ctx, i);
    return;
  }
  p.job = job;
  p.ctx = ctx;
  p.done.store(0, std::memory_order_relaxed);
  p.gen = (p.gen + 1) & ((uint64_t(1) << 24) - 1);
  p.ticket.store(pack(p.gen, n, 0));
  if (p.sleeping.load() > 0) {
    { std::lock_guard<std::mutex> g(p.sleep_m); }
    p.wake.notify_all();
  }
  p.work();
  while (p.done.load(std::memory_order_acquire) < n) ZMLX_PAUSE();
}

}  // namespace zmlx_pool
