// Launch plan and launchers of the CUDA global-scope selection (select.h; kernels in
// select_kernel.cuh).
#include <stdexcept>
#include <string>

#include "check.h"
#include "launch.h"
#include "select.h"
#include "select_kernel.cuh"

namespace dmattn {
namespace cuda {

namespace {

// At most this many thread blocks per row: every block of a pass sums the row's chunk histograms
// of the previous pass (chunks x 256 int32 from L2), which should stay small next to its keys.
constexpr int64_t kMaxChunks = 64;
// Blocks per multiprocessor the plan aims at. The passes are latency-bound on L2-resident data
// (T32k: 8 rows of 32768 keys, 512 KiB of bf16), so the aim is every SM busy, a few blocks each to
// overlap their load latencies. Chosen without a GPU measurement: benchmarks/cuda_select.py
// sweeps the chunk size next to this choice.
constexpr int64_t kBlocksPerSm = 2;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

int64_t select_tile() { return select_detail::kTile; }

SelectPlan select_plan(int64_t rows, int64_t K, int bias_bits, int sm_count, int64_t chunk) {
  if (bias_bits != 16 && bias_bits != 32 && bias_bits != 64)
    throw std::invalid_argument("bias must be 16, 32 or 64 bits wide");
  const int64_t tile = select_detail::kTile;
  if (chunk != 0 && (chunk < 0 || chunk % tile != 0))
    throw std::invalid_argument("chunk must be 0 (automatic) or a positive multiple of " + std::to_string(tile) +
                                ", got " + std::to_string(chunk));
  const int64_t tiles = cdiv(K > 0 ? K : 1, tile);
  if (chunk == 0) {
    const int64_t want = cdiv(kBlocksPerSm * (sm_count > 0 ? sm_count : 1), rows > 0 ? rows : 1);
    const int64_t blocks = want < kMaxChunks ? want : kMaxChunks;
    chunk = cdiv(tiles, blocks) * tile;
  }
  int64_t chunks = cdiv(K > 0 ? K : 1, chunk);
  if (chunks > 65535) throw std::invalid_argument("chunk too small: more than 65535 chunks per row");
  return SelectPlan{chunk, chunks, select_detail::workspace_bytes(rows, chunks, bias_bits / 8)};
}

namespace {

template <int kBits>
void launch_select(const SelectParams& p, cudaStream_t stream) {
  using namespace select_detail;
  const int64_t rows = p.B_s * p.H_s, chunks = cdiv(p.K, p.chunk);
  const dim3 grid{unsigned(rows), unsigned(chunks), 1u};
  // The first pass waits for whatever came before it; the later kernels overlap their predecessor
  // (launch.h: they load their keys, inputs of this chain, before waiting for it).
  const bool overlap = pdl_available();
  for (int pass = 0; pass < kBits / 8; ++pass) {
    launch_kernel(select_hist_kernel<kBits>, grid, kThreads, stream, overlap && pass > 0, "select_hist_kernel launch", p,
                  chunks, pass);
  }
  launch_kernel(select_write_kernel<kBits>, grid, kThreads, stream, overlap, "select_write_kernel launch", p, chunks);
}

}  // namespace

void select_lists(const SelectParams& p, cudaStream_t stream) {
  if (p.B_s * p.H_s == 0 || p.W == 0) return;
  if (p.B_s * p.H_s > 0x7FFFFFFF) throw std::invalid_argument("too many selection rows (at most 2^31 - 1)");
  switch (p.bias_bits) {
    case 16: launch_select<16>(p, stream); break;
    case 32: launch_select<32>(p, stream); break;
    case 64: launch_select<64>(p, stream); break;
    default: throw std::invalid_argument("bias must be 16, 32 or 64 bits wide");
  }
}

void list_counts(const CountsParams& p, cudaStream_t stream) {
  if (p.rows * p.n_blocks == 0) return;
  const int64_t n = p.rows * (p.W > 0 ? p.W : 1);  // a thread per list entry (list_counts_kernel)
  const int threads = 256;
  const int64_t blocks = cdiv(n, threads) < 65535 ? cdiv(n, threads) : 65535;
  // Overlaps its predecessor's tail (launch.h); it waits for it before reading the lists.
  launch_kernel(select_detail::list_counts_kernel, dim3(unsigned(blocks)), dim3(threads), stream, pdl_available(),
                "list_counts_kernel launch", p);
}

}  // namespace cuda
}  // namespace dmattn
