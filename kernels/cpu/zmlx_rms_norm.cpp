// ZmlxRmsNorm: the `rms_norm` pattern's kernel — mlx.nn.RMSNorm (fast::rms_norm) on the CPU as
// one node instead of the ~10 op nodes of MLX's CPU fallback (square, sum, scale by 1/n, add eps,
// rsqrt, two multiplies and their broadcasts). Each node costs an allocation and a task
// hand-off, ~14 us in the decode loop on the 2-core VM: far more than the arithmetic of one row.
// Bit-identical: the same sums in the same order (rms_norm_row.h).
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

#include "mlx/c/error.h"
#include "mlx/c/private/array.h"
#include "mlx/c/private/stream.h"

#include "rms_norm_row.h"
#include "zmlx_common.h"
#include "zmlx_pool.h"

namespace mx = mlx::core;

namespace {

// inputs: x [..., D] f32, w [D] f32  ->  out [..., D] f32
class RmsNorm : public mx::UnaryPrimitive {
 public:
  RmsNorm(mx::Stream s, float eps) : mx::UnaryPrimitive(s), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.dispatch([in, o = out.data<float>(), eps = eps_]() {
      std::vector<float> xb, wb;
      const float* x = zmlx_cpu::dense(in[0], xb);
      const float* w = zmlx_cpu::dense(in[1], wb);
      int d = in[0].shape(-1);
      size_t rows = d > 0 ? in[0].size() / size_t(d) : 0;
      auto row = [&](size_t r) { zmlx_norm::rms_norm_row(x + r * d, w, d, eps, o + r * d); };
      // A decode row is ~2 us of work: threads only pay off for prefill chunks.
      if (rows >= 16) {
        zmlx_pool::parallel_items(rows, row);
      } else {
        for (size_t r = 0; r < rows; ++r) row(r);
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("zmlx rms_norm: CPU-only primitive");
  }
  const char* name() const override { return "ZmlxRmsNorm"; }
  bool is_equivalent(const mx::Primitive& o) const override { return static_cast<const RmsNorm&>(o).eps_ == eps_; }

 private:
  float eps_;
};

}  // namespace

extern "C" int zmlx_cpu_rms_norm(mlx_array* res, const mlx_array x, const mlx_array w, float eps, const mlx_stream s) {
  return zmlx_cpu::guarded([&] {
    auto& st = mlx_stream_get_(s);
    const auto &x0 = mlx_array_get_(x), &w0 = mlx_array_get_(w);
    if (x0.ndim() < 1 || x0.dtype() != mx::float32 || w0.dtype() != mx::float32 || w0.ndim() != 1 ||
        w0.shape(0) != x0.shape(-1) || x0.shape(-1) < 1)
      throw std::invalid_argument("zmlx rms_norm: x float32 [..., D] and weight float32 [D] (D >= 1) expected");
    mlx_array_set_(*res, mx::array(x0.shape(), mx::float32, std::make_shared<RmsNorm>(st, eps), {x0, w0}));
  });
}
