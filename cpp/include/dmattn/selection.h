// Top-w key selection primitives shared by the CPU core and the CUDA kernels.
//
// Keys are ordered by bias value descending, then key index ascending (ties go to the earlier
// key). A query keeps the best `w` of its candidates; with a running min-heap that holds the best
// `w` seen so far, the heap root is the w-th best key, i.e. the selection threshold.
//
// Everything here works on caller-provided storage so it runs unchanged in a CUDA kernel. The
// functions are `static` on purpose: this header is compiled into several translation units built
// with different instruction-set flags and linked into one binary; an external inline copy could
// be shared between them and run AVX-512 code on a CPU without it.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define DMATTN_HD __host__ __device__
#else
#define DMATTN_HD
#endif

namespace dmattn {
namespace sel {

// Bias values of every floating dtype convert to double exactly, so comparing doubles compares the
// stored values.
struct Key {
  double value;
  int64_t index;
};

// True when `a` ranks strictly before `b`.
static DMATTN_HD inline bool better(Key a, Key b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// A threshold every key passes: used for rows with at most `w` candidates.
static DMATTN_HD inline Key pass_all() { return Key{-HUGE_VAL, INT64_MAX}; }

// Whether key `k` is selected by a row whose threshold (w-th best candidate) is `theta`.
static DMATTN_HD inline bool passes(Key theta, Key k) { return !better(theta, k); }

// Best `cap` keys pushed so far; heap[0] is the worst of them (a min-heap under better()).
struct TopW {
  Key* heap;
  int size;
  int cap;
};

static DMATTN_HD inline TopW topw_make(Key* storage, int cap) { return TopW{storage, 0, cap}; }

static DMATTN_HD inline void topw_sift_down(TopW& t, int i) {
  const Key moving = t.heap[i];
  for (;;) {
    int child = 2 * i + 1;
    if (child >= t.size) break;
    if (child + 1 < t.size && better(t.heap[child], t.heap[child + 1])) ++child;
    if (!better(moving, t.heap[child])) break;
    t.heap[i] = t.heap[child];
    i = child;
  }
  t.heap[i] = moving;
}

static DMATTN_HD inline void topw_sift_up(TopW& t, int i) {
  const Key moving = t.heap[i];
  while (i > 0) {
    const int parent = (i - 1) / 2;
    if (!better(t.heap[parent], moving)) break;
    t.heap[i] = t.heap[parent];
    i = parent;
  }
  t.heap[i] = moving;
}

static DMATTN_HD inline void topw_push(TopW& t, Key k) {
  if (t.size < t.cap) {
    t.heap[t.size] = k;
    topw_sift_up(t, t.size++);
  } else if (better(k, t.heap[0])) {
    t.heap[0] = k;
    topw_sift_down(t, 0);
  }
}

// The row's threshold: the w-th best candidate, or pass_all() while there are at most w.
static DMATTN_HD inline Key topw_threshold(const TopW& t) {
  return t.size < t.cap ? pass_all() : t.heap[0];
}

// ---------------------------------------------------------------- radix select (GPU)
// The CUDA select (kernels/cuda/select_kernel.cuh) ranks keys by integers instead of doubles: each
// bias value's bits become an unsigned key whose integer order is the values' order, so equal
// values get equal keys and better(Key{a, i}, Key{b, j}) == key_better(order_key(a), i,
// order_key(b), j) for every non-NaN a, b. The row's threshold is the w-th best key; a key is kept
// when it ranks at or above it. Key 0 is below every real value (-inf included) and marks keys that
// are not candidates (masked out); it is only reached by a negative NaN with every payload bit set.

// Order-preserving keys of IEEE bits: -0.0 folded onto +0.0 (they compare equal), then the sign
// bit set for non-negative values and every bit flipped for negative ones.
static DMATTN_HD inline uint32_t order_key16(uint16_t bits) {
  const uint32_t b = bits == 0x8000u ? 0u : bits;
  return (b & 0x8000u) ? (~b & 0xFFFFu) : (b | 0x8000u);
}

static DMATTN_HD inline uint32_t order_key32(uint32_t bits) {
  const uint32_t b = bits == 0x80000000u ? 0u : bits;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

static DMATTN_HD inline uint64_t order_key64(uint64_t bits) {
  const uint64_t sign = uint64_t(1) << 63;
  const uint64_t b = bits == sign ? 0u : bits;
  return (b & sign) ? ~b : (b | sign);
}

// better() on keys: larger key first, then the earlier index.
static DMATTN_HD inline bool key_better(uint64_t ka, int64_t ia, uint64_t kb, int64_t ib) {
  return ka > kb || (ka == kb && ia < ib);
}

// One radix step: the digit bucket whose keys hold the rank-th best key (rank >= 1) of the keys
// still in play. `at_or_above` counts the keys in this bucket and every higher one, `count` those in
// this bucket; exactly one bucket of a histogram whose total is >= rank answers true.
static DMATTN_HD inline bool bucket_holds_rank(int64_t at_or_above, int64_t count, int64_t rank) {
  return at_or_above >= rank && at_or_above - count < rank;
}

// How many keys equal to the threshold `thr` are kept, given `above` keys strictly better in value:
// the earliest w - above of them (ties go to the earlier key). thr == 0 means the row has fewer than
// w candidates: every candidate is above it and no key equal to it (not a candidate) is kept.
static DMATTN_HD inline int64_t threshold_takes(uint64_t thr, int64_t w, int64_t above) {
  return thr == 0 ? 0 : w - above;
}

// Whether a key is kept: above the threshold, or equal to it with fewer than `needed` equal keys
// before it in index order (`eq_before`).
static DMATTN_HD inline bool radix_keeps(uint64_t key, uint64_t thr, int64_t eq_before, int64_t needed) {
  return key > thr || (key == thr && eq_before < needed);
}

}  // namespace sel
}  // namespace dmattn
