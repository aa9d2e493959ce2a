//! Process-wide MLX set-up: error reporting for raw mlx-c calls, the libmlx version check,
//! and which backend (CPU / CUDA / Metal) the loaded libmlx runs on.
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Once;

use anyhow::{bail, Result};
use mlx_rs::error::Exception;
use mlx_rs::{Array, Stream};

thread_local!(static LAST_ERR: RefCell<Option<String>> = const { RefCell::new(None) });

extern "C" {
    /// mlx-rs's own handler (`#[no_mangle]`): it stashes the message its wrappers report.
    fn default_mlx_error_handler(msg: *const c_char, data: *mut c_void);
}

unsafe extern "C" fn record_error(msg: *const c_char, data: *mut c_void) {
    let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned();
    LAST_ERR.with(|e| *e.borrow_mut() = Some(text));
    // Chain, so errors from mlx-rs's own ops keep their MLX message too.
    unsafe { default_mlx_error_handler(msg, data) };
}

static INIT: Once = Once::new();

/// Installs our error handler (mlx-c's default one calls `exit`). mlx-rs installs its own lazily
/// on first use, so we first trigger that and then install ours on top; ours records the message
/// for raw calls and forwards it to mlx-rs's, so both kinds of call report MLX's own text.
fn install_error_handler() {
    INIT.call_once(|| {
        let _ = mlx_rs::memory::active_memory();
        unsafe { mlx_sys::mlx_set_error_handler(Some(record_error), std::ptr::null_mut(), None) };
    });
}

/// Runs a raw mlx-c function that produces one array, on the current stream.
pub fn raw_array(
    f: impl FnOnce(*mut mlx_sys::mlx_array, mlx_sys::mlx_stream) -> c_int,
) -> std::result::Result<Array, Exception> {
    install_error_handler();
    let stream = Stream::thread_local_or_default();
    let mut res = unsafe { mlx_sys::mlx_array_new() };
    if f(&mut res, stream.as_ptr()) != 0 {
        unsafe { mlx_sys::mlx_array_free(res) };
        let msg = LAST_ERR.with(|e| e.borrow_mut().take());
        return Err(Exception::custom(msg.unwrap_or_else(|| "mlx-c call failed".into())));
    }
    Ok(unsafe { Array::from_ptr(res) })
}

/// The message of the last failed raw mlx-c call on this thread.
pub fn take_last_error() -> String {
    LAST_ERR.with(|e| e.borrow_mut().take()).unwrap_or_else(|| "unknown MLX error".into())
}

/// The version string of the libmlx actually loaded at run time.
pub fn runtime_mlx_version() -> String {
    install_error_handler();
    unsafe {
        let mut s = mlx_sys::mlx_string_new();
        mlx_sys::mlx_version(&mut s);
        let v = CStr::from_ptr(mlx_sys::mlx_string_data(s)).to_string_lossy().into_owned();
        mlx_sys::mlx_string_free(s);
        v
    }
}

/// MLX version zmlx was compiled against (mlx-c's pin).
pub const BUILD_MLX_VERSION: &str = mlx_sys::MLX_BUILD_VERSION;
/// mlx-rs version, for ledgers and reports.
pub const MLX_RS_VERSION: &str = "0.33.0";

/// Refuses a libmlx whose version differs from the one mlx-c was written for.
pub fn check_version() -> Result<()> {
    check_version_of(&runtime_mlx_version(), BUILD_MLX_VERSION)
}

fn check_version_of(found: &str, built: &str) -> Result<()> {
    let base = found.split(".dev").next().unwrap_or(found);
    if base != built {
        bail!(
            "the loaded libmlx is MLX {found}, but zmlx was built for MLX {built} \
             (mlx-c 0.7.0 pins it exactly).\nFix: unset LD_LIBRARY_PATH or point it at an MLX \
             {built} libmlx (pip package mlx-cpu=={built} or mlx-cuda-13=={built}), or rebuild \
             after `bash scripts/setup.sh`."
        );
    }
    Ok(())
}

/// The backend of the loaded libmlx, detected once (fixed for the process). Stock layers and
/// kernels both ask here, so neither depends on the other for it.
pub fn backend() -> Backend {
    static B: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();
    *B.get_or_init(Backend::detect)
}

/// The backend the default device runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Cpu,
    Cuda,
    Metal,
}

impl Backend {
    pub fn detect() -> Backend {
        install_error_handler();
        let (mut cuda, mut metal) = (false, false);
        unsafe {
            mlx_sys::mlx_cuda_is_available(&mut cuda);
            mlx_sys::mlx_metal_is_available(&mut metal);
        }
        match (cuda, metal) {
            (true, _) => Backend::Cuda,
            (_, true) => Backend::Metal,
            _ => Backend::Cpu,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::Metal => "metal",
        }
    }
}

/// `ZMLX_MEMORY_LIMIT_GB`: caps MLX's allocator (on CUDA, managed memory must never over-ask).
pub const MEMORY_LIMIT_VAR: &str = "ZMLX_MEMORY_LIMIT_GB";

/// One-time process set-up; call before any model work.
pub fn init() -> Result<Backend> {
    install_error_handler();
    check_version()?;
    crate::settings::check_env()?;
    if let Some(v) = crate::settings::var(MEMORY_LIMIT_VAR) {
        // check_env accepted it: a finite number of GB > 0.
        let gb: f64 = v.trim().parse()?;
        mlx_rs::memory::set_memory_limit((gb * 1e9) as usize)?;
    }
    let backend = Backend::detect();
    if let Some(value) = cudnn_sdpa_default(backend, std::env::var_os(CUDNN_SDPA_VAR).as_deref()) {
        // Before any SDPA call: MLX reads the variable once, into a static, at its first one.
        std::env::set_var(CUDNN_SDPA_VAR, value);
    }
    Ok(backend)
}

/// MLX's switch for cuDNN's fused attention on CUDA (default on in MLX 0.32.2).
pub const CUDNN_SDPA_VAR: &str = "MLX_CUDA_USE_CUDNN_SDPA";

/// What zmlx sets `MLX_CUDA_USE_CUDNN_SDPA` to when the user did not: "0" on CUDA. cuDNN 9.19's
/// sm90 flash-attention forward kernel has a shared-memory race (compute-sanitizer racecheck, H200
/// 2026-11-30), and with it greedy decode differs between processes; MLX's own attention kernels
/// are deterministic and were faster on the full-size Qwen3 shape (prefill 1020 vs 809 tok/s).
/// A value the user set is kept (setting it to 1 opts back in).
pub fn cudnn_sdpa_default(backend: Backend, current: Option<&std::ffi::OsStr>) -> Option<&'static str> {
    (backend == Backend::Cuda && current.is_none()).then_some("0")
}

/// Memory statistics in MLX's definitions (bytes).
pub fn peak_memory() -> usize {
    mlx_rs::memory::peak_memory().unwrap_or(0)
}

pub fn reset_peak_memory() {
    let _ = mlx_rs::memory::reset_peak_memory();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_libmlx_is_the_pinned_version() {
        assert_eq!(runtime_mlx_version(), BUILD_MLX_VERSION);
        check_version().unwrap();
    }

    #[test]
    fn cudnn_sdpa_is_turned_off_on_cuda_unless_the_user_chose() {
        use std::ffi::OsStr;
        assert_eq!(cudnn_sdpa_default(Backend::Cuda, None), Some("0"));
        assert_eq!(cudnn_sdpa_default(Backend::Cuda, Some(OsStr::new("1"))), None, "the user's choice stays");
        assert_eq!(cudnn_sdpa_default(Backend::Cpu, None), None);
        assert_eq!(cudnn_sdpa_default(Backend::Metal, None), None);
    }

    #[test]
    fn other_versions_are_refused_with_the_fix() {
        check_version_of("0.32.2", "0.32.2").unwrap();
        check_version_of("0.32.2.dev20260101+abc", "0.32.2").unwrap();
        let err = check_version_of("0.32.4", "0.32.2").unwrap_err().to_string();
        assert!(err.contains("MLX 0.32.4") && err.contains("built for MLX 0.32.2"), "{err}");
        assert!(err.contains("mlx-cpu==0.32.2"), "the message says how to get the right one: {err}");
    }

    #[test]
    fn mlx_rs_op_errors_keep_the_mlx_message() {
        install_error_handler();
        let a = Array::from_slice(&[1.0f32, 2.0, 3.0], &[1, 3]);
        let err = a.matmul(&a).unwrap_err();
        assert!(!err.what().contains("failed with status"), "message lost: {}", err.what());
        assert!(err.what().contains("matmul"), "{}", err.what());
    }

    #[test]
    fn raw_calls_return_errors_instead_of_exiting() {
        let a = Array::from_slice(&[1.0f32, 2.0], &[2]);
        let b = Array::from_slice(&[1.0f32, 2.0, 3.0], &[3]);
        let err = raw_array(|res, s| unsafe { mlx_sys::mlx_add(res, a.as_ptr(), b.as_ptr(), s) }).unwrap_err();
        assert!(err.what().contains("broadcast"), "{}", err.what());
    }
}
