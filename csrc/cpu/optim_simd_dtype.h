#pragma once
// The AVX2 kernels' code for a CPU kernel's element type. Kept out of optim_simd.h, which must include no c10
// header.
#include "optim_simd.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace vitops {
namespace cpu {

template <typename T>
constexpr int simd_dtype() {
  return std::is_same_v<T, float> ? simd::kF32 : std::is_same_v<T, c10::Half> ? simd::kF16 : simd::kBF16;
}

}  // namespace cpu
}  // namespace vitops
