//! 1. Lets zmlx's binaries, tests and benches find libmlx without LD_LIBRARY_PATH.
//!    RUNPATH (not RPATH) so `LD_LIBRARY_PATH=<another libmlx>` (e.g. the CUDA build) still wins;
//!    `$ORIGIN` lets a copied binary use a libmlx.so placed next to it.
//! 2. Compiles the CPU kernels (kernels/cpu/*.cpp: MLX primitives) against the same MLX headers.
fn main() {
    let libdir = std::env::var("DEP_MLX_LIBDIR").expect("mlx-sys publishes its libdir");
    println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{libdir}");
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN");

    let include = std::env::var("DEP_MLX_INCLUDE").expect("mlx-sys publishes its include dirs");
    let mut build = cc::Build::new();
    build.cpp(true).std("c++20").opt_level(3).pic(true).warnings(false).flag("-ffp-contract=off");
    for dir in include.split(':') {
        build.include(dir);
    }
    for entry in std::fs::read_dir("kernels/cpu").expect("kernels/cpu") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "cpp") {
            println!("cargo:rerun-if-changed={}", path.display());
            build.file(path);
        }
    }
    build.compile("zmlx_cpu_kernels");
    println!("cargo:rerun-if-changed=kernels/cpu");

    // 3. The commit ledger lines and capsules record ("unknown" outside a git checkout).
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let mut commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    if git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
        commit.push_str("+dirty");
    }
    println!("cargo:rustc-env=ZMLX_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/index");
}
