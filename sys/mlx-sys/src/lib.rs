//! Raw bindings to mlx-c, generated at build time (see build.rs).
#![allow(non_upper_case_globals)]
#![allow(non_camel_case_types)]
#![allow(non_snake_case)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

/// MLX version this crate was compiled against (mlx-c's pinned tag), e.g. "0.32.2".
pub const MLX_BUILD_VERSION: &str = env!("ZMLX_MLX_BUILD_VERSION");
