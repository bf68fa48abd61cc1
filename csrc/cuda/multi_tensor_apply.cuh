// A small multi-tensor apply for fastscale's CUDA kernels: many tensors per launch, chunked,
// with one squared-norm partial per chunk and a deterministic second stage that sums each
// tensor's partials in a fixed order.
//
// Why this shape:
// - Tensor metadata travels in the kernel arguments (TensorListArgs, < 4 KiB), never in a
//   buffer filled from the host: kernel arguments are captured by value in a CUDA graph, a
//   pinned staging buffer would be read again, possibly overwritten, at every replay.
// - Each launch is a persistent grid (as many blocks as fit on the device at once) walking the
//   launch's chunks in a grid-stride loop; a block finds a chunk's tensor by binary search over
//   chunk_begin. A launch therefore covers up to MaxTensors tensors of any size (torch's
//   multi_tensor_apply caps the blocks per launch instead, so a big tensor takes many launches).
// - Norms: chunk c's partial goes to partials[c], computed by a fixed thread -> element map and
//   a fixed reduction tree, whichever block runs it; sum_partials_kernel then adds one tensor's
//   partials in index order. No device atomics, so norms are bitwise reproducible run to run.
// - Each tensor gets at least one chunk (an empty tensor's chunk holds 0 elements), so every
//   tensor's partial range is written on the device by the block that runs its chunk 0; the
//   host never reads anything back.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fastscale::cuda {

// Elements per chunk: one norm partial each. A multiple of every vector width x block size x
// unroll below, so each chunk of a 16-byte-aligned tensor starts 16-byte aligned.
constexpr int64_t kChunkElems = 65536;
constexpr int kBlockThreads = 256;
// 16-byte vectors each thread has in flight per tensor before the first use.
constexpr int kUnroll = 2;

static_assert(kChunkElems % (16 * kBlockThreads * kUnroll) == 0,
              "chunks must hold whole unrolled rounds of 16-byte vectors of 1-byte elements");

// ---------------------------------------------------------------------------------------------
// 16-byte vectors

template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load_vec(const T* base, int64_t vec_index) {
  return reinterpret_cast<const Vec16<T>*>(base)[vec_index];
}

template <typename T>
__device__ __forceinline__ void store_vec(T* base, int64_t vec_index, const Vec16<T>& value) {
  reinterpret_cast<Vec16<T>*>(base)[vec_index] = value;
}

__device__ __forceinline__ bool is_aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// ---------------------------------------------------------------------------------------------
// Per-step scalars (lr, grad_scale, found_inf), read on the device: never a host read of
// device memory, so no sync and nothing baked into a captured graph.

enum class ScalarKind : int32_t { kHostValue, kFloat, kDouble, kHalf, kBFloat16, kBool };

struct ScalarArg {
  const void* ptr = nullptr;  // device pointer; unused for kHostValue
  double host_value = 0.0;    // the value, for absent scalars and CPU tensors
  ScalarKind kind = ScalarKind::kHostValue;
};

// `fallback` when the tensor is absent. A CPU tensor is read here: that is host memory, no
// device sync (under graph capture its value at capture time is what replays).
inline ScalarArg make_scalar_arg(const std::optional<at::Tensor>& t, double fallback) {
  ScalarArg arg;
  arg.host_value = fallback;
  if (!t.has_value()) {
    return arg;
  }
  if (t->is_cpu()) {
    arg.host_value = t->item<double>();
    return arg;
  }
  arg.ptr = t->const_data_ptr();
  switch (t->scalar_type()) {
    case at::kFloat: arg.kind = ScalarKind::kFloat; break;
    case at::kDouble: arg.kind = ScalarKind::kDouble; break;
    case at::kHalf: arg.kind = ScalarKind::kHalf; break;
    case at::kBFloat16: arg.kind = ScalarKind::kBFloat16; break;
    case at::kBool: arg.kind = ScalarKind::kBool; break;
    default: TORCH_CHECK(false, "fastscale: unsupported scalar tensor dtype ", t->scalar_type());
  }
  return arg;
}

__device__ __forceinline__ double read_scalar(const ScalarArg& s) {
  switch (s.kind) {
    case ScalarKind::kFloat: return *static_cast<const float*>(s.ptr);
    case ScalarKind::kDouble: return *static_cast<const double*>(s.ptr);
    case ScalarKind::kHalf:
      return static_cast<float>(*static_cast<const c10::Half*>(s.ptr));
    case ScalarKind::kBFloat16:
      return static_cast<float>(*static_cast<const c10::BFloat16*>(s.ptr));
    case ScalarKind::kBool: return *static_cast<const bool*>(s.ptr) ? 1.0 : 0.0;
    default: return s.host_value;
  }
}

// ---------------------------------------------------------------------------------------------
// Launch metadata

// One launch's tensors. ptrs[d][slot] is list d's tensor in slot; chunk_begin is the launch-local
// prefix of chunk counts (chunk_begin[num_tensors] = the launch's chunks).
template <int Depth, int MaxTensors>
struct TensorListArgs {
  void* ptrs[Depth][MaxTensors];
  int64_t numel[MaxTensors];
  int32_t chunk_begin[MaxTensors + 1];
  int32_t num_tensors;
  int64_t tensor_base;  // index in the call of slot 0
  int64_t chunk_base;   // index in `partials` of the launch's first chunk
};

// One tensor of the call: its Depth pointers (one per list) and its element count.
template <int Depth>
struct TensorRow {
  void* ptrs[Depth];
  int64_t numel;
};

inline int64_t chunks_of(int64_t numel) {
  return std::max<int64_t>(1, (numel + kChunkElems - 1) / kChunkElems);
}

// ---------------------------------------------------------------------------------------------
// Kernels

// Sum of `value` over the block; the result is valid in thread 0. Fixed shuffle tree per warp,
// then the warps in index order: the same inputs always give the same bits.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t value, acc_t* warp_sums) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_sums[warp] = value;
  }
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kBlockThreads / 32; ++w) {
      total += warp_sums[w];
    }
  }
  __syncthreads();  // warp_sums is reused by the block's next chunk
  return total;
}

// Runs functor(ptrs, begin, n) -> this thread's share of the chunk's sum of squares, on every
// chunk of the launch, and writes each chunk's partial and each tensor's partial range.
template <int Depth, int MaxTensors, typename acc_t, typename Functor>
__global__ void __launch_bounds__(kBlockThreads)
    multi_tensor_chunks_kernel(TensorListArgs<Depth, MaxTensors> args, Functor functor,
                               acc_t* __restrict__ partials, int64_t* __restrict__ ranges) {
  __shared__ acc_t warp_sums[kBlockThreads / 32];
  const int64_t num_chunks = args.chunk_begin[args.num_tensors];
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    // The chunk's tensor: the last slot whose first chunk is <= c.
    int lo = 0;
    int hi = args.num_tensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (args.chunk_begin[mid] <= c) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const int slot = lo;
    const int64_t chunk_in_tensor = c - args.chunk_begin[slot];
    const int64_t begin = chunk_in_tensor * kChunkElems;
    const int64_t left = args.numel[slot] - begin;  // 0 for an empty tensor's chunk
    const int64_t n = left < kChunkElems ? left : kChunkElems;
    void* ptrs[Depth];
#pragma unroll
    for (int d = 0; d < Depth; ++d) {
      ptrs[d] = args.ptrs[d][slot];
    }
    const acc_t chunk_sum = block_sum<acc_t>(functor(ptrs, begin, n), warp_sums);
    if (threadIdx.x == 0) {
      partials[args.chunk_base + c] = chunk_sum;
      if (chunk_in_tensor == 0) {
        const int64_t t = args.tensor_base + slot;
        ranges[2 * t] = args.chunk_base + args.chunk_begin[slot];
        ranges[2 * t + 1] = args.chunk_begin[slot + 1] - args.chunk_begin[slot];
      }
    }
  }
}

// Second stage: norms[t] = sum of tensor t's partials, in index order.
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    sum_partials_kernel(const acc_t* __restrict__ partials, const int64_t* __restrict__ ranges,
                        float* __restrict__ norms, int64_t num_tensors) {
  __shared__ acc_t warp_sums[kBlockThreads / 32];
  for (int64_t t = blockIdx.x; t < num_tensors; t += gridDim.x) {
    const int64_t first = ranges[2 * t];
    const int64_t count = ranges[2 * t + 1];
    acc_t value = 0;
    for (int64_t i = threadIdx.x; i < count; i += kBlockThreads) {
      value += partials[first + i];
    }
    const acc_t total = block_sum<acc_t>(value, warp_sums);
    if (threadIdx.x == 0) {
      norms[t] = static_cast<float>(total);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host driver

// Blocks of `kernel` resident on the whole device at once: the persistent grid's size. Host
// queries only (no stream work, no sync, allowed under graph capture), cached per device.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, c10::DeviceIndex device) {
  constexpr int kMaxCached = 64;
  static std::atomic<int64_t> cached[kMaxCached] = {};
  if (device >= 0 && device < kMaxCached) {
    const int64_t known = cached[device].load(std::memory_order_relaxed);
    if (known > 0) {
      return known;
    }
  }
  int sms = 0;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlockThreads, 0));
  const int64_t blocks = static_cast<int64_t>(std::max(sms, 1)) * std::max(per_sm, 1);
  if (device >= 0 && device < kMaxCached) {
    cached[device].store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

// Applies `functor` to every row (as many launches as MaxTensors requires) on the current
// stream of `device` and returns the fp32 vector of each row's sum of squares.
template <int Depth, int MaxTensors, typename acc_t, typename Functor>
at::Tensor multi_tensor_apply_with_norms(const std::vector<TensorRow<Depth>>& rows,
                                         const Functor& functor, const at::Device& device) {
  using Args = TensorListArgs<Depth, MaxTensors>;
  // The classic kernel-parameter limit is 4 KiB; leave room for the functor and two pointers.
  static_assert(sizeof(Args) + sizeof(Functor) + 2 * sizeof(void*) <= 4096,
                "kernel arguments would exceed 4 KiB; lower MaxTensors");

  const int64_t num_tensors = static_cast<int64_t>(rows.size());
  at::Tensor norms = at::empty({num_tensors}, at::TensorOptions().dtype(at::kFloat).device(device));
  if (num_tensors == 0) {
    return norms;
  }
  int64_t total_chunks = 0;
  for (const auto& row : rows) {
    total_chunks += chunks_of(row.numel);
  }
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor partials = at::empty({total_chunks}, at::TensorOptions().dtype(acc_dtype).device(device));
  at::Tensor ranges = at::empty({2 * num_tensors}, at::TensorOptions().dtype(at::kLong).device(device));
  acc_t* partials_ptr = partials.mutable_data_ptr<acc_t>();
  int64_t* ranges_ptr = ranges.mutable_data_ptr<int64_t>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const auto chunks_kernel = multi_tensor_chunks_kernel<Depth, MaxTensors, acc_t, Functor>;
  const auto sum_kernel = sum_partials_kernel<acc_t>;
  const int64_t chunks_grid_cap = resident_blocks(chunks_kernel, device.index());
  const int64_t sum_grid_cap = resident_blocks(sum_kernel, device.index());

  Args args{};
  int64_t chunk_cursor = 0;  // partials index of the next tensor's first chunk
  auto launch = [&]() {
    const int64_t chunks = args.chunk_begin[args.num_tensors];
    const auto grid = static_cast<unsigned>(std::min(chunks, chunks_grid_cap));
    chunks_kernel<<<grid, kBlockThreads, 0, stream>>>(args, functor, partials_ptr, ranges_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto reset = [&](int64_t next_tensor) {
    args.num_tensors = 0;
    args.tensor_base = next_tensor;
    args.chunk_base = chunk_cursor;
    args.chunk_begin[0] = 0;
  };
  reset(0);
  constexpr int64_t kMaxLaunchChunks = std::numeric_limits<int32_t>::max();
  for (int64_t i = 0; i < num_tensors; ++i) {
    const int64_t chunks = chunks_of(rows[i].numel);
    TORCH_CHECK(chunks <= kMaxLaunchChunks, "fastscale: tensor ", i, " has ", rows[i].numel,
                " elements, more than one launch can index");
    if (args.num_tensors == MaxTensors ||
        args.chunk_begin[args.num_tensors] + chunks > kMaxLaunchChunks) {
      launch();
      reset(i);
    }
    const int slot = args.num_tensors;
    for (int d = 0; d < Depth; ++d) {
      args.ptrs[d][slot] = rows[i].ptrs[d];
    }
    args.numel[slot] = rows[i].numel;
    args.chunk_begin[slot + 1] = static_cast<int32_t>(args.chunk_begin[slot] + chunks);
    args.num_tensors = slot + 1;
    chunk_cursor += chunks;
  }
  launch();

  const auto grid = static_cast<unsigned>(std::min(num_tensors, sum_grid_cap));
  sum_kernel<<<grid, kBlockThreads, 0, stream>>>(
      partials_ptr, ranges_ptr, norms.mutable_data_ptr<float>(), num_tensors);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return norms;
}

// ---------------------------------------------------------------------------------------------
// Layout: the kernels walk each tensor as one flat array, so the tensors of a row must be
// dense, non-overlapping and laid out alike. Rows that are not get contiguous working copies;
// written copies are copied back after the launches (rare: e.g. a gradient whose memory format
// differs from its parameter's).

inline bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  if (!a.is_non_overlapping_and_dense() || !b.is_non_overlapping_and_dense()) {
    return false;
  }
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) {
      return false;
    }
  }
  return true;
}

struct CopyBack {
  at::Tensor original;
  at::Tensor work;
};

// The tensor to hand to the kernel for `t`: itself, or a contiguous copy (recorded in
// `copy_back` when the kernel writes it).
inline at::Tensor working_tensor(const at::Tensor& t, bool written, std::vector<CopyBack>& copy_back) {
  if (t.is_contiguous()) {
    return t;
  }
  at::Tensor work = t.contiguous();
  if (written) {
    copy_back.push_back({t, work});
  }
  return work;
}

inline void finish_copy_back(const std::vector<CopyBack>& copy_back) {
  for (const auto& c : copy_back) {
    c.original.copy_(c.work);
  }
}

}  // namespace fastscale::cuda
