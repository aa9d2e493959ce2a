// Shared header for zmlx's CUDA kernel bodies: MLX's device functors (Sigmoid, Multiply, Add)
// so the kernels round exactly like MLX's own CUDA ops, and cooperative-groups reductions so the
// routers reduce in the same tree order as MLX's softmax and row-sum kernels.
#include "mlx/backend/cuda/device/binary_ops.cuh"
#include "mlx/backend/cuda/device/unary_ops.cuh"
#include <cooperative_groups/reduce.h>

// Plain `a + b` in the operand type: the functor MLX's row reductions hand to cg::reduce.
struct ZmlxSum {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};
