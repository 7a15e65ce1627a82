// Threading of the operator's passes: one way of cutting a loop across threads, run either
// by threads forked for that loop alone or by a team forked once for a run of dependent
// loops.

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

// Threads this call may use: none beside itself inside another parallel region.
inline int64_t available_threads() {
  if (at::in_parallel_region() || omp_in_parallel()) return 1;
  return at::get_num_threads();
}

// Threads worth cutting n elements of work across, in pieces of at least `grain`.
inline int64_t loop_threads(int64_t n, int64_t grain, int64_t threads) {
  grain = std::max<int64_t>(1, grain);
  return std::clamp<int64_t>((n + grain - 1) / grain, 1, threads);
}

// f(begin, end) over [0, n) on this thread alone: in one call, or `last_first`, in up to
// kPiecesPerThread pieces of at least `grain`, the last first (see Team::loop).
template <typename F>
void alone(int64_t n, int64_t grain, const F& f, bool last_first) {
  if (n <= 0) return;
  if (!last_first) return f(0, n);
  int64_t pieces = std::clamp<int64_t>(n / std::max<int64_t>(1, grain), 1, kPiecesPerThread);
  for (int64_t piece = pieces - 1; piece >= 0; --piece)
    f(piece * n / pieces, (piece + 1) * n / pieces);
}

// One thread's contiguous run of pieces in one loop, packed in one word: the loop's number
// (32 bits), then [front, back) (16 bits each). Its owner takes pieces from one end (the
// front, or the back in a loop run last first), other threads, once their own run is
// done, from the other. A word still holding an earlier loop's number is that loop's run,
// finished: whichever thread reaches it first in this loop starts it at this loop's
// bounds, so no barrier is needed to set it up.
struct alignas(64) PieceRun {
  std::atomic<uint64_t> word{0};

  static uint64_t pack(uint64_t loop, uint64_t front, uint64_t back) {
    return loop << 32 | back << 16 | front;
  }

  bool take(bool from_front, uint32_t loop, uint64_t first, uint64_t last, int64_t& piece) {
    uint64_t now = word.load(std::memory_order_relaxed);
    while (true) {
      bool current = now >> 32 == loop;
      uint64_t front = current ? now & 0xffffu : first;
      uint64_t back = current ? now >> 16 & 0xffffu : last;
      if (front >= back) return false;
      uint64_t next = from_front ? pack(loop, front + 1, back) : pack(loop, front, back - 1);
      if (word.compare_exchange_weak(now, next, std::memory_order_relaxed)) {
        piece = static_cast<int64_t>(from_front ? front : back - 1);
        return true;
      }
    }
  }
};

// One member of a team of threads that runs a sequence of loops, each reading what the
// ones before it wrote. Every member calls every loop in the same order.
class Team {
 public:
  Team(PieceRun* runs, int64_t size, int64_t me) : runs_(runs), size_(size), me_(me) {}

  // The member that forked the team (the caller's own thread).
  bool leader() const { return me_ == 0; }

  // Runs f(begin, end) over [0, n) in pieces of at least `grain`, once every member is done
  // with the loop before: each loop but the first starts at a barrier, and the last one's
  // wait is the join at the end of run_team (a barrier after every loop made that two
  // waits). So a member reads what others wrote only inside a later loop. Thread t owns the
  // t-th contiguous run of pieces and works through it in order, so the loops over a chunk
  // of x (pool, then rescale) give each thread the rows it pooled to rescale, from its own
  // core's cache: handing pieces out as threads came free moved them between cores and cost
  // up to a third of the operator at N = 1 (SE-ResNet-50's sites, 2 threads). A thread done
  // with its run takes pieces from the far end of the others' runs, so a thread slowed by the
  // machine is not waited for (a split without it was 3-7 % slower at N = 32). Each output
  // is still computed by one thread in a fixed order. A call runs far fewer than 2^32
  // loops.
  //
  // A second pass over the rows of a first runs `last_first`: each thread works through
  // its run from the back, so it starts on the rows it read last, still the most recent
  // in its cache. In order, where a thread's rows outsize its L2 (256 x 56 x 56 at N = 1,
  // 1.6 MB a thread, beside y), each line written evicted the oldest, the rows needed
  // next: last first was 10 % faster there (in-process A/B, both layouts), the same where
  // the rows fit.
  template <typename F>
  void loop(int64_t n, int64_t grain, const F& f, bool last_first = false) {
    if (loop_++ > 0 && size_ > 1) {
#pragma omp barrier
    }
    int64_t threads = loop_threads(n, grain, size_);
    if (threads == 1) {
      if (leader()) alone(n, grain, f, last_first);
    } else {
      int64_t per_thread =
          std::clamp<int64_t>(n / (std::max<int64_t>(1, grain) * threads), 1, kPiecesPerThread);
      // piece i is [i n / pieces, (i + 1) n / pieces): sizes differ by one at most, so the
      // threads' runs are even (pieces of ceil(n / pieces) left 49 channels_last pixel
      // blocks as 28 + 21, and the thread done first took the other's rows, out of the
      // other core's cache; even runs made those calls, 256 x 56 x 56 at N = 1, about
      // 8 % faster against a clone)
      int64_t pieces = threads * per_thread, piece;
      for (int64_t j = 0; j < threads; ++j) {
        int64_t owner = (me_ + j) % threads;
        uint64_t first = owner * per_thread;
        bool from_front = (owner == me_) != last_first;
        while (runs_[owner].take(from_front, loop_, first, first + per_thread, piece)) {
          int64_t begin = piece * n / pieces, end = (piece + 1) * n / pieces;
          if (begin < end) f(begin, end);
        }
      }
    }
  }

 private:
  PieceRun* runs_;
  int64_t size_, me_;
  uint32_t loop_ = 0;
};

// Forks `size` threads once (none where size is 1) and calls body(team) on each.
template <typename Body>
void run_team(int64_t size, const Body& body) {
  // pieces are numbered in 16 bits: at most kPiecesPerThread per thread
  size = std::clamp<int64_t>(size, 1, (int64_t(1) << 16) / kPiecesPerThread - 1);
  if (size == 1) {
    PieceRun run;
    Team team(&run, 1, 0);
    body(team);
    return;
  }
  std::vector<PieceRun> runs(size);
#pragma omp parallel num_threads(size)
  {
    Team team(runs.data(), omp_get_num_threads(), omp_get_thread_num());
    body(team);
  }
}

// One loop with a fork and join of its own, for passes that run one loop between ATen calls.
template <typename F>
void parallel(int64_t n, int64_t grain, const F& f, bool last_first = false) {
  int64_t threads = loop_threads(n, grain, available_threads());
  if (threads == 1) return alone(n, grain, f, last_first);
  run_team(threads, [&](Team& team) { team.loop(n, grain, f, last_first); });
}

// The loops of passes that fork for each loop (Team's interface, for code shared with a team).
struct Forking {
  bool leader() const { return true; }
  template <typename F>
  void loop(int64_t n, int64_t grain, const F& f, bool last_first = false) const {
    parallel(n, grain, f, last_first);
  }
};

}  // namespace sae_cpu
