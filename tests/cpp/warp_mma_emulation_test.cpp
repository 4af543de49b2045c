// Checks the emulated warp-level instructions (warp_mma_emulation.h) on their own, one warp per check, against
// plain matrix products and the layouts of NVIDIA's PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating
// point type", "Warp-level matrix load instruction: ldmatrix"). The layouts are restated here per register,
// independently of the emulator's tables. Built as a shared library and called through ctypes by
// tests/ops/test_warp_mma_emulation.py.
#include "warp_mma_emulation.h"

#include <string>

#include "../../csrc/cuda/warp_mma.cuh"

using namespace vitops::cuda;

namespace {

int g_checked = 0, g_failed = 0;

void expect(bool ok, const char* what, int lane, int index, double got, double want) {
  ++g_checked;
  if (!ok && ++g_failed <= 20) {
    std::fprintf(stderr, "MISMATCH %s lane %d [%d]: got %g, want %g\n", what, lane, index, got, want);
  }
}

// Distinct values, exact in fp16 and bf16 (integers up to 256 in magnitude, scaled by powers of two), so that
// every product below is exact in float32 and any misplaced element changes the result.
float a_value(int row, int col) { return float(row * 16 + col - 128); }             // A: 16 x 16
float b_value(int k, int n) { return float(k * 8 + n - 64) / 64.f; }               // B: 16 x 8
float c_value(int row, int col) { return float(row * 8 + col) + 0.5f; }            // C: 16 x 8
double product(int row, int col) {
  double sum = c_value(row, col);
  for (int k = 0; k < 16; ++k) sum += double(a_value(row, k)) * b_value(k, col);
  return sum;
}

template <class Dtype>
void check_product(const float (&d)[4], int lane, const char* what) {
  // C/D: c0, c1 at row lane/4, columns 2 (lane % 4) and +1; c2, c3 eight rows below
  for (int i = 0; i < 4; ++i) {
    const int row = lane / 4 + (i >= 2 ? 8 : 0), col = 2 * (lane % 4) + (i % 2);
    const double want = product(row, col);
    expect(d[i] == want, what, lane, i, d[i], want);
  }
}

void c_fragment(float (&d)[4], int lane) {
  for (int i = 0; i < 4; ++i) d[i] = c_value(lane / 4 + (i >= 2 ? 8 : 0), 2 * (lane % 4) + (i % 2));
}

// mma with fragments built by hand: register by register, as the PTX ISA describes them.
template <class Dtype>
void check_mma() {
  launch(Dim3{1, 1, 1}, 32, 0, [] {
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    const uint32_t a[4] = {
        warp::pack2<Dtype>(a_value(g, 2 * t), a_value(g, 2 * t + 1)),              // a0, a1
        warp::pack2<Dtype>(a_value(g + 8, 2 * t), a_value(g + 8, 2 * t + 1)),      // a2, a3
        warp::pack2<Dtype>(a_value(g, 2 * t + 8), a_value(g, 2 * t + 9)),          // a4, a5
        warp::pack2<Dtype>(a_value(g + 8, 2 * t + 8), a_value(g + 8, 2 * t + 9)),  // a6, a7
    };
    const uint32_t b0 = warp::pack2<Dtype>(b_value(2 * t, g), b_value(2 * t + 1, g));      // b0, b1
    const uint32_t b1 = warp::pack2<Dtype>(b_value(2 * t + 8, g), b_value(2 * t + 9, g));  // b2, b3
    float d[4];
    c_fragment(d, lane);
    warp::mma_m16n8k16<Dtype>(d, a, b0, b1);
    check_product<Dtype>(d, lane, "mma");
  });
}

// Shared memory for the ldmatrix checks: rows of 8 16-bit values at a pitch of 24 elements, laid out in a
// scrambled order (row r of the matrices at slot (5 r + 3) % 32), so that consecutive rows are not adjacent.
constexpr int kRows = 32, kPitch = 24;
int slot_of(int row) { return (5 * row + 3) % kRows; }
uint16_t* row_address(int row) { return reinterpret_cast<uint16_t*>(dynamic_smem()) + slot_of(row) * kPitch; }

// Every lane, register and half of ldmatrix .x1/.x2/.x4 with and without .trans: matrix m is rows 8m..8m+7 of
// the scrambled buffer, element (r, c) = 1000 m + 10 r + c.
template <int kMatrices, bool kTrans>
void check_ldmatrix_layout() {
  launch(Dim3{1, 1, 1}, 32, kRows * kPitch * 2, [] {
    const int lane = threadIdx.x;
    for (int r = lane; r < kRows; r += 32) {
      for (int c = 0; c < 8; ++c) row_address(r)[c] = uint16_t(1000 * (r / 8) + 10 * (r % 8) + c);
    }
    __syncthreads();
    uint32_t regs[kMatrices];
    // lanes 8m..8m+7 address the rows of matrix m; the others' addresses are ignored (row 0 here)
    warp::ldmatrix<kMatrices, kTrans>(regs, row_address(lane < 8 * kMatrices ? lane : 0));
    for (int m = 0; m < kMatrices; ++m) {
      for (int half = 0; half < 2; ++half) {
        // lane L holds row L / 4, columns 2 (L % 4) + half; .trans: the matrix is read column-major
        const int row = kTrans ? 2 * (lane % 4) + half : lane / 4;
        const int col = kTrans ? lane / 4 : 2 * (lane % 4) + half;
        const int got = (regs[m] >> (16 * half)) & 0xffff, want = 1000 * m + 10 * row + col;
        expect(got == want, kTrans ? "ldmatrix.trans" : "ldmatrix", lane, 2 * m + half, got, want);
      }
    }
  });
}

// ldmatrix feeding mma, the way the kernels use them: A from a row-major tile (x4), B from a tile holding B^T
// row-major (x2, and x4 over two n-tiles) or B row-major (x1 twice with .trans, x4 .trans over two n-tiles).
// Tiles: A 16 x 16 at rows 0-15 (pitch 24), B^T 8 x 16 at rows 16-23, B 16 x 8 at rows 32-47.
template <class Dtype>
void check_ldmatrix_mma() {
  launch(Dim3{1, 1, 1}, 32, 48 * kPitch * 2, [] {
    const int lane = threadIdx.x;
    uint16_t* smem = reinterpret_cast<uint16_t*>(dynamic_smem());
    auto round = [](float x) { return static_cast<uint16_t>(warp::pack2<Dtype>(x, 0.f) & 0xffff); };
    for (int i = lane; i < 16 * 16; i += 32) smem[(i / 16) * kPitch + i % 16] = round(a_value(i / 16, i % 16));
    for (int i = lane; i < 16 * 8; i += 32) {
      const int k = i / 8, n = i % 8;
      smem[(16 + n) * kPitch + k] = round(b_value(k, n));  // B^T
      smem[(32 + k) * kPitch + n] = round(b_value(k, n));  // B
      smem[(32 + k) * kPitch + 8 + n] = round(b_value(k, n));  // B again, as a second n-tile
    }
    __syncthreads();
    uint32_t a[4];
    warp::ldmatrix<4, false>(a, smem + (lane % 16) * kPitch + (lane / 16) * 8);
    float d[4];

    uint32_t bt[2];  // x2: matrix 0 = B^T rows 0-7, k 0-7 (b0 b1); matrix 1 = k 8-15 (b2 b3)
    warp::ldmatrix<2, false>(bt, smem + (16 + lane % 8) * kPitch + ((lane / 8) % 2) * 8);
    c_fragment(d, lane);
    warp::mma_m16n8k16<Dtype>(d, a, bt[0], bt[1]);
    check_product<Dtype>(d, lane, "ldmatrix.x2 -> mma");

    uint32_t lo[1], hi[1];  // x1.trans of B rows (k) 0-7, then 8-15
    warp::ldmatrix<1, true>(lo, smem + (32 + lane % 8) * kPitch);
    warp::ldmatrix<1, true>(hi, smem + (40 + lane % 8) * kPitch);
    c_fragment(d, lane);
    warp::mma_m16n8k16<Dtype>(d, a, lo[0], hi[0]);
    check_product<Dtype>(d, lane, "ldmatrix.x1.trans -> mma");

    uint32_t b4[4];  // x4.trans: (k 0-7 | 8-15) x (n-tile 0 | 1)
    warp::ldmatrix<4, true>(b4, smem + (32 + lane % 8 + ((lane / 8) % 2) * 8) * kPitch + (lane / 16) * 8);
    for (int nt = 0; nt < 2; ++nt) {
      c_fragment(d, lane);
      warp::mma_m16n8k16<Dtype>(d, a, b4[2 * nt], b4[2 * nt + 1]);
      check_product<Dtype>(d, lane, "ldmatrix.x4.trans -> mma");
    }
    uint32_t bt4[4];  // x4 non-trans over B^T: (k 0-7 | 8-15) of one n-tile, twice (its rows 0-7 again)
    warp::ldmatrix<4, false>(bt4, smem + (16 + lane % 8) * kPitch + ((lane / 8) % 2) * 8);
    for (int nt = 0; nt < 2; ++nt) {
      c_fragment(d, lane);
      warp::mma_m16n8k16<Dtype>(d, a, bt4[2 * nt], bt4[2 * nt + 1]);
      check_product<Dtype>(d, lane, "ldmatrix.x4 -> mma");
    }
  });
}

// cp.async: copies land only when a wait covers their group; src_bytes < 16 zero-fills the rest.
void check_cp_async() {
  alignas(16) static uint32_t global[64];
  for (int i = 0; i < 64; ++i) global[i] = 0x1000u + i;
  launch(Dim3{1, 1, 1}, 32, 3 * 32 * 16, [] {
    const int lane = threadIdx.x;
    uint32_t* smem = reinterpret_cast<uint32_t*>(dynamic_smem());
    for (int i = 0; i < 3 * 4; ++i) smem[lane * 12 + i] = 0xdeadu;
    warp::cp_async<16>(smem + lane * 12, global + (lane % 16) * 4, 16);  // group 0
    warp::cp_async_commit();
    warp::cp_async<16>(smem + lane * 12 + 4, global + (lane % 16) * 4, 4 * (lane % 4));  // group 1: partial
    warp::cp_async_commit();
    warp::cp_async<4>(smem + lane * 12 + 8, global + lane, 4);  // still open
    expect(smem[lane * 12] == 0xdeadu, "before wait", lane, 0, smem[lane * 12], 0xdead);
    warp::cp_async_wait<1>();  // group 0 only
    for (int i = 0; i < 4; ++i) {
      expect(smem[lane * 12 + i] == 0x1000u + (lane % 16) * 4 + i, "wait<1> group 0", lane, i, smem[lane * 12 + i],
             0x1000u + (lane % 16) * 4 + i);
      expect(smem[lane * 12 + 4 + i] == 0xdeadu, "wait<1> group 1", lane, i, smem[lane * 12 + 4 + i], 0xdead);
    }
    warp::cp_async_commit();
    warp::cp_async_wait<0>();
    for (int i = 0; i < 4; ++i) {
      const uint32_t want = i < lane % 4 ? 0x1000u + (lane % 16) * 4 + i : 0u;
      expect(smem[lane * 12 + 4 + i] == want, "zero fill", lane, i, smem[lane * 12 + 4 + i], want);
    }
    expect(smem[lane * 12 + 8] == 0x1000u + lane, "4-byte copy", lane, 0, smem[lane * 12 + 8], 0x1000u + lane);
  });
}

template <class Dtype>
bool run(const std::string& check) {
  if (check == "mma") {
    check_mma<Dtype>();
  } else if (check == "ldmatrix") {
    check_ldmatrix_layout<1, false>(), check_ldmatrix_layout<2, false>(), check_ldmatrix_layout<4, false>();
    check_ldmatrix_layout<1, true>(), check_ldmatrix_layout<2, true>(), check_ldmatrix_layout<4, true>();
  } else if (check == "ldmatrix_mma") {
    check_ldmatrix_mma<Dtype>();
  } else if (check == "cp_async") {
    check_cp_async();
  } else {
    return false;
  }
  return true;
}

}  // namespace

extern "C" {

// Runs one check (mma, ldmatrix, ldmatrix_mma, cp_async) with dtype 0 float16 or 1 bfloat16: stores how many
// values it compared in *checked and returns how many differed (each printed), or -1 for an unknown check.
int check_warp_instruction(const char* check, int dtype, int* checked) {
  g_checked = g_failed = 0;
  const bool known = dtype == 0 ? run<warp::Fp16>(check) : run<warp::Bf16>(check);
  *checked = g_checked;
  return known ? g_failed : -1;
}

}  // extern "C"
