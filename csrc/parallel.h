// Threading of the operator's passes: one OpenMP loop shape, used everywhere.

#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace sae_cpu {

// Most pieces per thread a parallel loop is cut into, for balance.
constexpr int64_t kPiecesPerThread = 8;

// Runs f(begin, end) over [0, n) in parallel: in pieces of at least `grain`, at most
// kPiecesPerThread per thread, handed to the threads as they come free (on a shared
// machine a loop split once, evenly, waits for its slowest thread). Serial inside
// another parallel region.
template <typename F>
void parallel(int64_t n, int64_t grain, const F& f) {
  grain = std::max<int64_t>(1, grain);
  int64_t threads = at::get_num_threads();
  int64_t pieces = std::min((n + grain - 1) / grain, threads * kPiecesPerThread);
  if (pieces <= 1 || threads <= 1 || at::in_parallel_region() || omp_in_parallel()) {
    if (n > 0) f(0, n);
    return;
  }
  int64_t size = (n + pieces - 1) / pieces;
#pragma omp parallel for schedule(dynamic, 1) num_threads(std::min(threads, pieces))
  for (int64_t piece = 0; piece < pieces; ++piece) {
    int64_t begin = piece * size;
    if (begin < n) f(begin, std::min(n, begin + size));
  }
}


}  // namespace sae_cpu
