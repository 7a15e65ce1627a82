// Threading of the operator's passes: one OpenMP loop shape, used everywhere.

#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace sae_cpu {

// Most pieces per thread a parallel loop is cut into, for balance.
constexpr int64_t kPiecesPerThread = 4;

// One thread's contiguous run of pieces, [front, back) packed in one word: its owner takes
// pieces from the front, other threads, once their own run is done, from the back.
struct alignas(64) PieceRun {
  std::atomic<uint64_t> bounds{0};

  static uint64_t pack(uint64_t front, uint64_t back) { return front | back << 32; }

  bool take(bool owner, int64_t& piece) {
    uint64_t now = bounds.load(std::memory_order_relaxed);
    while (true) {
      uint64_t front = now & 0xffffffffu, back = now >> 32;
      if (front >= back) return false;
      uint64_t next = owner ? pack(front + 1, back) : pack(front, back - 1);
      if (bounds.compare_exchange_weak(now, next, std::memory_order_relaxed)) {
        piece = static_cast<int64_t>(owner ? front : back - 1);
        return true;
      }
    }
  }
};

// Runs f(begin, end) over [0, n) in parallel, in pieces of at least `grain`. Thread t owns
// the t-th contiguous run of pieces and works through it in order, so the passes over a
// chunk of x (pool, then rescale) give each thread the rows it pooled to rescale, from its
// own core's cache: handing pieces out as threads came free moved them between cores and
// cost up to a third of the operator at N = 1 (SE-ResNet-50's sites, 2 threads). A thread
// done with its run takes pieces from the back of the others' runs, so a thread slowed by
// the machine is not waited for (a split without it was 3-7 % slower at N = 32). Each
// output is still computed by one thread in a fixed order. Serial inside another parallel
// region.
template <typename F>
void parallel(int64_t n, int64_t grain, const F& f) {
  grain = std::max<int64_t>(1, grain);
  int64_t threads = at::get_num_threads();
  int64_t team = std::min((n + grain - 1) / grain, threads);
  if (team <= 1 || at::in_parallel_region() || omp_in_parallel()) {
    if (n > 0) f(0, n);
    return;
  }
  int64_t per_thread = std::clamp<int64_t>(n / (grain * team), 1, kPiecesPerThread);
  int64_t pieces = team * per_thread, size = (n + pieces - 1) / pieces;
  std::vector<PieceRun> runs(team);
  for (int64_t t = 0; t < team; ++t)
    runs[t].bounds.store(PieceRun::pack(t * per_thread, (t + 1) * per_thread));
#pragma omp parallel num_threads(team)
  {
    int64_t me = omp_get_thread_num(), piece;
    for (int64_t j = 0; j < team; ++j) {
      PieceRun& run = runs[(me + j) % team];
      while (run.take(j == 0, piece)) {
        int64_t begin = piece * size;
        if (begin < n) f(begin, std::min(n, begin + size));
      }
    }
  }
}

}  // namespace sae_cpu
