// 8-bit blockwise states on CUDA (ops/quant8.h). A warp owns one block of
// kQuantBlock elements at a time: lane l holds elements l, l + 32, ... (loads
// and stores coalesce), the block's absmax is a butterfly over the warp (a
// maximum, so its order does not change the bits), and every lane encodes its
// own elements with it. Chunks (multi_tensor.cuh) are whole numbers of blocks.
#pragma once
#include <stdexcept>
#include <type_traits>

#include "../ops/dispatch.h"
#include "../ops/quant8.h"
#include "../ops/sgd.h"
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

// fn(k, i) for the lane's elements i = base + lane + 32 k of a block that lie below numel.
template <class Fn>
__device__ __forceinline__ void for_each_lane_element(int64_t base, int lane, int64_t numel, Fn&& fn) {
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t i = base + lane + k * kWarpLanes;
    if (i < numel) fn(k, i);
  }
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
    for (int k = 0; k < kPerLane; ++k) out[k] = 0.0f;
    for_each_lane_element(base, lane, numel, [&](int k, int64_t i) { out[k] = decode8<K>(codes[i]) * scale; });
  }

  // vals of elements past numel must be 0 (load leaves them so). With kReload vals
  // become the values as stored (decoded from the new codes).
  template <bool kReload = false>
  __device__ void store(int64_t q, int64_t base, int lane, int64_t numel, float (&vals)[kPerLane]) const {
    float a = 0.0f;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) a = absmax_with(a, vals[k]);
#pragma unroll
    for (int offset = kWarpLanes / 2; offset > 0; offset /= 2)
      a = absmax_with(a, __shfl_xor_sync(0xFFFFFFFFu, a, offset));
    a = block_scale(a);
    if (lane == 0) absmax[q] = a;
    const float inv = quant_inverse(a);
    for_each_lane_element(base, lane, numel, [&](int k, int64_t i) {
      const uint8_t code = encode8<K>(vals[k] * inv);
      codes[i] = code;
      if constexpr (kReload) vals[k] = decode8<K>(code) * a;
    });
  }
};

// The momentum loop of SGD and LARS (momentum.cuh) with an 8-bit buffer: Rule as
// there, plus kAbsmaxColumn.
template <class P, class Rule, class Table>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) momentum_q8_kernel(const __grid_constant__ Table t,
                                                                                const Rule rule, const DeviceScalars d) {
  if (d.skip()) return;
  constexpr MomentumColumns c = Rule::kColumns;
  const BlockEntry be = t.blocks[blockIdx.x];
  const TensorRow& row = t.rows[be.row];
  const auto s = rule.template scalars<float>(row, d);
  // The age counter is advanced by a later kernel on the stream: every block reads the same value.
  const float first = momentum_first_step(row, c.age) ? 1.0f : 0.0f;
  const WarpQuantState<Code8::kSigned> buf(row, c.buffer, Rule::kAbsmaxColumn, 0);
  const int64_t n = row.numel;
  for_each_warp_block(row, be.chunk, [&](int64_t q, int64_t base, int lane) {
    float bv[kPerLane];
    buf.load(q, base, lane, n, bv);
    for_each_lane_element(base, lane, n, [&](int k, int64_t i) {
      float p[1], g[1];
      load_param<1, P>(row, c.param, c.master, i, p);
      load_elems<1>(col<P>(row, c.grad), i, g);
      Rule::element(p[0], g[0], bv[k], first, s);
      store_param<1, P>(row, c.param, c.master, i, p, d.rounding);
    });
    buf.store(q, base, lane, n, bv);
  });
}

template <class Rule>
void launch_momentum_q8(const OptimCall& call, const Rule& rule, cudaStream_t stream) {
  dispatch_q8_param(call.param_dtype, [&](auto ptag) {
    using P = typename decltype(ptag)::type;
    static_assert(sizeof(LaunchTable) + sizeof(Rule) + sizeof(DeviceScalars) <= kMaxParamBytes,
                  "8-bit momentum kernel parameters must fit the parameter space");
    for (const PlannedLaunch& L : plan_launches(call.rows, call.n_rows))
      with_launch_table(L, [&](const auto& table) {
        momentum_q8_kernel<P, Rule, std::decay_t<decltype(table)>>
            <<<L.n_blocks, kThreads, 0, stream>>>(table, rule, device_scalars(call));
      });
    check(cudaGetLastError(), "8-bit momentum launch");
  });
}

}  // namespace fusedopt::cuda
