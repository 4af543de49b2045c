// Calls vitops::drop_path_add through the dispatcher, as a libtorch user would, and checks it against ATen.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("vitops::drop_path_add", "")
                .typed<at::Tensor(
                    const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&)>();
  at::manual_seed(0);
  const auto residual = at::randn({4, 7, 33});
  const auto branch = at::randn({4, 7, 33});
  const auto gamma = at::randn({33});
  const auto scale = at::tensor({0.0f, 1.25f, 1.25f, 0.0f});

  const auto out = op.call(residual, branch, gamma, scale);
  const auto expected = residual + branch * gamma * scale.view({4, 1, 1});
  if (!at::allclose(out, expected, 1e-6, 1e-6)) {
    std::fprintf(stderr, "drop_path_add differs from ATen: max error %g\n",
                 (out - expected).abs().max().item<double>());
    return 1;
  }
  bool rejected = false;
  try {
    op.call(residual, branch.to(at::kLong), std::nullopt, std::nullopt);
  } catch (const c10::Error&) {
    rejected = true;
  }
  if (!rejected) {
    std::fprintf(stderr, "an integer branch was not rejected\n");
    return 1;
  }
  std::printf("vitops::drop_path_add through the dispatcher: ok\n");
  return 0;
}
