// Runs the fused optimizer steps' CUDA kernels (csrc/cuda/lamb_kernels.cuh, adamp_kernels.cuh) on the CPU
// (cuda_emulation.h), on the tables the CUDA host code builds (plan_tables), launching them in the order
// lamb.cu / adamp.cu do. Built and driven by tests/test_optim_cuda_emulation.py, which checks the results against
// the reference: without a GPU this is what checks the multi-tensor indexing, the per-row reductions and the
// finalize kernels.
//
// usage: optim_emulation lamb IN OUT lr beta1 beta2 beta3 bc1 bc2 eps wd decay_scale decoupled adapt trust_clip clip
//        optim_emulation adamp IN OUT lr beta1 beta2 eps wd delta wd_ratio nesterov
//   IN: int64 n; int64 numel[n], dim[n], rows[n]; (adamp: float64 bc1[n], bc2[n]); then float32 p, g, m, v of
//       each tensor in turn. OUT: float32 p, m, v of each tensor in turn.
#include "cuda_emulation.h"

#include <string>

#include "../../csrc/cuda/adamp_kernels.cuh"
#include "../../csrc/cuda/lamb_kernels.cuh"

using namespace vitops::cuda;

namespace {

struct Step {
  std::vector<int64_t> numel, dim, rows;
  std::vector<double> bc1, bc2;
  std::vector<std::vector<float>> p, g, m, v;
};

template <typename T>
void read(FILE* f, T* data, size_t n) {
  if (std::fread(data, sizeof(T), n, f) != n) {
    std::fprintf(stderr, "short input\n");
    std::exit(3);
  }
}

Step read_step(const char* path, bool adamp) {
  FILE* f = std::fopen(path, "rb");
  if (!f) std::exit(3);
  int64_t n;
  read(f, &n, 1);
  Step s;
  for (auto* field : {&s.numel, &s.dim, &s.rows}) {
    field->resize(n);
    read(f, field->data(), n);
  }
  if (adamp) {
    s.bc1.resize(n), s.bc2.resize(n);
    read(f, s.bc1.data(), n), read(f, s.bc2.data(), n);
  }
  for (int64_t t = 0; t < n; ++t) {
    for (auto* buf : {&s.p, &s.g, &s.m, &s.v}) {
      buf->emplace_back(s.numel[t]);
      read(f, buf->back().data(), s.numel[t]);
    }
  }
  std::fclose(f);
  return s;
}

struct HostPlan {
  PlanTables tables;
  PlanView view;
};

HostPlan host_plan(Step& s) {
  HostPlan h{plan_tables(s.numel, s.rows), {}};
  for (size_t t = 0; t < s.numel.size(); ++t) {
    TensorMeta& meta = h.tables.tensors[t];
    meta.p = s.p[t].data(), meta.g = s.g[t].data(), meta.m = s.m[t].data(), meta.v = s.v[t].data();
    meta.dtype = kF32;
  }
  h.view = PlanView{h.tables.tensors.data(), h.tables.chunks.data(), h.tables.row_slots.data(),
                    int64_t(s.numel.size()), int64_t(h.tables.chunks.size()), h.tables.num_slots,
                    h.tables.total_rows};
  return h;
}

unsigned blocks(int64_t n) { return unsigned(n); }

void run_lamb(Step& s, char** a) {
  const double lr = std::atof(a[0]), beta1 = std::atof(a[1]), beta2 = std::atof(a[2]), beta3 = std::atof(a[3]);
  const double bc1 = std::atof(a[4]), bc2 = std::atof(a[5]), eps = std::atof(a[6]), wd = std::atof(a[7]);
  const double decay_scale = std::atof(a[8]);
  const bool decoupled = std::atoi(a[9]), adapt = std::atoi(a[10]), trust_clip = std::atoi(a[11]);
  const float clip = float(std::atof(a[12]));
  HostPlan h = host_plan(s);
  const LambParams k = lamb_params(clip > 0 ? &clip : nullptr, lr, beta1, beta2, beta3, bc1, bc2, eps, wd,
                                   decay_scale, decoupled, trust_clip);
  const Dim3 grid{blocks(h.view.num_chunks), 1, 1};
  if (!(wd != 0.0 || adapt)) {
    launch(grid, kThreads, 0, [&] { lamb_stage_kernel<0>(h.view, k, nullptr, nullptr); });
    return;
  }
  std::vector<float> partials(2 * h.view.num_slots, std::nanf("")), ratios(h.view.num_tensors, std::nanf(""));
  launch(grid, kThreads, 0, [&] { lamb_stage_kernel<1>(h.view, k, partials.data(), nullptr); });
  const Dim3 ratio_grid{blocks((h.view.num_tensors + kThreads - 1) / kThreads), 1, 1};
  launch(ratio_grid, kThreads, 0, [&] { lamb_ratio_kernel(h.view, partials.data(), ratios.data(), trust_clip); });
  launch(grid, kThreads, 0, [&] { lamb_stage_kernel<2>(h.view, k, nullptr, ratios.data()); });
}

void run_adamp(Step& s, char** a) {
  const double lr = std::atof(a[0]), beta1 = std::atof(a[1]), beta2 = std::atof(a[2]), eps = std::atof(a[3]);
  const double wd = std::atof(a[4]), delta = std::atof(a[5]), wd_ratio = std::atof(a[6]);
  const bool nesterov = std::atoi(a[7]);
  HostPlan h = host_plan(s);
  for (size_t t = 0; t < s.numel.size(); ++t) {
    adamp_tensor_fields(h.tables.tensors[t], s.dim[t], lr, s.bc1[t], s.bc2[t]);
  }
  const AdamPParams k = adamp_params(lr, beta1, beta2, eps, wd, delta, wd_ratio, nesterov);
  std::vector<float> partials(std::max<int64_t>(1, 4 * h.view.num_slots), std::nanf(""));
  std::vector<float> coefs(std::max<int64_t>(1, h.view.total_rows), std::nanf(""));
  std::vector<float> factors(h.view.num_tensors, std::nanf(""));
  const Dim3 grid{blocks(h.view.num_chunks), 1, 1};
  launch(grid, kThreads, 0, [&] { adamp_stage1_kernel(h.view, k, partials.data()); });
  launch(Dim3{blocks(h.view.num_tensors), 1, 1}, kThreads, 0,
         [&] { adamp_finalize_kernel(h.view, k, partials.data(), coefs.data(), factors.data()); });
  launch(grid, kThreads, 0, [&] { adamp_stage2_kernel(h.view, k, coefs.data(), factors.data()); });
}

}  // namespace

int main(int argc, char** argv) {
  const std::string op = argc > 1 ? argv[1] : "";
  if (!((op == "lamb" && argc == 17) || (op == "adamp" && argc == 12))) {
    std::fprintf(stderr, "usage: see tests/cpp/optim_emulation.cpp\n");
    return 2;
  }
  Step s = read_step(argv[2], op == "adamp");
  if (op == "lamb") {
    run_lamb(s, argv + 4);
  } else {
    run_adamp(s, argv + 4);
  }
  FILE* f = std::fopen(argv[3], "wb");
  for (size_t t = 0; t < s.numel.size(); ++t) {
    for (auto* buf : {&s.p, &s.m, &s.v}) {
      std::fwrite((*buf)[t].data(), sizeof(float), (*buf)[t].size(), f);
    }
  }
  std::fclose(f);
  return 0;
}
