//! Lets zmlx's binaries, tests and benches find libmlx without LD_LIBRARY_PATH.
//! RUNPATH (not RPATH) so `LD_LIBRARY_PATH=<another libmlx>` (e.g. the CUDA build) still wins;
//! `$ORIGIN` lets a copied binary use a libmlx.so placed next to it.
fn main() {
    let libdir = std::env::var("DEP_MLX_LIBDIR").expect("mlx-sys publishes its libdir");
    println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{libdir}");
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN");
}
