// Zero-copy MLX arrays over memory-mapped checkpoint bytes, for the CPU backend.
//
// MLX 0.32's CPU allocator (mlx/backend/no_gpu/allocator.cpp) cannot adopt foreign memory: its
// `make_buffer` is the base class's (returns null), so `array(void* data, shape, dtype, deleter)`
// — and mlx-c's `mlx_array_new_data_managed_payload` on top of it — copies into a malloc'd buffer.
// (The Python binding says the same: "Cannot import a CPU array without a copy".)
// Its buffers are `malloc(size + 8)` with the size in the first 8 bytes and
// `Buffer::raw_ptr() == ptr + 8`, so an `allocator::Buffer` whose ptr is `data - 8` reads `data`,
// and `array(Buffer, shape, dtype, Deleter)` adopts it with our deleter (never MLX's `free`).
// The 8 bytes before `data` are the file's bytes, never written: MLX reads them only as
// `buffer_size()`, in donation and `contiguous` buffer-sharing heuristics, where either answer is
// correct (a donated buffer is written in place: the mapping is private copy-on-write, so that
// never reaches the file or another array). Valid only with the no_gpu allocator: the Rust side
// calls this on the CPU backend only and uses mlx-c's copying constructor elsewhere.
#include <cstdint>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/array.h"

#include "mlx/c/error.h"
#include "mlx/c/private/array.h"
#include "mlx/c/private/enums.h"

#include "zmlx_common.h"

namespace mx = mlx::core;

// *res = an array of `shape`/`dtype` reading `data` in place; `dtor(payload)` runs when MLX frees it.
// `data` must have 8 readable bytes before it (a safetensors tensor always does: the header).
// On failure `dtor(payload)` has run (or will, with the array) and the error is MLX's.
extern "C" int zmlx_cpu_array_over(mlx_array* res, void* data, const int* shape, int dim, mlx_dtype dtype,
                                   void* payload, void (*dtor)(void*)) {
  return zmlx_cpu::guarded([&] {
    mx::Shape s(shape, shape + dim);
    auto buf = mx::allocator::Buffer(static_cast<char*>(data) - sizeof(size_t));
    mx::array a(buf, std::move(s), mlx_dtype_to_cpp(dtype), [dtor, payload](mx::allocator::Buffer) { dtor(payload); });
    if (a.data<char>() != static_cast<char*>(data))
      throw std::runtime_error("zmlx: MLX's CPU buffer layout is not the one zmlx_mmap.cpp expects");
    mlx_array_set_(*res, std::move(a));
  });
}

// *res = a new, uninitialised, row-contiguous CPU array of `shape`/`dtype`; *data = its bytes,
// for the caller to fill before anything reads it (a tensor whose file bytes are not aligned to
// its element size is read into one: MLX's kernels assume element-aligned data).
extern "C" int zmlx_cpu_array_alloc(mlx_array* res, const int* shape, int dim, mlx_dtype dtype, void** data) {
  return zmlx_cpu::guarded([&] {
    mx::Shape s(shape, shape + dim);
    mx::Dtype d = mlx_dtype_to_cpp(dtype);
    size_t n = d.size();
    for (int i = 0; i < dim; ++i) n *= size_t(shape[i]);
    mx::array a(mx::allocator::malloc(n), std::move(s), d);
    *data = a.data<void>();
    mlx_array_set_(*res, std::move(a));
  });
}
