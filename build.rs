//! 1. Lets zmlx's binaries, tests and benches find libmlx without LD_LIBRARY_PATH.
//!    RUNPATH (not RPATH) so `LD_LIBRARY_PATH=<another libmlx>` (e.g. the CUDA build) still wins;
//!    `$ORIGIN` lets a copied binary use a libmlx.so placed next to it. On macOS the same with
//!    `@loader_path` (Mach-O has no RUNPATH/new-dtags distinction). With a static libmlx (upstream
//!    mlx-sys on macOS publishes no libdir) there is nothing to find at run time.
//! 2. Compiles the CPU kernels (kernels/cpu/*.cpp: MLX primitives) against the same MLX headers,
//!    with the row kernels of the target architecture only (docs/building.md):
//!    x86-64: qmv_base (SSE2) + qmv_avx2 + qmv_avx512, chosen at run time;
//!    aarch64: qmv_base (scalar) + qmv_neon; anything else: qmv_base (scalar).
use std::env;

/// Row-kernel sources that only one architecture compiles (every other .cpp is portable).
const ARCH_ONLY: &[(&str, &str)] = &[
    ("qmv_avx2.cpp", "x86_64"),
    ("qmv_avx512.cpp", "x86_64"),
    ("qmv_neon.cpp", "aarch64"),
    ("qmv_fast_avx2.cpp", "x86_64"),
    ("qmv_fast_avx512.cpp", "x86_64"),
    ("qmv_fast_neon.cpp", "aarch64"),
    ("attend_fast_avx2.cpp", "x86_64"),
];

fn main() {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if let Ok(libdir) = env::var("DEP_MLX_LIBDIR") {
        match os.as_str() {
            "macos" | "ios" => {
                println!("cargo:rustc-link-arg=-Wl,-rpath,{libdir}");
                println!("cargo:rustc-link-arg=-Wl,-rpath,@loader_path");
            }
            "windows" => {}
            // ELF targets (GNU ld, gold, lld and mold all take --enable-new-dtags).
            _ => {
                println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags");
                println!("cargo:rustc-link-arg=-Wl,-rpath,{libdir}");
                println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN");
            }
        }
    }

    let include = env::var("DEP_MLX_INCLUDE").expect("mlx-sys publishes its include dirs");
    let mut build = cc::Build::new();
    // The `fast` (validated) kernels (qmv_fast*, attend_fast*) may contract a*b+c into FMAs: a
    // separate library.
    let mut fast = cc::Build::new();
    fast.cpp(true).std("c++20").opt_level(3).pic(true).warnings(false).flag("-ffp-contract=fast").flag("-Wno-psabi");
    // -ffp-contract=off everywhere else: GCC contracts a*b+c into an FMA by default on aarch64 (and
    // on x86-64 with an fma target), which would change the bits; where MLX's own libmlx is
    // fused (aarch64 quantized mat-vec) the kernels call fmaf explicitly instead.
    build.cpp(true).std("c++20").opt_level(3).pic(true).warnings(false).flag("-ffp-contract=off");
    for dir in env::split_paths(&include) {
        build.include(&dir);
        fast.include(&dir);
    }
    // Upstream mlx-sys (macOS) links MLX statically and says so (MLX_STATIC).
    if let Ok(defines) = env::var("DEP_MLX_DEFINES") {
        for d in defines.split([',', ';', ' ']).filter(|d| !d.is_empty()) {
            build.define(d, None);
        }
    }
    for entry in std::fs::read_dir("kernels/cpu").expect("kernels/cpu") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_none_or(|e| e != "cpp") {
            continue;
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if ARCH_ONLY.iter().any(|&(file, only)| file == name && only != arch) {
            continue;
        }
        println!("cargo:rerun-if-changed={}", path.display());
        if name.starts_with("qmv_fast") || name.starts_with("attend_fast") {
            fast.file(path);
        } else {
            build.file(path);
        }
    }
    fast.compile("zmlx_cpu_fast_kernels");
    build.compile("zmlx_cpu_kernels");
    println!("cargo:rerun-if-changed=kernels/cpu");
    // The MLX release built against, from mlx-sys's `version` metadata (ours and upstream's both
    // publish it), for code that must not depend on the stand-in's own constant.
    if let Ok(v) = env::var("DEP_MLX_VERSION") {
        println!("cargo:rustc-env=ZMLX_MLX_BUILD_VERSION={v}");
    }

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
