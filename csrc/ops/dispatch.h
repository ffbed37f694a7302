// Turns the run-time dtype codes of a call into template types, once, at the
// top of each driver. fp64 params keep fp64 state; the others use fp32 state
// unless the call asks for bf16 state.
#pragma once
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common.h"

namespace fusedopt {

template <class T> struct Tag { using type = T; };

template <class Fn>
decltype(auto) dispatch_float_dtype(int code, Fn&& fn) {
  switch (code) {
    case kFloat32: return fn(Tag<float>{});
    case kFloat16: return fn(Tag<Half>{});
    case kBFloat16: return fn(Tag<BFloat16>{});
    case kFloat64: return fn(Tag<double>{});
  }
  throw std::invalid_argument("fusedopt: unknown dtype code " + std::to_string(code));
}

// fn(Tag<Param>, Tag<State>) for the supported (param, state) pairs.
template <class Fn>
decltype(auto) dispatch_param_state(int param_code, int state_code, Fn&& fn) {
  if (param_code == kFloat64) {
    if (state_code != kFloat64) throw std::invalid_argument("fusedopt: fp64 params need fp64 state");
    return fn(Tag<double>{}, Tag<double>{});
  }
  return dispatch_float_dtype(param_code, [&](auto p) {
    using P = typename decltype(p)::type;
    if constexpr (std::is_same_v<P, double>) {
      return fn(Tag<double>{}, Tag<double>{});  // unreachable, keeps types uniform
    } else {
      if (state_code == kBFloat16) return fn(p, Tag<BFloat16>{});
      if (state_code != kFloat32) throw std::invalid_argument("fusedopt: state must be fp32 or bf16");
      return fn(p, Tag<float>{});
    }
  });
}

// 8-bit states (ops/quant8.h) are for fp32, fp16 and bf16 params: fp64 is refused.
inline void check_q8_param(int param_code) {
  if (param_code == kFloat64) throw std::invalid_argument("fusedopt: 8-bit state needs fp32, fp16 or bf16 params");
}

// fn(Tag<P>) for the param dtypes 8-bit state supports.
template <class Fn>
void dispatch_q8_param(int code, Fn&& fn) {
  check_q8_param(code);
  dispatch_float_dtype(code, [&](auto tag) {
    if constexpr (!std::is_same_v<typename decltype(tag)::type, double>) fn(tag);
  });
}

}  // namespace fusedopt
