// The AVX2 build of the optimizer ops' segment kernels (csrc/cpu/optim_avx2.cpp) against the scalar build
// (csrc/cpu/optim_scalar.cpp), bit for bit: every kernel, dtype, flag and moment mode, segment lengths around the
// eight-lane width (vector loop and tail), on the same inputs. Both run csrc/lamb.h's and csrc/adamp.h's
// arithmetic; this checks that the vector code (its loads, stores, conversions and lane-ordered sums) keeps it.
// Built and run by tests/optim/test_optim_lanes.py. Exit status 0: identical; 1: a difference (printed); 77: the
// CPU has no AVX2.
#include "../../csrc/cpu/optim_segments.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

using namespace vitops;
using namespace vitops::cpu;

namespace {

int failures = 0;

// Finite values of every magnitude the kernels meet (zeros, subnormals in half precision, large ones), as the bits
// of dtype `dt`, four bytes per element whatever the dtype.
std::vector<uint32_t> random_bits(int dt, int64_t n, std::mt19937& rng, bool positive) {
  std::vector<uint32_t> out(n);
  std::normal_distribution<float> normal;
  for (auto& bits : out) {
    const uint32_t sign = positive ? 0 : rng() & 1;
    if (dt == kF16) {
      const uint32_t exponent = rng() % 31;  // 31 is inf / NaN
      bits = (sign << 15) | (exponent << 10) | (rng() & 0x3ff);
    } else if (dt == kBF16) {
      const uint32_t exponent = rng() % 8 == 0 ? 0 : 97 + rng() % 40;  // zero or subnormal, or 2^-30 .. 2^9
      bits = (sign << 15) | (exponent << 7) | (rng() & 0x7f);
    } else {
      float x = normal(rng) * (rng() % 8 == 0 ? 1e-20f : rng() % 8 == 1 ? 1e4f : 1.f);
      x = positive ? std::fabs(x) : x;
      std::memcpy(&bits, &x, 4);
    }
  }
  return out;
}

// A segment's tensors: p and g in dtype dt (the low half of each word for 16-bit dtypes, packed), m and v float.
struct Segment {
  int dt;
  int64_t n;
  std::vector<uint16_t> p16, g16;
  std::vector<float> p32, g32, m, v;
  double sums[4] = {0, 0, 0, 0};

  Segment(int dtype, int64_t size, unsigned seed) : dt(dtype), n(size) {
    std::mt19937 rng(seed);
    auto p = random_bits(dt, n, rng, false), g = random_bits(dt, n, rng, false);
    auto mb = random_bits(kF32, n, rng, false), vb = random_bits(kF32, n, rng, true);
    for (int64_t i = 0; i < n; ++i) {
      p16.push_back(uint16_t(p[i]));
      g16.push_back(uint16_t(g[i]));
      float f;
      std::memcpy(&f, &p[i], 4);
      p32.push_back(f);
      std::memcpy(&f, &g[i], 4);
      g32.push_back(f);
      std::memcpy(&f, &mb[i], 4);
      m.push_back(f * 0.1f);
      std::memcpy(&f, &vb[i], 4);
      v.push_back(f * 0.1f);
    }
  }
  void* p() { return dt == kF32 ? static_cast<void*>(p32.data()) : static_cast<void*>(p16.data()); }
  const void* g() const { return dt == kF32 ? static_cast<const void*>(g32.data()) : g16.data(); }
};

bool same_bits(const Segment& a, const Segment& b) {
  const bool params = a.dt == kF32 ? std::memcmp(a.p32.data(), b.p32.data(), 4 * a.n) == 0
                                   : std::memcmp(a.p16.data(), b.p16.data(), 2 * a.n) == 0;
  return params && std::memcmp(a.m.data(), b.m.data(), 4 * a.n) == 0 &&
         std::memcmp(a.v.data(), b.v.data(), 4 * a.n) == 0 && std::memcmp(a.sums, b.sums, sizeof(a.sums)) == 0;
}

// Runs `kernel` with both builds on copies of one segment and compares everything it wrote.
void check(const char* what, int dt, int64_t n, unsigned seed,
           const std::function<void(const SegmentKernels&, Segment&)>& kernel) {
  Segment vec(dt, n, seed), ref(dt, n, seed);
  kernel(avx2_kernels(), vec);
  kernel(scalar_kernels(), ref);
  if (!same_bits(vec, ref)) {
    if (++failures <= 20) {
      std::printf("differs: %s, dtype %d, %lld elements\n", what, dt, static_cast<long long>(n));
    }
  }
}

}  // namespace

int main() {
  if (!avx2_supported()) {
    std::printf("no AVX2 on this CPU\n");
    return 77;
  }
  int cases = 0;
  for (int dt : {kF32, kF16, kBF16}) {
    for (int64_t n : {0, 1, 7, 8, 9, 16, 37, 1000}) {
      const unsigned seed = unsigned(1000 * dt + n);
      check("sq_sum", dt, n, seed, [](const SegmentKernels& k, Segment& s) { s.sums[0] = k.sq_sum(s.dt, s.g(), s.n); });
      // The moment modes: lerp with weight < 0.5 and >= 0.5, and m * beta1 + beta3 * g.
      for (auto [beta1, beta3] : {std::pair{0.9, 0.1}, std::pair{0.3, 0.7}, std::pair{0.8, 1.0}}) {
        for (bool decoupled : {false, true}) {
          const auto lk = lamb::make_constants(1e-2, beta1, 0.999, beta3, 0.5, 0.3, 1e-6, 0.05, 1e-2, decoupled);
          for (bool finish : {false, true}) {
            check("lamb_moments", dt, n, seed, [&](const SegmentKernels& k, Segment& s) {
              k.lamb_moments(lk, 0.75f, finish, s.dt, s.p(), s.g(), s.m.data(), s.v.data(), s.n, s.sums);
            });
          }
          check("lamb_apply", dt, n, seed, [&](const SegmentKernels& k, Segment& s) {
            k.lamb_apply(lk, 0.625f, s.dt, s.p(), s.m.data(), s.v.data(), s.n);
          });
          cases += 3;
        }
      }
      for (bool nesterov : {false, true}) {
        const auto ak = adamp::make_constants(1e-2, 0.9, 0.999, 1e-8, 0.1, 0.1, 0.1, nesterov);
        const auto st = adamp::step_constants(1e-2, 0.5, 0.3);
        for (bool projectable : {false, true}) {
          check("adamp_moments", dt, n, seed, [&](const SegmentKernels& k, Segment& s) {
            k.adamp_moments(ak, st, projectable, s.dt, s.p(), s.g(), s.m.data(), s.v.data(), s.n, s.sums);
          });
        }
        check("adamp_apply", dt, n, seed, [&](const SegmentKernels& k, Segment& s) {
          k.adamp_apply(ak, st, ak.projected_factor, 0.375f, s.dt, s.p(), s.g(), s.m.data(), s.v.data(), s.n);
        });
        cases += 3;
      }
      cases += 1;
    }
  }
  if (failures) {
    std::printf("%d of %d cases differ between the AVX2 and the scalar builds\n", failures, cases);
    return 1;
  }
  std::printf("%d cases: the AVX2 and the scalar builds agree bit for bit\n", cases);
  return 0;
}
