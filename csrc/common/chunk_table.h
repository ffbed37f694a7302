// Host-side plan of CUDA multi-tensor launches: which block works on which
// chunk of which tensor. Plain C++ so it is unit-tested on machines without a
// GPU (tests/test_chunk_table.py through the binding).
#pragma once
#include <cstdint>
#include <vector>

namespace fusedopt {

struct BlockEntry {
  int32_t row;    // index into the launch's rows
  int32_t chunk;  // chunk index within that tensor
};

struct LaunchPlan {
  std::vector<int64_t> rows;        // global tensor indices in this launch
  std::vector<uint8_t> row_is_last; // this launch holds the tensor's last chunk
  std::vector<BlockEntry> blocks;
};

// Greedy packing in tensor order: a launch takes tensors until it has
// max_rows of them or max_blocks chunks; a tensor with more chunks than fit is
// split across launches. Empty tensors get no blocks and no row.
std::vector<LaunchPlan> build_chunk_table(const int64_t* numels, int64_t n, int64_t chunk,
                                          int max_rows, int max_blocks);

}  // namespace fusedopt
