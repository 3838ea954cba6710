// The order-preserving keys of a query-broadcast bias row (and its mask), read the same way by the
// global-scope select (select_kernel.cuh) and the visible-scope rank keys (visible_kernel.cuh).
#pragma once

#include <cstdint>
#include <type_traits>

#include "dmattn/selection.h"
#include "select.h"

namespace dmattn {
namespace cuda {
namespace select_detail {

namespace sel = ::dmattn::sel;

template <int kBits>
using KeyT = std::conditional_t<kBits == 64, unsigned long long, uint32_t>;

// The raw bits of one bias element of a kBits-wide dtype.
template <int kBits>
using RawT = std::conditional_t<kBits == 16, uint16_t, std::conditional_t<kBits == 32, uint32_t, unsigned long long>>;

// The order-preserving key of bias bits `raw` (sel::order_key*).
template <int kBits>
__device__ __forceinline__ KeyT<kBits> order_key(RawT<kBits> raw) {
  if constexpr (kBits == 16) {
    return sel::order_key16(raw);
  } else if constexpr (kBits == 32) {
    return sel::order_key32(raw);
  } else {
    return sel::order_key64(raw);
  }
}

// Order-preserving key of bias entry `off` (elements), 0 when the key is masked out.
template <int kBits>
__device__ __forceinline__ KeyT<kBits> load_key(const SelectParams& p, int64_t bias_row, int64_t mask_row,
                                                int64_t j) {
  // Both loads issued before either is used: one memory round trip, not two.
  const bool allowed = p.mask == nullptr || p.mask[mask_row + j * p.mask_stride[2]] != 0;
  const KeyT<kBits> key = order_key<kBits>(static_cast<const RawT<kBits>*>(p.bias)[bias_row + j * p.bias_stride[2]]);
  return allowed ? key : KeyT<kBits>(0);
}

// Element offsets of row `row` in bias and mask.
__device__ __forceinline__ void row_bases(const SelectParams& p, int64_t row, int64_t* bias_row,
                                          int64_t* mask_row) {
  const int64_t b = row / p.H_s, h = row % p.H_s;
  *bias_row = b * p.bias_stride[0] + (h * p.bias_heads / p.H_s) * p.bias_stride[1];
  *mask_row = p.mask ? b * p.mask_stride[0] + (h * p.mask_heads / p.H_s) * p.mask_stride[1] : 0;
}

}  // namespace select_detail
}  // namespace cuda
}  // namespace dmattn
