// 8-bit blockwise states on CUDA (ops/quant8.h). A warp owns one block of
// kQuantBlock elements at a time: lane l holds elements l, l + 32, ... (loads
// and stores coalesce), the block's absmax is a butterfly over the warp (a
// maximum, so its order does not change the bits), and every lane encodes its
// own elements with it. Chunks (multi_tensor.cuh) are whole numbers of blocks.
#pragma once
#include "../ops/quant8.h"
#include "multi_tensor.cuh"

namespace fusedopt::cuda {

constexpr int kWarpLanes = 32;
constexpr int kPerLane = static_cast<int>(kQuantBlock / kWarpLanes);
static_assert(kChunkElements % kQuantBlock == 0, "a chunk must hold whole blocks");

// The blocks [first, last) of a block-table entry's chunk, visited warp by warp:
// visit(block, base element, lane).
template <class Visit>
__device__ __forceinline__ void for_each_warp_block(const TensorRow& row, int32_t chunk, Visit&& visit) {
  constexpr int64_t kChunkBlocks = kChunkElements / kQuantBlock;
  const int64_t first = static_cast<int64_t>(chunk) * kChunkBlocks;
  const int64_t nb = quant_blocks(row.numel);
  const int64_t last = first + kChunkBlocks < nb ? first + kChunkBlocks : nb;
  const int warp = threadIdx.x / kWarpLanes, lane = threadIdx.x % kWarpLanes;
  for (int64_t q = first + warp; q < last; q += kThreads / kWarpLanes) visit(q, q * kQuantBlock, lane);
}

// One quantized state of a row (its codes and its row of the absmax tensor).
template <Code8 K>
struct WarpQuantState {
  uint8_t* codes;
  float* absmax;
  __device__ WarpQuantState(const TensorRow& r, int codes_column, int absmax_column, int index)
      : codes(col<uint8_t>(r, codes_column)), absmax(col<float>(r, absmax_column) + index * quant_blocks(r.numel)) {}

  __device__ void load(int64_t q, int64_t base, int lane, int64_t numel, float (&out)[kPerLane]) const {
    const float scale = absmax[q];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t i = base + lane + k * kWarpLanes;
      out[k] = i < numel ? decode8<K>(codes[i]) * scale : 0.0f;
    }
  }

  // vals of elements past numel must be 0 (load leaves them so).
  __device__ void store(int64_t q, int64_t base, int lane, int64_t numel, const float (&vals)[kPerLane]) const {
    float a = 0.0f;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) a = absmax_with(a, vals[k]);
#pragma unroll
    for (int offset = kWarpLanes / 2; offset > 0; offset /= 2)
      a = absmax_with(a, __shfl_xor_sync(0xFFFFFFFFu, a, offset));
    a = block_scale(a);
    if (lane == 0) absmax[q] = a;
    const float inv = quant_inverse(a);
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t i = base + lane + k * kWarpLanes;
      if (i < numel) codes[i] = encode8<K>(vals[k] * inv);
    }
  }
};

}  // namespace fusedopt::cuda
