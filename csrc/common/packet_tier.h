// Which machine words the CUDA vector path moves a column's packets in
// (cuda/multi_tensor.cuh load_packet, store_packet). Plain code, host and device,
// so the host tests every address class (tests/test_packet_tier.py) through the
// same function the kernels call.
#pragma once
#include <cstdint>

#include "../ops/common.h"

namespace fusedopt {

// A packet of `vec` elements of `elem_bytes` each at `address`: the widest word
// (16, 8, 4 or 2 bytes) wider than an element that divides both the packet and
// the address, or 0 (element by element). load_packet moves 16-, 8- and 4-byte
// words; the 2-byte tier (1-byte elements) goes element by element there. Packets start at multiples of vec
// elements from a column's base, so the base's tier is every packet's: a column
// at an odd offset (a grad in a DDP bucket, gradient_as_bucket_view) costs its own
// accesses only, not the whole row's.
FO_HD int packet_tier(uintptr_t address, int elem_bytes, int vec) {
  const int packet = elem_bytes * vec;
  for (int word = 16; word > elem_bytes; word /= 2)
    if (packet % word == 0 && address % word == 0) return word;
  return 0;
}

}  // namespace fusedopt
