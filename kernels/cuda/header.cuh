// Shared header for zmlx's CUDA kernel bodies: MLX's device functors (Sigmoid, Multiply, Add)
// so the kernels round exactly like MLX's own CUDA ops.
#include "mlx/backend/cuda/device/binary_ops.cuh"
#include "mlx/backend/cuda/device/unary_ops.cuh"
