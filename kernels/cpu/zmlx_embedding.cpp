// ZmlxQEmbed: the `quantized_embedding` pattern's kernel — QuantizedEmbedding's lookup
// (`dequantize(w[ids], scales[ids], biases[ids])`) as one node. On the CPU MLX 0.32 builds that
// lookup from ~57 op nodes (three gathers; per packed field a left and a right shift, an
// expand_dims; a concatenate, reshapes, the scale multiply and bias add with their broadcasts),
// each a node, an allocation and a task hand-off in the decode loop. Bit-identical: every element
// is MLX's `float(q) * scale + bias`, a product rounded and then a sum rounded (no FMA: this file
// is built with -ffp-contract=off), scales/biases widened exactly from their stored dtype.
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/binary_ops.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

#include "mlx/c/error.h"
#include "mlx/c/private/array.h"
#include "mlx/c/private/stream.h"

#include "qmv_rows.h"
#include "zmlx_common.h"

namespace mx = mlx::core;
namespace dt = mlx::core::detail;

namespace {

using zmlx_cpu::scale_type;
using zmlx_cpu::whole;

// inputs: ids [...] u32, w [V, D*bits/32] u32, scales/biases [V, D/gs]  ->  out [..., D] f32.
// An id past the table gives a NaN row (MLX's gather does not check; the caller validates ids).
class QEmbed : public mx::UnaryPrimitive {
 public:
  QEmbed(mx::Stream s, int gs, int bits) : mx::UnaryPrimitive(s), gs_(gs), bits_(bits) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.dispatch([in, o = out.data<float>(), gs = gs_, bits = bits_]() {
      std::vector<uint32_t> ib;
      const uint32_t* ids = zmlx_cpu::dense(in[0], ib);
      const auto &w = in[1], &s = in[2], &b = in[3];
      // The packed table and its scales are whole, row-contiguous arrays (made so at construction).
      const uint32_t* wp = w.data<uint32_t>();
      const void *sp = s.data<void>(), *bp = b.data<void>();
      long V = w.shape(0), words = w.shape(1), groups = s.shape(1);
      int D = int(words * 32 / bits), st = scale_type(s.dtype());
      uint32_t mask = (1u << bits) - 1u;
      int per_word = 32 / bits;
      for (size_t t = 0; t < in[0].size(); ++t) {
        float* row = o + t * size_t(D);
        uint32_t id = ids[t];
        if (id >= uint64_t(V)) {
          std::fill(row, row + D, std::numeric_limits<float>::quiet_NaN());
          continue;
        }
        const uint32_t* wr = wp + size_t(id) * words;
        for (int i = 0; i < D; ++i) {
          uint32_t q = (wr[i / per_word] >> (bits * (i % per_word))) & mask;
          long g = long(id) * groups + i / gs;
          row[i] = dt::Add{}(dt::Multiply{}(float(q), zmlx_scale(sp, g, st)), zmlx_scale(bp, g, st));
        }
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("zmlx quantized_embedding: CPU-only primitive");
  }
  const char* name() const override { return "ZmlxQEmbed"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& p = static_cast<const QEmbed&>(o);
    return p.gs_ == gs_ && p.bits_ == bits_;
  }

 private:
  int gs_, bits_;
};

}  // namespace

extern "C" int zmlx_cpu_quantized_embedding(mlx_array* res, const mlx_array ids, const mlx_array w,
                                            const mlx_array sc, const mlx_array bi, int group_size, int bits,
                                            const mlx_stream s) {
  return zmlx_cpu::guarded([&] {
    auto& st = mlx_stream_get_(s);
    const auto &i0 = mlx_array_get_(ids), &w0 = mlx_array_get_(w), &s0 = mlx_array_get_(sc), &b0 = mlx_array_get_(bi);
    auto bad = [](const char* what) { throw std::invalid_argument(std::string("zmlx quantized_embedding: ") + what); };
    if (bits != 2 && bits != 4 && bits != 8) bad("bits must be 2, 4 or 8");
    if (i0.dtype() != mx::uint32) bad("token ids must be uint32");
    if (w0.ndim() != 2 || w0.dtype() != mx::uint32 || s0.ndim() != 2 || b0.shape() != s0.shape() ||
        scale_type(s0.dtype()) < 0 || b0.dtype() != s0.dtype() || s0.shape(0) != w0.shape(0) || group_size <= 0)
      bad("weight [V, D*bits/32] uint32 with float32/bfloat16/float16 scales/biases [V, D/group] (one dtype) expected");
    long D = long(w0.shape(1)) * 32 / bits;
    if (D % group_size != 0 || s0.shape(1) != D / group_size) bad("scales must be [V, D/group_size]");
    mx::Shape shape = i0.shape();
    shape.push_back(int(D));
    mlx_array_set_(*res, mx::array(shape, mx::float32, std::make_shared<QEmbed>(st, group_size, bits),
                                   {i0, whole(w0, st), whole(s0, st), whole(b0, st)}));
  });
}
