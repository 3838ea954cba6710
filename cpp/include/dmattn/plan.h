// Which keys each query sees: the selection metadata of one attention call and the per-tile
// visibility test that the CPU kernels, visible_mask and topk_indices all share.
//
// Only non-inline functions and plain data cross this header, so the per-ISA kernel translation
// units instantiate no library templates of their own (see selection.h for why that matters).
#pragma once

#include <stdint.h>

#include <vector>

#include "dmattn/params.h"
#include "dmattn/selection.h"

namespace dmattn {

// dense:     no selection (no window, or window >= K): keys up to the causal limit, mask per element.
// list:      query-broadcast bias and mask, global scope or non-causal: one sorted list of selected
//            keys per (batch, head); causality keeps a prefix of it.
// threshold: query-broadcast bias and mask, visible scope, causal: one threshold per query.
// per_row:   per-query bias or mask with a window: the top-w of each row, one row at a time.
enum class SelectionPath { dense, list, threshold, per_row };

class Selection;

// Working memory of one thread for Selection::block_keys / Selection::tile.
class SelectionScratch {
 public:
  SelectionScratch(const Selection& selection, int64_t max_rows);
  ~SelectionScratch();
  SelectionScratch(const SelectionScratch&) = delete;
  SelectionScratch& operator=(const SelectionScratch&) = delete;

 private:
  friend class Selection;
  std::vector<sel::Key> heap_;
  std::vector<sel::Key> row_theta_;  // per_row: threshold of each row of the current block
  std::vector<int32_t> stamp_;       // per_row: union of the rows' selections, by epoch
  int32_t epoch_ = 0;
  std::vector<double> row_bias_;
  std::vector<uint8_t> row_allowed_;
};

// One SelectionScratch per thread, created before a parallel region.
class ScratchSet {
 public:
  ScratchSet(const Selection& selection, int count, int64_t max_rows);
  ~ScratchSet();
  ScratchSet(const ScratchSet&) = delete;
  ScratchSet& operator=(const ScratchSet&) = delete;
  SelectionScratch& operator[](int i);

 private:
  std::vector<SelectionScratch*> items_;
};

class Selection {
 public:
  // Precomputes the per-(batch, head) metadata: O(B*H*(Q+K)) memory.
  Selection(const AttnProblem& problem, int num_threads);
  ~Selection();
  Selection(const Selection&) = delete;
  Selection& operator=(const Selection&) = delete;

  SelectionPath path() const { return path_; }
  const AttnProblem& problem() const { return p_; }

  // Writes into `keys` (capacity K), ascending, every key that some query row in [m0, m0+rows)
  // of (b, h) sees, plus possibly a few it does not; returns the count.
  int64_t block_keys(int64_t b, int64_t h, int64_t m0, int64_t rows, int32_t* keys,
                     SelectionScratch& scratch) const;

  // For keys[0..n) of the block of the latest block_keys call on `scratch`:
  // add[r*ld + c] = bias(m0+r, keys[c]) (0 without bias) if that key is visible to that query,
  // -inf otherwise, for r < rows and c < n.
  void tile(int64_t b, int64_t h, int64_t m0, int64_t rows, const int32_t* keys, int64_t n,
            const SelectionScratch& scratch, float* add, int64_t ld) const;
  void tile(int64_t b, int64_t h, int64_t m0, int64_t rows, const int32_t* keys, int64_t n,
            const SelectionScratch& scratch, double* add, int64_t ld) const;
  // Same, writing 1 where visible and 0 elsewhere.
  void tile_visible(int64_t b, int64_t h, int64_t m0, int64_t rows, const int32_t* keys, int64_t n,
                    const SelectionScratch& scratch, uint8_t* vis, int64_t ld) const;

 private:
  friend class SelectionScratch;
  template <class Emit>
  void for_each_element(int64_t b, int64_t h, int64_t m0, int64_t rows, const int32_t* keys,
                        int64_t n, const SelectionScratch& scratch, Emit emit) const;
  void build_head(int64_t b, int64_t h, sel::Key* heap_storage);
  double bias_at(int64_t b, int64_t h, int64_t i, int64_t j) const;
  bool allowed_at(int64_t b, int64_t h, int64_t i, int64_t j) const;
  int64_t per_row_block_keys(int64_t b, int64_t h, int64_t m0, int64_t rows, int32_t* keys,
                             SelectionScratch& scratch) const;
  int64_t row_top_w(int64_t b, int64_t h, int64_t i, int64_t r, SelectionScratch& scratch) const;

  AttnProblem p_;
  SelectionPath path_;
  int window_ = 0;
  bool row_bias_cached_ = false;     // query-broadcast bias: one row of doubles per (b, h)
  bool row_allowed_cached_ = false;  // query-broadcast mask: one row of bytes per (b, h)
  std::vector<double> bias_rows_;
  std::vector<uint8_t> allowed_rows_;
  std::vector<int32_t> lists_;  // list path: up to `window` sorted keys per (b, h)
  std::vector<int32_t> list_len_;
  std::vector<sel::Key> theta_;  // threshold path: one threshold per (b, h, query)
};

// The dense bool `visible` mask (B, H, Q, K) of the problem, from the same code the kernels use.
void write_visible_mask(const AttnProblem& problem, const View& out, int num_threads);

// Global-scope selection per broadcast row of bias/mask: out (Bs, Hs, Qs, min(window, K)) int64,
// ascending key indices padded with -1.
void write_topk_indices(const View& bias, const View& mask, const View& out, int64_t window,
                        int num_threads);

}  // namespace dmattn
