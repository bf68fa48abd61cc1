// The vectorised per-chunk loops. Included once per ISA by kernels_<isa>.cpp, which defines
// FASTSCALE_ISA (the namespace) and, for AVX2, the target and CPU_CAPABILITY macros before
// any other include, so at::vec::Vectorized here is that ISA's specialisation.
//
// The math mirrors fastscale/reference.py operation by operation (same order, same compute
// type), so results differ from it only by rounding: the order of the norm reductions, and
// multiply-adds the AVX2 build may fuse (fmadd) where torch rounds twice.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/kernels.h"

namespace fastscale::cpu::FASTSCALE_ISA {
namespace {

using at::vec::Vectorized;

// Loads and stores one step of a storage type as compute (opmath) vectors: fp32 and fp64 are
// one vector each, fp16/bf16 one storage vector widened to two fp32 vectors. `n` < kStep is a
// tail; the masked loads fill the missing lanes with zeros, which add nothing to the norms.
template <typename scalar_t>
struct Lanes {
  using op_t = scalar_t;
  using V = Vectorized<scalar_t>;
  static constexpr int kParts = 1;
  static constexpr int64_t kStep = V::size();
  static void load(const scalar_t* p, int64_t n, V (&out)[kParts]) {
    out[0] = n == kStep ? V::loadu(p) : V::loadu(p, n);
  }
  static void store(scalar_t* p, int64_t n, const V (&in)[kParts]) {
    if (n == kStep) in[0].store(p); else in[0].store(p, n);
  }
};

template <typename scalar_t>
struct ReducedLanes {
  using op_t = float;
  using V = Vectorized<float>;
  using S = Vectorized<scalar_t>;
  static constexpr int kParts = 2;
  static constexpr int64_t kStep = S::size();
  static void load(const scalar_t* p, int64_t n, V (&out)[kParts]) {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(n == kStep ? S::loadu(p) : S::loadu(p, n));
    out[0] = lo;
    out[1] = hi;
  }
  static void store(scalar_t* p, int64_t n, const V (&in)[kParts]) {
    S s = at::vec::convert_from_float<scalar_t>(in[0], in[1]);
    if (n == kStep) s.store(p); else s.store(p, n);
  }
};
template <>
struct Lanes<c10::Half> : ReducedLanes<c10::Half> {};
template <>
struct Lanes<c10::BFloat16> : ReducedLanes<c10::BFloat16> {};

// Horizontal sum in a fixed lane order, in double.
template <typename op_t>
double lane_sum(const Vectorized<op_t>& v) {
  op_t lanes[Vectorized<op_t>::size()];
  v.store(lanes);
  double s = 0;
  for (int64_t i = 0; i < Vectorized<op_t>::size(); ++i) s += static_cast<double>(lanes[i]);
  return s;
}

// Norm only: the found_inf path, which writes nothing.
template <typename scalar_t>
double grad_norm_chunk(const SgdHyper& h, const SgdChunk& c) {
  using L = Lanes<scalar_t>;
  using V = typename L::V;
  using op_t = typename L::op_t;
  const auto* grad = static_cast<const scalar_t*>(c.grad);
  const V scale(static_cast<op_t>(h.grad_scale));
  V acc(op_t(0));
  for (int64_t i = 0; i < c.numel; i += L::kStep) {
    const int64_t n = std::min<int64_t>(L::kStep, c.numel - i);
    V g[L::kParts];
    L::load(grad + i, n, g);
    for (int k = 0; k < L::kParts; ++k) {
      if (h.has_grad_scale) g[k] = g[k] / scale;
      acc = at::vec::fmadd(g[k], g[k], acc);
    }
  }
  return lane_sum(acc);
}

// One pass: read g, p (and b); write p (and b); the norm of g/grad_scale rides along.
// kMomentum is a template parameter so the momentum-free loop touches no buffer at all.
template <typename scalar_t, bool kMomentum>
double sgd_chunk(const SgdHyper& h, const SgdChunk& c) {
  using L = Lanes<scalar_t>;
  using V = typename L::V;
  using op_t = typename L::op_t;
  auto* param = static_cast<scalar_t*>(c.param);
  const auto* grad = static_cast<const scalar_t*>(c.grad);
  auto* buf = static_cast<scalar_t*>(c.buf);
  const V scale(static_cast<op_t>(h.grad_scale));
  const V lr(static_cast<op_t>(h.lr));
  const V wd(static_cast<op_t>(h.weight_decay));
  const V mom(static_cast<op_t>(h.momentum));
  const V one_minus_damp(static_cast<op_t>(1.0 - h.dampening));
  const bool decay = h.weight_decay != 0;
  V acc(op_t(0));
  for (int64_t i = 0; i < c.numel; i += L::kStep) {
    const int64_t n = std::min<int64_t>(L::kStep, c.numel - i);
    V g[L::kParts], p[L::kParts], b[L::kParts];
    L::load(grad + i, n, g);
    L::load(param + i, n, p);
    if (kMomentum && !h.first_step) L::load(buf + i, n, b);
    for (int k = 0; k < L::kParts; ++k) {
      if (h.has_grad_scale) g[k] = g[k] / scale;
      acc = at::vec::fmadd(g[k], g[k], acc);
      if (h.maximize) g[k] = g[k].neg();
      if (decay) g[k] = g[k] + wd * p[k];
      if (kMomentum) {
        // torch.optim.SGD: the first buffer is g itself, undampened.
        b[k] = h.first_step ? g[k] : mom * b[k] + one_minus_damp * g[k];
        g[k] = h.nesterov ? g[k] + mom * b[k] : b[k];
      }
      p[k] = p[k] - lr * g[k];
    }
    if (kMomentum) L::store(buf + i, n, b);
    L::store(param + i, n, p);
  }
  return lane_sum(acc);
}

template <typename scalar_t>
void sgd_chunks_typed(const SgdHyper& h, const SgdChunk* chunks, int64_t n, double* partial) {
  for (int64_t i = 0; i < n; ++i) {
    const SgdChunk& c = chunks[i];
    if (!h.write) {
      partial[i] = grad_norm_chunk<scalar_t>(h, c);
    } else if (c.buf != nullptr) {
      partial[i] = sgd_chunk<scalar_t, true>(h, c);
    } else {
      partial[i] = sgd_chunk<scalar_t, false>(h, c);
    }
  }
}

// d = g - s formed in the compute type (as the reference's _foreach_sub of fp32 views);
// s <- g copied in the storage type, bit-exact.
template <typename scalar_t>
double accumulate_chunk(bool first, const AccumulateChunk& c) {
  using L = Lanes<scalar_t>;
  using V = typename L::V;
  using op_t = typename L::op_t;
  using S = Vectorized<scalar_t>;
  auto* snap = static_cast<scalar_t*>(c.snapshot);
  const auto* grad = static_cast<const scalar_t*>(c.grad);
  V acc(op_t(0));
  for (int64_t i = 0; i < c.numel; i += L::kStep) {
    const int64_t n = std::min<int64_t>(L::kStep, c.numel - i);
    V g[L::kParts], s[L::kParts];
    L::load(grad + i, n, g);
    if (!first) L::load(snap + i, n, s);
    for (int k = 0; k < L::kParts; ++k) {
      const V d = first ? g[k] : g[k] - s[k];
      acc = at::vec::fmadd(d, d, acc);
    }
    const S raw = n == L::kStep ? S::loadu(grad + i) : S::loadu(grad + i, n);
    if (n == L::kStep) raw.store(snap + i); else raw.store(snap + i, n);
  }
  return lane_sum(acc);
}

template <typename scalar_t>
void accumulate_chunks_typed(bool first, const AccumulateChunk* chunks, int64_t n,
                             double* partial) {
  for (int64_t i = 0; i < n; ++i) partial[i] = accumulate_chunk<scalar_t>(first, chunks[i]);
}

// |g|^2, g.t and |t|^2 of one step of a chunk into the accumulators (n < kStep: a tail);
// with kAdd, t <- t + g, rounded once into the storage type as torch's `t += g` does.
template <typename scalar_t, bool kCross, bool kAdd>
inline void arrival_step(const scalar_t* grad, scalar_t* acc, int64_t n,
                         typename Lanes<scalar_t>::V& sgg, typename Lanes<scalar_t>::V& sgt,
                         typename Lanes<scalar_t>::V& stt) {
  using L = Lanes<scalar_t>;
  typename L::V g[L::kParts], t[L::kParts];
  L::load(grad, n, g);
  if (kCross) L::load(acc, n, t);
  for (int k = 0; k < L::kParts; ++k) {
    sgg = at::vec::fmadd(g[k], g[k], sgg);
    if (kCross) {
      sgt = at::vec::fmadd(g[k], t[k], sgt);
      stt = at::vec::fmadd(t[k], t[k], stt);
      if (kAdd) t[k] = t[k] + g[k];
    }
  }
  if (kAdd) L::store(acc, n, t);
}

// One read of g (and of t; one write of t with kAdd): the three sums in the compute type, as
// the reference's fp32 dots. Four accumulators per sum, each its own variable: one chains every
// fmadd on the previous one's latency, and an array of them is kept on the stack (measured:
// half the speed of torch.dot on one core either way).
template <typename scalar_t, bool kCross, bool kAdd>
void arrival_chunk(const ArrivalChunk& c, ArrivalSums* out) {
  using L = Lanes<scalar_t>;
  using V = typename L::V;
  using op_t = typename L::op_t;
  constexpr int64_t kStep = L::kStep;
  const auto* g = static_cast<const scalar_t*>(c.grad);
  auto* t = static_cast<scalar_t*>(c.accumulated);
  V gg0(op_t(0)), gg1(op_t(0)), gg2(op_t(0)), gg3(op_t(0));
  V gt0(op_t(0)), gt1(op_t(0)), gt2(op_t(0)), gt3(op_t(0));
  V tt0(op_t(0)), tt1(op_t(0)), tt2(op_t(0)), tt3(op_t(0));
  int64_t i = 0;
  auto at = [t](int64_t i) { return kCross ? t + i : nullptr; };  // t is null unless kCross
  for (; i + 4 * kStep <= c.numel; i += 4 * kStep) {
    arrival_step<scalar_t, kCross, kAdd>(g + i, at(i), kStep, gg0, gt0, tt0);
    arrival_step<scalar_t, kCross, kAdd>(g + i + kStep, at(i + kStep), kStep, gg1, gt1, tt1);
    arrival_step<scalar_t, kCross, kAdd>(g + i + 2 * kStep, at(i + 2 * kStep), kStep, gg2, gt2, tt2);
    arrival_step<scalar_t, kCross, kAdd>(g + i + 3 * kStep, at(i + 3 * kStep), kStep, gg3, gt3, tt3);
  }
  for (; i < c.numel; i += kStep) {
    arrival_step<scalar_t, kCross, kAdd>(g + i, at(i), std::min<int64_t>(kStep, c.numel - i), gg0,
                                         gt0, tt0);
  }
  // in a fixed order: the same result for any thread count
  out->gg = lane_sum(gg0) + lane_sum(gg1) + lane_sum(gg2) + lane_sum(gg3);
  out->gt = kCross ? lane_sum(gt0) + lane_sum(gt1) + lane_sum(gt2) + lane_sum(gt3) : 0.0;
  out->tt = kCross ? lane_sum(tt0) + lane_sum(tt1) + lane_sum(tt2) + lane_sum(tt3) : 0.0;
}

template <typename scalar_t>
void arrival_chunks_typed(bool add, const ArrivalChunk* chunks, int64_t n, ArrivalSums* sums) {
  for (int64_t i = 0; i < n; ++i) {
    if (chunks[i].accumulated == nullptr) {
      arrival_chunk<scalar_t, false, false>(chunks[i], sums + i);
    } else if (add) {
      arrival_chunk<scalar_t, true, true>(chunks[i], sums + i);
    } else {
      arrival_chunk<scalar_t, true, false>(chunks[i], sums + i);
    }
  }
}

// Calls f(scalar_t{}) for the storage type of `dtype`: the one switch over the dtypes the
// loops are compiled for, shared by every op.
template <typename F>
void for_dtype(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::ScalarType::Float: return f(float{});
    case c10::ScalarType::Double: return f(double{});
    case c10::ScalarType::Half: return f(c10::Half{});
    case c10::ScalarType::BFloat16: return f(c10::BFloat16{});
    default: unsupported_dtype(dtype);
  }
}

void sgd_chunks(c10::ScalarType dtype, const SgdHyper& h, const SgdChunk* chunks, int64_t n,
                double* partial) {
  for_dtype(dtype, [&](auto tag) {
    sgd_chunks_typed<decltype(tag)>(h, chunks, n, partial);
  });
}

void accumulate_chunks(c10::ScalarType dtype, bool first, const AccumulateChunk* chunks, int64_t n,
                       double* partial) {
  for_dtype(dtype, [&](auto tag) {
    accumulate_chunks_typed<decltype(tag)>(first, chunks, n, partial);
  });
}

void arrival_chunks(c10::ScalarType dtype, bool add, const ArrivalChunk* chunks, int64_t n,
                    ArrivalSums* sums) {
  for_dtype(dtype, [&](auto tag) {
    arrival_chunks_typed<decltype(tag)>(add, chunks, n, sums);
  });
}

}  // namespace

Kernels make_kernels(const char* isa) {
  return Kernels{&sgd_chunks, &accumulate_chunks, &arrival_chunks, isa};
}

}  // namespace fastscale::cpu::FASTSCALE_ISA
