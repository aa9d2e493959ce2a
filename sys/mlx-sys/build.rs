//! Builds mlx-c against a prebuilt libmlx from a PyPI wheel (Linux; macOS with the `mlx`
//! wheel's libmlx.dylib is the same layout, see docs/building.md).
//!
//! Inputs (fetched by `scripts/setup.sh`, never committed):
//! - mlx-c sources: `$ZMLX_MLXC_DIR` or `<repo>/.mlx/mlx-c-0.7.0`
//! - libmlx + headers: `$ZMLX_MLX_DIR` or `<repo>/.mlx/mlx-cpu-<tag>` (a wheel unpacked with
//!   `pip install --target`, so `mlx/lib/libmlx.so` and `mlx/include` exist). Cross builds
//!   (TARGET != HOST) default to `<repo>/.mlx/<arch>/mlx-cpu-<tag>` instead, the target's wheel
//!   (`scripts/cross_aarch64.sh` fetches the aarch64 one).
//!
//! mlx-c is always linked statically; libmlx dynamically. Dependents get the libmlx directory as
//! `DEP_MLX_LIBDIR` and add it as RUNPATH (a dependency's build script cannot do that for them).
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const MLX_SYS_VERSION: &str = "0.7.0";

fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    manifest.join("../..").canonicalize().unwrap_or(manifest)
}

fn fail(msg: &str) -> ! {
    eprintln!("\nerror: {msg}\n");
    std::process::exit(1);
}

/// libmlx's file name for the target OS.
fn libmlx_name() -> &'static str {
    match env::var("CARGO_CFG_TARGET_OS").as_deref() {
        Ok("macos") | Ok("ios") => "libmlx.dylib",
        _ => "libmlx.so",
    }
}

/// A cross build (TARGET != HOST) names the target's wheel directory: `.mlx/<arch>/`.
fn cross_arch() -> Option<String> {
    let (target, host) = (env::var("TARGET").ok()?, env::var("HOST").ok()?);
    (target != host).then(|| env::var("CARGO_CFG_TARGET_ARCH").unwrap_or(target))
}

/// Runs scripts/setup.sh once if the inputs are missing, so a plain `cargo build` works on a
/// fresh clone; an explicit env override is never "repaired", nor a cross build (its inputs come
/// from scripts/cross_aarch64.sh).
fn ensure_inputs(root: &Path, mlxc: &Path, mlx: &Path, overridden: bool) {
    let lib = format!("mlx/lib/{}", libmlx_name());
    let ok = |mlxc: &Path, mlx: &Path| mlxc.join("CMakeLists.txt").exists() && mlx.join(&lib).exists();
    if ok(mlxc, mlx) || overridden {
        return;
    }
    if let Some(arch) = cross_arch() {
        fail(&format!(
            "cross build for {arch}: libmlx for the target ({}) or the mlx-c sources ({}) are missing.\n\
             Run `bash scripts/cross_{arch}.sh` (fetches the {arch} mlx-cpu wheel into .mlx/{arch}/), \
             or set ZMLX_MLX_DIR to an unpacked MLX wheel of the target.",
            mlx.join(&lib).display(),
            mlxc.display()
        ));
    }
    let setup = root.join("scripts/setup.sh");
    println!("cargo:warning=MLX inputs missing; running {}", setup.display());
    let status = Command::new("bash").arg(&setup).status();
    if !matches!(status, Ok(s) if s.success()) || !ok(mlxc, mlx) {
        fail(&format!(
            "mlx-c sources ({}) or libmlx ({}) are missing and {} could not fetch them.\n\
             Run `bash scripts/setup.sh` (needs pip and crates.io access), or point \
             ZMLX_MLXC_DIR / ZMLX_MLX_DIR at existing copies.",
            mlxc.display(),
            mlx.join(&lib).display(),
            setup.display()
        ));
    }
}

/// mlx-c pins the exact MLX release it was written for (`GIT_TAG vX.Y.Z` in its CMakeLists).
fn mlxc_pinned_version(mlxc: &Path) -> String {
    let cmake = fs::read_to_string(mlxc.join("CMakeLists.txt"))
        .unwrap_or_else(|e| fail(&format!("cannot read {}/CMakeLists.txt: {e}", mlxc.display())));
    cmake
        .lines()
        .find_map(|l| l.trim().strip_prefix("GIT_TAG v").map(|t| t.trim_end_matches(')').trim().to_owned()))
        .unwrap_or_else(|| fail("mlx-c CMakeLists.txt has no `GIT_TAG v...` line"))
}

fn header_version(mlx: &Path) -> String {
    let path = mlx.join("mlx/include/mlx/version.h");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", path.display())));
    let get = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("#define {name} ")).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| fail(&format!("{} lacks {name}", path.display())))
    };
    format!("{}.{}.{}", get("MLX_VERSION_MAJOR"), get("MLX_VERSION_MINOR"), get("MLX_VERSION_PATCH"))
}

fn mlxc_sources(mlxc: &Path) -> Vec<PathBuf> {
    // The authoritative list is mlx-c's own CMake `set(mlxc-src ...)`; commented lines are skipped.
    let cmake = fs::read_to_string(mlxc.join("CMakeLists.txt")).unwrap();
    let block = cmake
        .split("set(mlxc-src")
        .nth(1)
        .and_then(|b| b.split(')').next())
        .unwrap_or_else(|| fail("mlx-c CMakeLists.txt has no set(mlxc-src ...) block"));
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| mlxc.join(l.trim_start_matches("${CMAKE_CURRENT_LIST_DIR}/")))
        .collect()
}

fn main() {
    let root = repo_root();
    println!("cargo:rerun-if-env-changed=ZMLX_MLX_DIR");
    println!("cargo:rerun-if-env-changed=ZMLX_MLXC_DIR");
    let shim = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("shim");
    println!("cargo:rerun-if-changed={}", shim.display());

    let mlxc = env::var_os("ZMLX_MLXC_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(format!(".mlx/mlx-c-{MLX_SYS_VERSION}")));
    // The wheel version is derived from mlx-c's pin, so there is one place that names it.
    let probe_tag = if mlxc.join("CMakeLists.txt").exists() { mlxc_pinned_version(&mlxc) } else { "0.32.2".into() };
    let overridden = env::var_os("ZMLX_MLX_DIR").is_some() || env::var_os("ZMLX_MLXC_DIR").is_some();
    let wheels = match cross_arch() {
        Some(arch) => root.join(".mlx").join(arch),
        None => root.join(".mlx"),
    };
    let mlx =
        env::var_os("ZMLX_MLX_DIR").map(PathBuf::from).unwrap_or_else(|| wheels.join(format!("mlx-cpu-{probe_tag}")));
    ensure_inputs(&root, &mlxc, &mlx, overridden);

    let pinned = mlxc_pinned_version(&mlxc);
    let found = header_version(&mlx);
    if pinned != found {
        fail(&format!(
            "libmlx at {} is MLX {found}, but mlx-c {MLX_SYS_VERSION} needs exactly MLX {pinned} \
             (signatures and symbols differ between patch releases).\n\
             Fix: `python3 -m pip install --no-deps --target .mlx/mlx-cpu-{pinned} mlx-cpu=={pinned}` \
             (or run scripts/setup.sh), or set ZMLX_MLX_DIR to an MLX {pinned} wheel directory.",
            mlx.display()
        ));
    }
    let include = mlx.join("mlx/include");
    let libdir = mlx.join("mlx/lib").canonicalize().unwrap();

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .include(&mlxc)
        .include(&include)
        .flag("-include")
        .flag(shim.join("compat.h").to_str().unwrap())
        .flag_if_supported("-Wno-return-type-c-linkage")
        .warnings(false)
        .pic(true)
        // mlx-c is a thin wrapper; optimise it even in debug builds so tests are not slowed down.
        .opt_level(2)
        .files(mlxc_sources(&mlxc));
    build.compile("mlxc");
    // mach_approximate_time() for mlx-rs; Apple targets have the real one.
    if !matches!(env::var("CARGO_CFG_TARGET_OS").as_deref(), Ok("macos") | Ok("ios")) {
        cc::Build::new().file(shim.join("mach_time.c")).pic(true).opt_level(2).compile("zmlx_mach_time");
    }

    println!("cargo:rustc-link-search=native={}", libdir.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    println!("cargo:libdir={}", libdir.display());
    println!("cargo:include={}:{}", include.display(), mlxc.display());
    println!("cargo:version={pinned}");
    println!("cargo:rustc-env=ZMLX_MLX_BUILD_VERSION={pinned}");

    let mut headers: Vec<PathBuf> = fs::read_dir(mlxc.join("mlx/c"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "h"))
        .collect();
    headers.sort();
    let bindings = headers
        .iter()
        .fold(
            bindgen::Builder::default()
                .rust_target("1.73.0".parse().expect("rust-version"))
                .clang_arg(format!("-I{}", mlxc.display()))
                .clang_arg("-include")
                .clang_arg(shim.join("bindgen_compat.h").to_str().unwrap())
                .blocklist_function("malloc")
                .blocklist_function("realloc"),
            |b, h| b.header(h.to_string_lossy()),
        )
        .generate()
        .unwrap_or_else(|e| fail(&format!("bindgen failed on mlx-c headers: {e}")));
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    bindings.write_to_file(out.join("bindings.rs")).expect("write bindings.rs");
}
