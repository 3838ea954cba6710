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

}  // namespace sel
}  // namespace dmattn
