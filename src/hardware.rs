//! What machine a result came from, for ledger lines and capsules.
use std::ffi::CStr;

use crate::mlx_env::Backend;

#[derive(Debug, Clone)]
pub struct Hardware {
    /// Ledger `hardware`: device name + memory, e.g. "AMD EPYC 7B13 24GB" or "NVIDIA H100 80GB HBM3 79GB".
    pub hardware: String,
    /// Device name alone.
    pub device: String,
    pub memory_gb: f64,
}

extern "C" {
    fn zmlx_cpu_threads() -> std::ffi::c_int;
}

/// Threads of zmlx's CPU kernel pool: `ZMLX_CPU_THREADS`, else the CPUs available (affinity, cgroup quota), ≤ 64.
/// MLX's own CPU ops run on one thread whatever this says.
/// This process's peak resident set size so far, in bytes: mapped checkpoint pages count once
/// touched, so it is the honest "memory of a run". On Linux the `VmHWM` of /proc/self/status
/// (the high-water mark of this address space), because `getrusage`'s `ru_maxrss` survives
/// `execve`: a process started by a large parent (a test harness, a Python driver) reports at
/// least the parent's size at fork. Elsewhere `ru_maxrss` (bytes on macOS).
pub fn peak_rss_bytes() -> u64 {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let hwm = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok());
        if let Some(kib) = hwm {
            return kib * 1024;
        }
    }
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    // ru_maxrss is KiB on Linux, bytes on macOS.
    let v = ru.ru_maxrss.max(0) as u64;
    if cfg!(target_os = "macos") {
        v
    } else {
        v * 1024
    }
}

pub fn kernel_threads() -> u32 {
    unsafe { zmlx_cpu_threads() }.max(1) as u32
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).trim().to_owned()))
}

fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 =
        info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// MLX's own name of the default device (the GPU's product name on CUDA).
fn mlx_device_info() -> (Option<String>, Option<u64>) {
    unsafe {
        let mut dev = mlx_sys::mlx_device_new();
        if mlx_sys::mlx_get_default_device(&mut dev) != 0 {
            return (None, None);
        }
        let mut info = mlx_sys::mlx_device_info_new();
        let mut name = None;
        let mut mem = None;
        if mlx_sys::mlx_device_info_get(&mut info, dev) == 0 {
            let mut s: *const std::ffi::c_char = std::ptr::null();
            if mlx_sys::mlx_device_info_get_string(&mut s, info, c"device_name".as_ptr()) == 0 && !s.is_null() {
                name = Some(CStr::from_ptr(s).to_string_lossy().into_owned());
            }
            // Metal reports `memory_size`, CUDA `total_memory`.
            for key in [c"memory_size", c"total_memory"] {
                let mut m: usize = 0;
                if mem.is_none() && mlx_sys::mlx_device_info_get_size(&mut m, info, key.as_ptr()) == 0 && m > 0 {
                    mem = Some(m as u64);
                }
            }
        }
        mlx_sys::mlx_device_info_free(info);
        mlx_sys::mlx_device_free(dev);
        (name, mem)
    }
}

pub fn describe(backend: Backend) -> Hardware {
    let (mlx_name, mlx_mem) = mlx_device_info();
    let (device, mem) = match backend {
        Backend::Cpu => (cpu_model().or(mlx_name), host_memory_bytes()),
        _ => (mlx_name, mlx_mem.or_else(host_memory_bytes)),
    };
    let device = device.unwrap_or_else(|| format!("unknown {} device", backend.name()));
    let gib = mem.unwrap_or(0) >> 30;
    Hardware { hardware: format!("{device} {gib}GB"), memory_gb: gib as f64, device }
}

#[cfg(test)]
mod tests {
    /// Unset, the pool is sized like Rust's `available_parallelism` (which also honours the
    /// affinity mask and cgroup CPU quotas), capped at 64; the test command unsets ZMLX_*.
    #[test]
    fn kernel_pool_sized_from_available_cpus() {
        if std::env::var_os("ZMLX_CPU_THREADS").is_some() {
            return;
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()).min(64) as u32;
        assert_eq!(super::kernel_threads(), cpus);
    }
}
