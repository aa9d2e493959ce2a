//! Raw bindings to mlx-c, generated at build time (see build.rs).
#![allow(non_upper_case_globals)]
#![allow(non_camel_case_types)]
#![allow(non_snake_case)]
#![allow(clippy::all)]

// `raw::mlx_pad` is shadowed below (unused, and of another pointer type on aarch64 Linux).
#[allow(dead_code, clashing_extern_declarations)]
mod raw {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}
pub use raw::*;

// mlx-rs 0.33.0 passes mlx_pad's `mode` as `*const i8` (c_char on x86-64 and on Apple's arm64),
// but c_char is u8 on aarch64 Linux, so the generated declaration would not type-check there.
// This explicit item shadows the glob-exported one; the C signature is the same on every target.
#[allow(clashing_extern_declarations)]
extern "C" {
    pub fn mlx_pad(
        res: *mut mlx_array,
        a: mlx_array,
        axes: *const ::std::os::raw::c_int,
        axes_num: usize,
        low_pad_size: *const ::std::os::raw::c_int,
        low_pad_size_num: usize,
        high_pad_size: *const ::std::os::raw::c_int,
        high_pad_size_num: usize,
        pad_value: mlx_array,
        mode: *const i8,
        s: mlx_stream,
    ) -> ::std::os::raw::c_int;
}

/// MLX version this crate was compiled against (mlx-c's pinned tag), e.g. "0.32.2".
pub const MLX_BUILD_VERSION: &str = env!("ZMLX_MLX_BUILD_VERSION");
