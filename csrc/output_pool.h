// Memory for the operator's large outputs (y, dx, d_identity), kept after their tensor
// dies for the next output of the same size.
//
// glibc maps an allocation of a few MB or more afresh (or grows its heap and trims it
// again), so every call's output was faulted in 4 KiB at a time, the kernel zeroing each
// page first; in a network the same sizes come back every step (SE 32 x 256 x 56 x 56:
// 0.13-0.56x the time with the pool, benchmarks/output_pool.py). Under torch.compile the
// cost is the op's alone: inductor plans the memory of the kernels it generates, reusing
// buffers the graph is done with. A block released to the pool is handed to the next
// output of exactly its size, already mapped. The pool holds at most
// SAE_KERNELS_CPU_OUTPUT_POOL_BYTES (default 256 MiB; 0: no pool) of released blocks and
// frees what would exceed it; outputs under kPoolMinBytes come from the heap as before.

#pragma once

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>

namespace sae_cpu {

// Outputs from this size on come from the pool.
constexpr size_t kPoolMinBytes = size_t(1) << 20;
constexpr size_t kDefaultPoolBytes = size_t(256) << 20;
// New memory from this size on is advised onto huge pages (glibc's largest mmap threshold).
constexpr size_t kHugePageMinBytes = size_t(32) << 20;

// Asks for transparent huge pages under `bytes` of new memory at `data`, from
// kHugePageMinBytes on. glibc serves allocations that large with a fresh mapping, and at
// one page fault per 4 KiB their first write cost more than the operator (half the time at
// N = 32 on SE-ResNet's first stage, before the pool kept such memory mapped for the next
// call); with 2 MiB pages it is 512 times fewer faults. Off with
// SAE_KERNELS_CPU_HUGE_PAGES=0; a no-op where the kernel's THP setting is `never`.
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* given = std::getenv("SAE_KERNELS_CPU_HUGE_PAGES");
    return given == nullptr || std::atoll(given) > 0;
  }();
  constexpr uintptr_t kHugePage = 2 << 20;
  if (!enabled || bytes < kHugePageMinBytes) return;
  auto begin = reinterpret_cast<uintptr_t>(data);
  uintptr_t end = (begin + bytes) & ~(kHugePage - 1);
  begin = (begin + kHugePage - 1) & ~(kHugePage - 1);
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only
#endif
}

class OutputPool final : public c10::Allocator {
 public:
  // One pool per process, never destroyed: tensors may die after static destructors ran.
  static OutputPool& instance() {
    static OutputPool* pool = new OutputPool();
    return *pool;
  }

  size_t limit() const { return limit_; }

  c10::DataPtr allocate(size_t bytes) override {
    Block* block = take(bytes);
    if (block == nullptr) {
      block = new Block{c10::alloc_cpu(bytes), bytes};
      advise_huge_pages(block->data, bytes);
    }
    return {block->data, block, &OutputPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };

  OutputPool() {
    const char* given = std::getenv("SAE_KERNELS_CPU_OUTPUT_POOL_BYTES");
    limit_ = given ? static_cast<size_t>(std::stoull(given)) : kDefaultPoolBytes;
  }

  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = released_.find(bytes);
    if (it == released_.end()) return nullptr;
    Block* block = it->second;
    released_.erase(it);
    held_ -= bytes;
    return block;
  }

  static void release(void* context) {
    auto* block = static_cast<Block*>(context);
    OutputPool& pool = instance();
    {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      if (pool.held_ + block->bytes <= pool.limit_) {
        pool.released_.emplace(block->bytes, block);
        pool.held_ += block->bytes;
        return;
      }
    }
    c10::free_cpu(block->data);
    delete block;
  }

  std::mutex mutex_;
  std::unordered_multimap<size_t, Block*> released_;  // by size in bytes
  size_t held_ = 0;
  size_t limit_;
};

// Whether an output of `bytes` comes from the pool.
inline bool pooled(size_t bytes) {
  return bytes >= kPoolMinBytes && OutputPool::instance().limit() > 0;
}

// An uninitialised CPU tensor of `sizes` and `strides` (dense) from the pool.
inline at::Tensor pooled_empty(at::IntArrayRef sizes, at::IntArrayRef strides,
                               at::ScalarType dtype) {
  return at::detail::empty_strided_generic(sizes, strides, &OutputPool::instance(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), dtype);
}

}  // namespace sae_cpu
