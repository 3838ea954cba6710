// Launchers of the CUDA visible-scope metadata (visible.h; kernels in visible_kernel.cuh).
#include <stdexcept>
#include <string>

#include "check.h"
#include "visible.h"
#include "visible_kernel.cuh"

namespace dmattn {
namespace cuda {

namespace {

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_grid_rows(int64_t rows) {
  if (rows > 65535) throw std::invalid_argument("too many selection rows for the visible scope (at most 65535)");
}

}  // namespace

int visible_pos_bits(int64_t K) {
  int b = 1;
  while ((int64_t(1) << b) < K) ++b;
  return b;
}

int64_t visible_bucket(int64_t K) {
  int64_t bucket = 32;
  while (cdiv(K, bucket) > 512) bucket *= 2;
  return bucket;
}

void visible_rank_keys(const SelectParams& p, int64_t* keys, cudaStream_t stream) {
  const int64_t rows = p.B_s * p.H_s;
  if (rows == 0 || p.K == 0) return;
  check_grid_rows(rows);
  const int pos_bits = visible_pos_bits(p.K);
  const dim3 grid{unsigned(cdiv(p.K, visible_detail::kKeyThreads)), unsigned(rows), 1u};
  switch (p.bias_bits) {
    case 16:
      visible_detail::rank_keys_kernel<16><<<grid, visible_detail::kKeyThreads, 0, stream>>>(p, pos_bits, keys);
      break;
    case 32:
      visible_detail::rank_keys_kernel<32><<<grid, visible_detail::kKeyThreads, 0, stream>>>(p, pos_bits, keys);
      break;
    default:
      throw std::invalid_argument("the visible-scope rank keys take a 16- or 32-bit bias");
  }
  check_cuda(cudaGetLastError(), "rank_keys_kernel launch");
}

void visible_death(const DeathParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.K == 0) return;
  check_grid_rows(p.rows);
  if (p.W < 1) throw std::invalid_argument("window must be >= 1");
  if (p.bucket < 32 || (p.bucket & (p.bucket - 1)) != 0)
    throw std::invalid_argument("bucket must be a power of two >= 32, got " + std::to_string(p.bucket));
  const int64_t nc = cdiv(p.K, kVisibleRanks), nb = cdiv(p.K, p.bucket);
  if (nc > 0x7FFFFFFF) throw std::invalid_argument("K too large for the visible scope");
  visible_detail::table_rows_kernel<<<dim3(unsigned(nc), unsigned(p.rows)), 32, 0, stream>>>(p, nc, nb);
  check_cuda(cudaGetLastError(), "table_rows_kernel launch");
  visible_detail::table_scan_kernel<<<dim3(unsigned(cdiv(nb + 1, 32)), unsigned(p.rows)), dim3(32, 32), 0, stream>>>(
      p, nc, nb);
  check_cuda(cudaGetLastError(), "table_scan_kernel launch");
  int steps = 1;
  while ((int64_t(1) << steps) < nb) ++steps;  // halvings of [0, nb]
  visible_detail::death_kernel<<<dim3(unsigned(cdiv(nc, visible_detail::kDeathWarps)), unsigned(p.rows)),
                                 32 * visible_detail::kDeathWarps, 0, stream>>>(p, nc, nb, steps);
  check_cuda(cudaGetLastError(), "death_kernel launch");
}

void visible_lists(const ListsParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.K == 0 || p.n_blocks == 0) return;
  check_grid_rows(p.rows);
  if (p.n_blocks > 0x7FFFFFFF) throw std::invalid_argument("too many query blocks");
  const int64_t n_chunks = cdiv(p.K, kVisibleChunk);
  const dim3 chunks{unsigned(n_chunks), unsigned(p.rows), 1u};
  visible_detail::ever_counts_kernel<<<chunks, visible_detail::kListThreads, 0, stream>>>(p, n_chunks);
  check_cuda(cudaGetLastError(), "ever_counts_kernel launch");
  visible_detail::ever_compact_kernel<<<chunks, visible_detail::kListThreads, 0, stream>>>(p, n_chunks);
  check_cuda(cudaGetLastError(), "ever_compact_kernel launch");
  visible_detail::lists_kernel<<<dim3(unsigned(p.n_blocks), unsigned(p.rows)), visible_detail::kListThreads, 0,
                                 stream>>>(p);
  check_cuda(cudaGetLastError(), "lists_kernel launch");
}

}  // namespace cuda
}  // namespace dmattn
