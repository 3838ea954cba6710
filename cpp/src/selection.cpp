#include <algorithm>
#include <limits>
#include <stdexcept>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dmattn/plan.h"

namespace dmattn {
namespace {

SelectionPath choose_path(const AttnProblem& p) {
  if (p.window <= 0 || p.window >= p.K) return SelectionPath::dense;
  const bool query_broadcast = p.bias.size[2] == 1 && (!p.mask.present() || p.mask.size[2] == 1);
  if (!query_broadcast) return SelectionPath::per_row;
  return p.causal && !p.scope_global ? SelectionPath::threshold : SelectionPath::list;
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Head index of a broadcast tensor whose head dim has `heads` entries (1, Hkv or H).
int64_t head_of(int64_t h, int64_t heads, int64_t H) { return h * heads / H; }

int64_t causal_limit(const AttnProblem& p, int64_t last_query) {
  return p.causal ? std::min(p.K - 1, last_query + p.offset()) : p.K - 1;
}

// The best `heap.cap` keys among j in [0, count) with allowed(j), as ascending indices.
template <class Value, class Allowed>
int64_t sorted_top_w(int64_t count, Value value, Allowed allowed, sel::TopW heap, int32_t* out) {
  for (int64_t j = 0; j < count; ++j)
    if (allowed(j)) sel::topw_push(heap, sel::Key{value(j), j});
  for (int i = 0; i < heap.size; ++i) out[i] = int32_t(heap.heap[i].index);
  std::sort(out, out + heap.size);
  return heap.size;
}

}  // namespace

SelectionScratch::SelectionScratch(const Selection& s, int64_t max_rows)
    : heap_(size_t(std::max(s.window_, 1))),
      row_theta_(size_t(max_rows)),
      stamp_(s.path_ == SelectionPath::per_row ? size_t(s.p_.K) : 0, 0),
      row_bias_(size_t(s.p_.K)),
      row_allowed_(size_t(s.p_.K)) {}

SelectionScratch::~SelectionScratch() = default;

ScratchSet::ScratchSet(const Selection& selection, int count, int64_t max_rows) {
  items_.reserve(size_t(count));
  try {
    for (int i = 0; i < count; ++i) items_.push_back(new SelectionScratch(selection, max_rows));
  } catch (...) {
    for (SelectionScratch* s : items_) delete s;
    throw;
  }
}

ScratchSet::~ScratchSet() {
  for (SelectionScratch* s : items_) delete s;
}

SelectionScratch& ScratchSet::operator[](int i) { return *items_[size_t(i)]; }

Selection::Selection(const AttnProblem& problem, int num_threads)
    : p_(problem), path_(choose_path(problem)) {
  if (path_ != SelectionPath::dense) {
    if (!p_.bias.present()) throw std::invalid_argument("window requires a bias");
    window_ = int(p_.window);
  }
  const int64_t heads = p_.B * p_.H;
  row_bias_cached_ = p_.bias.present() && p_.bias.size[2] == 1;
  row_allowed_cached_ = p_.mask.present() && p_.mask.size[2] == 1;
  if (row_bias_cached_) bias_rows_.resize(size_t(heads * p_.K));
  if (row_allowed_cached_) allowed_rows_.resize(size_t(heads * p_.K));
  if (path_ == SelectionPath::list) {
    lists_.resize(size_t(heads * window_));
    list_len_.resize(size_t(heads));
  }
  if (path_ == SelectionPath::threshold) theta_.resize(size_t(heads * p_.Q));
  // Allocated up front: an exception cannot leave an OpenMP region.
  const size_t heap_size = size_t(std::max(window_, 1));
  std::vector<sel::Key> heaps(heap_size * size_t(num_threads));
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
  for (int64_t bh = 0; bh < heads; ++bh)
    build_head(bh / p_.H, bh % p_.H, &heaps[heap_size * size_t(thread_id())]);
}

Selection::~Selection() = default;

double Selection::bias_at(int64_t b, int64_t h, int64_t i, int64_t j) const {
  if (row_bias_cached_) return bias_rows_[size_t((b * p_.H + h) * p_.K + j)];
  if (!p_.bias.present()) return 0.0;
  const View& v = p_.bias;
  return load_double(v.data, v.dtype, v.offset(b, head_of(h, v.size[1], p_.H), i, j));
}

bool Selection::allowed_at(int64_t b, int64_t h, int64_t i, int64_t j) const {
  if (row_allowed_cached_) return allowed_rows_[size_t((b * p_.H + h) * p_.K + j)] != 0;
  if (!p_.mask.present()) return true;
  const View& m = p_.mask;
  return static_cast<const uint8_t*>(m.data)[m.offset(b, head_of(h, m.size[1], p_.H), i, j)] != 0;
}

void Selection::build_head(int64_t b, int64_t h, sel::Key* heap_storage) {
  const int64_t bh = b * p_.H + h, K = p_.K;
  if (row_bias_cached_) {
    const View& v = p_.bias;
    const int64_t hb = head_of(h, v.size[1], p_.H);
    for (int64_t j = 0; j < K; ++j)
      bias_rows_[size_t(bh * K + j)] = load_double(v.data, v.dtype, v.offset(b, hb, 0, j));
  }
  if (row_allowed_cached_) {
    const View& m = p_.mask;
    const uint8_t* data = static_cast<const uint8_t*>(m.data);
    const int64_t hm = head_of(h, m.size[1], p_.H);
    for (int64_t j = 0; j < K; ++j) allowed_rows_[size_t(bh * K + j)] = data[m.offset(b, hm, 0, j)];
  }
  const double* row = row_bias_cached_ ? &bias_rows_[size_t(bh * K)] : nullptr;
  auto allowed = [&](int64_t j) { return allowed_at(b, h, 0, j); };
  sel::TopW heap = sel::topw_make(heap_storage, window_);
  if (path_ == SelectionPath::list) {
    list_len_[size_t(bh)] = int32_t(sorted_top_w(
        K, [&](int64_t j) { return row[j]; }, allowed, heap, &lists_[size_t(bh * window_)]));
  } else if (path_ == SelectionPath::threshold) {
    // Query i's candidates are the allowed keys j <= i + off, a prefix that only grows with i, so
    // one pass over the keys yields every query's threshold.
    int64_t next = 0;
    for (int64_t i = 0; i < p_.Q; ++i) {
      for (const int64_t limit = causal_limit(p_, i); next <= limit; ++next)
        if (allowed(next)) sel::topw_push(heap, sel::Key{row[next], next});
      theta_[size_t(bh * p_.Q + i)] = sel::topw_threshold(heap);
    }
  }
}

int64_t Selection::row_top_w(int64_t b, int64_t h, int64_t i, int64_t r,
                             SelectionScratch& s) const {
  const int64_t last = p_.scope_global ? p_.K - 1 : causal_limit(p_, i);
  sel::TopW heap = sel::topw_make(s.heap_.data(), window_);
  for (int64_t j = 0; j <= last; ++j) {
    s.row_allowed_[size_t(j)] = allowed_at(b, h, i, j);
    s.row_bias_[size_t(j)] = bias_at(b, h, i, j);
    if (s.row_allowed_[size_t(j)]) sel::topw_push(heap, sel::Key{s.row_bias_[size_t(j)], j});
  }
  s.row_theta_[size_t(r)] = sel::topw_threshold(heap);
  return last;
}

int64_t Selection::block_keys(int64_t b, int64_t h, int64_t m0, int64_t rows, int32_t* keys,
                              SelectionScratch& s) const {
  const int64_t bh = b * p_.H + h, last = causal_limit(p_, m0 + rows - 1);
  int64_t n = 0;
  switch (path_) {
    case SelectionPath::dense:
      for (int64_t j = 0; j <= last; ++j)
        if (!row_allowed_cached_ || allowed_rows_[size_t(bh * p_.K + j)]) keys[n++] = int32_t(j);
      return n;
    case SelectionPath::list: {
      const int32_t* list = &lists_[size_t(bh * window_)];
      for (int64_t len = list_len_[size_t(bh)]; n < len && list[n] <= last; ++n) keys[n] = list[n];
      return n;
    }
    case SelectionPath::threshold: {
      // Thresholds never decrease with the query, so the first row's is the loosest: at most
      // window + rows - 1 keys pass it. The scan costs O(K) compares per block, little next to
      // the block's (window + rows) x rows x D attention work.
      const sel::Key theta = theta_[size_t(bh * p_.Q + m0)];
      const double* row = &bias_rows_[size_t(bh * p_.K)];
      for (int64_t j = 0; j <= last; ++j)
        if (allowed_at(b, h, 0, j) && sel::passes(theta, sel::Key{row[j], j})) keys[n++] = int32_t(j);
      return n;
    }
    case SelectionPath::per_row:
      return per_row_block_keys(b, h, m0, rows, keys, s);
  }
  return 0;
}

// Union of the rows' selections, marked in a key-indexed stamp array: O(K) memory, no Q x K.
int64_t Selection::per_row_block_keys(int64_t b, int64_t h, int64_t m0, int64_t rows,
                                      int32_t* keys, SelectionScratch& s) const {
  if (++s.epoch_ == std::numeric_limits<int32_t>::max()) {
    std::fill(s.stamp_.begin(), s.stamp_.end(), 0);
    s.epoch_ = 1;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = m0 + r, scanned = row_top_w(b, h, i, r, s);
    const sel::Key theta = s.row_theta_[size_t(r)];
    for (int64_t j = 0; j <= std::min(scanned, causal_limit(p_, i)); ++j)
      if (s.row_allowed_[size_t(j)] && sel::passes(theta, sel::Key{s.row_bias_[size_t(j)], j}))
        s.stamp_[size_t(j)] = s.epoch_;
  }
  int64_t n = 0;
  for (int64_t j = 0; j < p_.K; ++j)
    if (s.stamp_[size_t(j)] == s.epoch_) keys[n++] = int32_t(j);
  return n;
}

// Calls emit(r, c, visible, bias) for every element of the tile. Loops are specialised per path
// because this runs once per attention score.
template <class Emit>
void Selection::for_each_element(int64_t b, int64_t h, int64_t m0, int64_t rows,
                                 const int32_t* keys, int64_t n, const SelectionScratch& s,
                                 Emit emit) const {
  const int64_t bh = b * p_.H + h, off = p_.offset();
  const bool causal = p_.causal;
  const double* row = row_bias_cached_ ? &bias_rows_[size_t(bh * p_.K)] : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = m0 + r;
    const int64_t limit = causal ? i + off : p_.K;
    switch (path_) {
      case SelectionPath::list:
        for (int64_t c = 0; c < n; ++c) emit(r, c, keys[c] <= limit, row[keys[c]]);
        break;
      case SelectionPath::threshold: {
        const sel::Key theta = theta_[size_t(bh * p_.Q + i)];
        for (int64_t c = 0; c < n; ++c) {
          const int64_t j = keys[c];
          emit(r, c, j <= limit && sel::passes(theta, sel::Key{row[j], j}), row[j]);
        }
        break;
      }
      case SelectionPath::dense:
        for (int64_t c = 0; c < n; ++c) {
          const int64_t j = keys[c];
          const bool visible = j <= limit && allowed_at(b, h, i, j);
          emit(r, c, visible, visible ? bias_at(b, h, i, j) : 0.0);
        }
        break;
      case SelectionPath::per_row: {
        const sel::Key theta = s.row_theta_[size_t(r)];
        for (int64_t c = 0; c < n; ++c) {
          const int64_t j = keys[c];
          const double value = bias_at(b, h, i, j);
          const bool visible =
              j <= limit && allowed_at(b, h, i, j) && sel::passes(theta, sel::Key{value, j});
          emit(r, c, visible, value);
        }
        break;
      }
    }
  }
}

void Selection::tile(int64_t b, int64_t h, int64_t m0, int64_t rows, const int32_t* keys,
                     int64_t n, const SelectionScratch& s, float* add, int64_t ld) const {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for_each_element(b, h, m0, rows, keys, n, s, [&](int64_t r, int64_t c, bool vis, double bias) {
    add[r * ld + c] = vis ? float(bias) : neg_inf;
  });
}

void Selection::tile(int64_t b, int64_t h, int64_t m0, int64_t rows, const int32_t* keys,
                     int64_t n, const SelectionScratch& s, double* add, int64_t ld) const {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  for_each_element(b, h, m0, rows, keys, n, s, [&](int64_t r, int64_t c, bool vis, double bias) {
    add[r * ld + c] = vis ? bias : neg_inf;
  });
}

void Selection::tile_visible(int64_t b, int64_t h, int64_t m0, int64_t rows, const int32_t* keys,
                             int64_t n, const SelectionScratch& s, uint8_t* vis,
                             int64_t ld) const {
  for_each_element(b, h, m0, rows, keys, n, s, [&](int64_t r, int64_t c, bool visible, double) {
    vis[r * ld + c] = visible;
  });
}

void write_visible_mask(const AttnProblem& p, const View& out, int num_threads) {
  constexpr int64_t kRows = 64;
  const Selection selection(p, num_threads);
  const int64_t blocks = (p.Q + kRows - 1) / kRows;
  uint8_t* dst = static_cast<uint8_t*>(out.data);
  ScratchSet scratch(selection, num_threads, kRows);
  std::vector<int32_t> keys(size_t(p.K * num_threads));
  std::vector<uint8_t> visible(size_t(kRows * p.K * num_threads));
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
  for (int64_t task = 0; task < p.B * p.H * blocks; ++task) {
    const int tid = thread_id();
    int32_t* block_keys = &keys[size_t(p.K * tid)];
    uint8_t* vis = &visible[size_t(kRows * p.K * tid)];
    const int64_t b = task / (p.H * blocks), h = task / blocks % p.H;
    const int64_t m0 = task % blocks * kRows, rows = std::min(kRows, p.Q - m0);
    const int64_t n = selection.block_keys(b, h, m0, rows, block_keys, scratch[tid]);
    selection.tile_visible(b, h, m0, rows, block_keys, n, scratch[tid], vis, n);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < p.K; ++j) dst[out.offset(b, h, m0 + r, j)] = 0;
      for (int64_t c = 0; c < n; ++c) dst[out.offset(b, h, m0 + r, block_keys[c])] = vis[r * n + c];
    }
  }
}

void write_topk_indices(const View& bias, const View& mask, const View& out, int64_t window,
                        int num_threads) {
  const int64_t K = bias.size[3], width = std::min(window, K);
  const int64_t Bs = out.size[0], Hs = out.size[1], Qs = out.size[2];
  int64_t* dst = static_cast<int64_t*>(out.data);
  std::vector<sel::Key> heaps(size_t(width * num_threads));
  std::vector<int32_t> picked(size_t(width * num_threads));
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 16)
  for (int64_t row = 0; row < Bs * Hs * Qs; ++row) {
    const int tid = thread_id();
    const int64_t b = row / (Hs * Qs), h = row / Qs % Hs, q = row % Qs;
    const int64_t hb = head_of(h, bias.size[1], Hs);
    const int64_t hm = mask.present() ? head_of(h, mask.size[1], Hs) : 0;
    auto value = [&](int64_t j) {
      return load_double(bias.data, bias.dtype, bias.offset(b, hb, q, j));
    };
    auto allowed = [&](int64_t j) {
      return !mask.present() ||
             static_cast<const uint8_t*>(mask.data)[mask.offset(b, hm, q, j)] != 0;
    };
    int32_t* chosen = &picked[size_t(width * tid)];
    const sel::TopW heap = sel::topw_make(&heaps[size_t(width * tid)], int(width));
    const int64_t n = sorted_top_w(K, value, allowed, heap, chosen);
    for (int64_t c = 0; c < width; ++c) dst[out.offset(b, h, q, c)] = c < n ? chosen[c] : -1;
  }
}

}  // namespace dmattn
