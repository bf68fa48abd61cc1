// Shared by the per-example ops (linear_example_sq_cpu.cpp, conv_example_sq_cpu.cpp), which form
// one example's weight gradient at a time: the examples split over the threads, a matmul on raw
// buffers, and the pass that adds the example into its block's sum and takes its squared norm.
#pragma once

#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include "cpu/chunked.h"

namespace fastscale::cpu {

// Row-major, contiguous: c [m, n] = a' [m, k] b' [k, n], where a' is a stored [m, k] (or its
// transpose stored [k, m] when a_t) and b' is b stored [k, n] (or [n, k] when b_t). Through
// at::mm on views of the buffers: libtorch does not export its BLAS wrapper, and at::mm on
// these strides calls BLAS without copies.
template <typename T>
void matmul(const T* a, bool a_t, const T* b, bool b_t, int64_t m, int64_t n, int64_t k, T* c) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](const T* p, bool t, int64_t rows, int64_t cols) {
    at::Tensor stored = at::from_blob(const_cast<T*>(p), t ? at::IntArrayRef{cols, rows} : at::IntArrayRef{rows, cols},
                                      options);
    return t ? stored.t() : stored;
  };
  at::Tensor out = at::from_blob(c, {m, n}, options);
  at::mm_out(out, view(a, a_t, m, k), view(b, b_t, k, n));
}

// run_block(begin, end, sum) for contiguous blocks of examples, one per thread (threads are not
// worth it inside one example's small matmul: measured on the bench CNN, 2 threads took a layer
// from 40 to 28 ms against plain backward's 33 to 17). Each block sums its examples' gradients
// into its own `sum`, the first block's being weight_grad; the others are added into it in block
// order. A block costs a weight-sized scratch for its examples and, past the first, a weight-
// sized sum: (2 blocks - 1) of them in all, allowed up to `held` elements (what the call holds
// anyway, its input and output gradient), so a layer with a large weight and a short input runs
// as one block. Each example is computed whole by one thread, so its norm does not depend on the
// number of threads; the weight gradient's rounding does, as torch's matmul's does.
template <typename F>
void over_example_blocks(int64_t batch, const at::Tensor& weight_grad, int64_t held, const F& run_block) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t affordable = (held / std::max<int64_t>(weight_grad.numel(), 1) + 1) / 2;
  const int64_t blocks = std::max<int64_t>(1, std::min({batch, threads, affordable}));
  std::vector<at::Tensor> sums{weight_grad};
  for (int64_t k = 1; k < blocks; ++k) sums.push_back(at::empty_like(weight_grad));
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) run_block(batch * k / blocks, batch * (k + 1) / blocks, sums[k]);
  });
  for (int64_t k = 1; k < blocks; ++k) weight_grad.add_(sums[k]);
}

// One example's weight gradient `example` taken into the running sum `weight_grad` (whose first
// example was computed into it directly: `first`, nothing to add) in one pass that also gives
// the example's squared norm, written to sq[b] (sq: float32 or float64, like the gradients).
inline void take_example(const at::Tensor& weight_grad, const at::Tensor& example, bool first,
                         const at::Tensor& sq, int64_t b) {
  const at::ScalarType dtype = weight_grad.scalar_type();
  const int64_t numel = weight_grad.numel();
  const ArrivalSums s = first ? arrival_sums(dtype, weight_grad.const_data_ptr(), nullptr, numel, false)
                              : arrival_sums(dtype, example.const_data_ptr(), weight_grad.data_ptr(), numel, true);
  if (dtype == at::kDouble) {
    sq.data_ptr<double>()[b] = s.gg;
  } else {
    sq.data_ptr<float>()[b] = static_cast<float>(s.gg);
  }
}

// One example's bias gradient, its output gradient summed over positions, taken while that is in
// cache after the example's matmul: out[r] = sum of row r of a contiguous [rows, n] array
// (a conv's [C_out, positions]) ...
template <typename T>
void row_sums(const T* x, int64_t rows, int64_t n, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * n;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; ++k) s += row[k];
    out[r] = s;
  }
}


// ... or out[c] = sum of column c of a contiguous [rows, n] array (a Linear's [tokens, d_out]).
template <typename T>
void column_sums(const T* x, int64_t rows, int64_t n, T* out) {
  for (int64_t c = 0; c < n; ++c) out[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * n;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) out[c] += row[c];
  }
}

// (sum_k x[k] d[k], sum_k d[k]) of one row of n, in T, in a fixed order for a given n.
template <typename T>
void dot_and_sum(const T* x, const T* d, int64_t n, T* dot, T* sum) {
  T s_xd = 0, s_d = 0;
#pragma omp simd reduction(+ : s_xd, s_d)
  for (int64_t k = 0; k < n; ++k) {
    s_xd += x[k] * d[k];
    s_d += d[k];
  }
  *dot = s_xd;
  *sum = s_d;
}

// at::parallel_for's grain for tasks of `elements` each: about 32K elements a task.
inline int64_t tasks_per_grain(int64_t elements) { return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(elements, 1)); }

}  // namespace fastscale::cpu
