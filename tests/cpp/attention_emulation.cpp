// Runs the attention CUDA kernels (csrc/cuda/attention_kernels.cuh) on the CPU (cuda_emulation.h).
// Built and driven by tests/test_attention_cuda_emulation.py, which checks the results against the reference:
// it validates the kernels' indexing, masking and synchronisation without a GPU (not their speed, nor anything
// specific to the hardware such as bank conflicts or the half/bfloat16 conversions: T is float here).
//
// usage: attention_emulation B H NQ NK D PACKED in.bin out.bin
//   in.bin: float32 q (B,H,NQ,D), k, v (B,H,NK,D), grad_out (B,H,NQ,D), contiguous.
//   out.bin: out (B,H,NQ,D), lse (B,H,NQ), dq, dk, dv, contiguous.
//   PACKED=1 places q/k/v in one (B, N, 3*H*D) buffer and out/grads in packed buffers (NQ == NK), so the kernels
//   run on the strided views the packed ops give them.
#include "cuda_emulation.h"

#include <cstdio>

#include "../../csrc/cuda/attention_kernels.cuh"

using namespace vitops::cuda::attention_kernels;

struct View {  // a (B, H, N, D) view into a buffer
  float* data;
  BHN s;
  float& at(int b, int h, int n, int d) const { return data[b * s.b + h * s.h + n * s.n + d]; }
};

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr, "usage: %s B H NQ NK D PACKED in.bin out.bin\n", argv[0]);
    return 2;
  }
  const int B = std::atoi(argv[1]), H = std::atoi(argv[2]), NQ = std::atoi(argv[3]), NK = std::atoi(argv[4]),
            D = std::atoi(argv[5]);
  const bool packed = std::atoi(argv[6]) != 0;
  if (packed && NQ != NK) return 2;
  const size_t nq_elems = (size_t)B * H * NQ * D, nk_elems = (size_t)B * H * NK * D;
  std::vector<float> in(2 * nq_elems + 2 * nk_elems);
  FILE* f = std::fopen(argv[7], "rb");
  if (!f || std::fread(in.data(), sizeof(float), in.size(), f) != in.size()) return 3;
  std::fclose(f);

  // Buffers and views: contiguous (B, H, N, D), or packed (B, N, parts*H*D).
  auto contiguous = [&](std::vector<float>& buf, int n) {
    buf.assign((size_t)B * H * n * D, 0.f);
    return View{buf.data(), BHN{(int64_t)H * n * D, (int64_t)n * D, (int64_t)D}};
  };
  auto packed_view = [&](std::vector<float>& buf, int parts, int index) {
    const int64_t row = (int64_t)parts * H * D;
    return View{buf.data() + index * H * D, BHN{NQ * row, (int64_t)D, row}};
  };
  std::vector<float> qb, kb, vb, qkv, ob, dqb, dkb, dvb, dqkv, dob;
  View q, k, v, o, dq, dk, dv;
  if (packed) {
    qkv.assign((size_t)B * NQ * 3 * H * D, 0.f);
    dqkv.assign(qkv.size(), std::nanf(""));
    ob.assign((size_t)B * NQ * H * D, std::nanf(""));
    q = packed_view(qkv, 3, 0), k = packed_view(qkv, 3, 1), v = packed_view(qkv, 3, 2);
    o = packed_view(ob, 1, 0);
    dq = packed_view(dqkv, 3, 0), dk = packed_view(dqkv, 3, 1), dv = packed_view(dqkv, 3, 2);
  } else {
    q = contiguous(qb, NQ), k = contiguous(kb, NK), v = contiguous(vb, NK), o = contiguous(ob, NQ);
    dq = contiguous(dqb, NQ), dk = contiguous(dkb, NK), dv = contiguous(dvb, NK);
  }
  View dout = contiguous(dob, NQ);
  const float* src = in.data();
  auto fill = [&](const View& t, int n) {
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < n; ++i)
          for (int c = 0; c < D; ++c) t.at(b, h, i, c) = *src++;
  };
  fill(q, NQ), fill(k, NK), fill(v, NK), fill(dout, NQ);

  std::vector<float> lse((size_t)B * H * NQ, std::nanf("")), delta((size_t)B * H * NQ, std::nanf(""));
  const float scale = 1.f / std::sqrt((float)D);
  const int threads = kWarps * 32;
  auto rows = [](int n) { return (unsigned)((n + kRowsPerCta - 1) / kRowsPerCta); };
  const size_t fwd_smem = sizeof(float) * kWarps * kWarpScratch + 2 * sizeof(float) * NK * padded(D);
  const size_t dkdv_smem = sizeof(float) * (kWarps * kWarpScratch + 2 * kMaxN) + 2 * sizeof(float) * NQ * padded(D);

  launch(Dim3{(unsigned)(B * H), rows(NQ), 1}, threads, fwd_smem, [&] {
    attention_forward_kernel<float>(q.data, k.data, v.data, o.data, lse.data(), q.s, k.s, v.s, o.s, H, NQ, NK, D,
                                    scale);
  });
  launch(Dim3{(unsigned)(B * H), rows(NQ), 1}, threads, fwd_smem, [&] {
    attention_backward_dq_kernel<float>(q.data, k.data, v.data, o.data, dout.data, lse.data(), delta.data(),
                                        dq.data, q.s, k.s, v.s, o.s, dout.s, dq.s, H, NQ, NK, D, scale);
  });
  launch(Dim3{(unsigned)(B * H), rows(NK), 1}, threads, dkdv_smem, [&] {
    attention_backward_dkdv_kernel<float>(q.data, k.data, v.data, dout.data, lse.data(), delta.data(), dk.data,
                                          dv.data, q.s, k.s, v.s, dout.s, dk.s, dv.s, H, NQ, NK, D, scale);
  });

  FILE* g = std::fopen(argv[8], "wb");
  auto dump = [&](const View& t, int n) {
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < n; ++i)
          for (int c = 0; c < D; ++c) std::fwrite(&t.at(b, h, i, c), sizeof(float), 1, g);
  };
  dump(o, NQ);
  std::fwrite(lse.data(), sizeof(float), lse.size(), g);
  dump(dq, NQ), dump(dk, NK), dump(dv, NK);
  std::fclose(g);
  return 0;
}
