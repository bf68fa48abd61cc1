// Host-side plumbing shared by the CPU ops: make each tensor addressable as a flat array,
// split the whole list into one flat list of fixed-size chunks, run the chunks in parallel,
// and reduce per-chunk partial norms in chunk order.
//
// One flat list of (tensor, chunk) work items, not one parallel_for per tensor: 100 tiny
// tensors cost one parallel region (or none, below kSerialBelow elements), not 100.
#pragma once

#include <algorithm>
#include <atomic>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>

#include "cpu/kernels.h"

namespace fastscale::cpu {

// Below this many elements in a whole call, waking the second thread costs more than it saves.
constexpr int64_t kSerialBelow = 1 << 15;

// Tensors addressed as flat arrays. The op is elementwise, so tensors that are dense and
// non-overlapping with identical strides (contiguous, channels_last, transposed alike) are used
// in place, in memory order. Any other layout (a slice with gaps, mismatched strides) runs on a
// contiguous copy; copies of tensors the op writes are copied back by write_back().
class FlatTensors {
 public:
  // `group[j]` are the tensors that correspond elementwise (param, grad, buffer) of one index.
  void add_group(std::vector<at::Tensor> group, std::vector<bool> written) {
    const at::Tensor& first = group[0];
    bool direct = true;
    for (const at::Tensor& t : group) {
      direct = direct && t.is_non_overlapping_and_dense() && t.strides() == first.strides();
    }
    for (size_t j = 0; j < group.size(); ++j) {
      at::Tensor& t = group[j];
      if (!direct && !t.is_contiguous()) {
        at::Tensor copy = t.contiguous();
        if (written[j]) originals_.emplace_back(t, copy);
        t = copy;
      }
    }
    groups_.push_back(std::move(group));
  }

  const at::Tensor& get(size_t index, size_t member) const { return groups_[index][member]; }

  void write_back() {
    for (auto& [original, copy] : originals_) original.copy_(copy);
  }

 private:
  std::vector<std::vector<at::Tensor>> groups_;
  std::vector<std::pair<at::Tensor, at::Tensor>> originals_;
};

// first_chunk[i] is tensor i's first chunk index; first_chunk[n] the total number of chunks.
inline std::vector<int64_t> chunk_starts(const std::vector<int64_t>& numels) {
  std::vector<int64_t> first_chunk(numels.size() + 1, 0);
  for (size_t i = 0; i < numels.size(); ++i) {
    first_chunk[i + 1] = first_chunk[i] + (numels[i] + kChunk - 1) / kChunk;
  }
  return first_chunk;
}

// run(begin, end) over chunk indices, in parallel unless the call is small. at::parallel_for
// only threads when this file is compiled with -fopenmp (fastscale/_build_flags.py).
// Threads take kChunksPerGrab chunks at a time from a shared counter rather than a fixed half
// each: a thread that is descheduled (a busy machine) does not leave the other idle at the
// end. Which thread runs a chunk never changes its result (partials are per chunk).
constexpr int64_t kChunksPerGrab = 4;

template <typename F>
void run_chunks(int64_t num_chunks, int64_t total_numel, const F& run) {
  if (num_chunks == 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), num_chunks);
  if (total_numel < kSerialBelow || threads <= 1 || at::in_parallel_region()) {
    run(0, num_chunks);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, /*grain_size=*/1, [&](int64_t, int64_t) {
    for (int64_t begin = next.fetch_add(kChunksPerGrab); begin < num_chunks;
         begin = next.fetch_add(kChunksPerGrab)) {
      run(begin, std::min(begin + kChunksPerGrab, num_chunks));
    }
  });
}

// fp32 vector of per-tensor squared norms: partials summed in chunk order, in double, so
// the result is the same for any number of threads.
inline at::Tensor sum_partials(const std::vector<double>& partial,
                               const std::vector<int64_t>& first_chunk) {
  const int64_t n = static_cast<int64_t>(first_chunk.size()) - 1;
  at::Tensor norms = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  float* out = norms.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int64_t c = first_chunk[i]; c < first_chunk[i + 1]; ++c) s += partial[c];
    out[i] = static_cast<float>(s);
  }
  return norms;
}

// (|g|^2, g.t, |t|^2) of one flat array g (and t, nullptr for |g|^2 alone), with add t <- t + g
// in the same pass: kChunk-sized chunks over the threads, summed in chunk order.
inline ArrivalSums arrival_sums(c10::ScalarType dtype, const void* grad, void* accumulated,
                                int64_t numel, bool add) {
  const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
  const auto* g = static_cast<const char*>(grad);
  auto* t = static_cast<char*>(accumulated);
  std::vector<ArrivalChunk> chunks;
  for (int64_t begin = 0; begin < numel; begin += kChunk) {
    const int64_t off = begin * elem;
    chunks.push_back({g + off, t ? t + off : nullptr, std::min(kChunk, numel - begin)});
  }
  const auto num_chunks = static_cast<int64_t>(chunks.size());
  std::vector<ArrivalSums> sums(num_chunks);
  const Kernels& k = kernels();
  run_chunks(num_chunks, numel, [&](int64_t begin, int64_t end) {
    k.arrival(dtype, add, chunks.data() + begin, end - begin, sums.data() + begin);
  });
  ArrivalSums total;  // in chunk order: the same for any number of threads
  for (const ArrivalSums& s : sums) {
    total.gg += s.gg;
    total.gt += s.gt;
    total.tt += s.tt;
  }
  return total;
}

}  // namespace fastscale::cpu
