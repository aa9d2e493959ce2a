//! Every `ZMLX_*` environment variable zmlx reads, checked in one place. `check_env` runs at the
//! start of every command (and in `mlx_env::init` for library users): a value that is not valid
//! UTF-8, out of range or not one of the accepted words is an error naming the variable, the
//! value and what is accepted. Readers elsewhere go through `var`, which never panics.
use std::collections::BTreeMap;
use std::ffi::OsString;

use anyhow::{bail, Result};

/// A known variable: its name, what it accepts, and the check.
struct Known {
    name: &'static str,
    accepts: &'static str,
    check: fn(&str) -> bool,
}

fn switch(v: &str) -> bool {
    parse_switch(v).is_some()
}

fn threads(v: &str) -> bool {
    v.trim().parse::<u32>().is_ok_and(|n| (1..=MAX_THREADS).contains(&n))
}

fn gigabytes(v: &str) -> bool {
    v.trim().parse::<f64>().is_ok_and(|g| g.is_finite() && g > 0.0 && g <= 1e6)
}

fn isa(v: &str) -> bool {
    matches!(v.trim(), "base" | "avx2" | "avx512" | "neon")
}

fn combine_mode(v: &str) -> bool {
    matches!(v.trim(), "" | "auto" | "act" | "f32" | "f32_no_fma")
}

fn cuda_qmm(v: &str) -> bool {
    matches!(v.trim(), "deterministic" | "mlx" | "f32")
}

fn any_path(v: &str) -> bool {
    !v.trim().is_empty()
}

fn cross_rust(v: &str) -> bool {
    matches!(v.trim(), "" | "debian")
}

fn anything(_: &str) -> bool {
    true
}

/// Upper bound for `ZMLX_CPU_THREADS` (the kernels' worker pool never uses more).
pub const MAX_THREADS: u32 = 64;

const KNOWN: &[Known] = &[
    Known { name: "ZMLX_PATTERNS", accepts: "comma-separated pattern names or `none`", check: anything },
    Known { name: "ZMLX_LEDGER", accepts: "a ledger file path", check: anything },
    Known { name: "ZMLX_CPU_THREADS", accepts: "an integer from 1 to 64", check: threads },
    Known { name: "ZMLX_CPU_ISA", accepts: "base, avx2, avx512 (x86-64) or neon (aarch64)", check: isa },
    Known { name: "ZMLX_MEMORY_LIMIT_GB", accepts: "a number of GB > 0 (e.g. 60)", check: gigabytes },
    Known { name: "ZMLX_GPU_EXPERIMENTAL", accepts: "0 or 1", check: switch },
    Known { name: "ZMLX_DEBUG_FALLBACK", accepts: "0 or 1", check: switch },
    Known { name: "ZMLX_COMBINE_MODE", accepts: "auto, act, f32 or f32_no_fma", check: combine_mode },
    Known { name: "ZMLX_DUMP_DIR", accepts: "a directory path", check: any_path },
    Known { name: "ZMLX_DECODE_PIPELINE", accepts: "0 or 1", check: switch },
    Known { name: "ZMLX_CUDA_QMM", accepts: "deterministic, mlx or f32", check: cuda_qmm },
    // Read by the test suite and scripts, not by the library; listed so they are not "unknown".
    Known { name: "ZMLX_ORACLE_PYTHON", accepts: "a Python interpreter path", check: any_path },
    Known {
        name: "ZMLX_CUDA_CHECK_CUDA",
        accepts: "a CUDA wheel version (scripts/check_cuda_kernels.sh)",
        check: any_path,
    },
    Known { name: "ZMLX_CROSS_RUST", accepts: "debian (scripts/cross_aarch64.sh)", check: cross_rust },
    Known { name: "ZMLX_BIN", accepts: "a built zmlx binary (scripts/validate_fast.sh)", check: any_path },
    Known { name: "ZMLX_GPU_DIR", accepts: "the GPU staging directory (scripts/gpu/stage.sh)", check: any_path },
    // Build-time inputs (sys/mlx-sys/build.rs); harmless when set at run time.
    Known { name: "ZMLX_MLX_DIR", accepts: "an unpacked MLX wheel directory", check: any_path },
    Known { name: "ZMLX_MLXC_DIR", accepts: "an mlx-c source directory", check: any_path },
];

/// `1/true/on/yes` → true, `0/false/off/no` → false (case-insensitive, trimmed).
pub fn parse_switch(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Some(true),
        "0" | "false" | "off" | "no" => Some(false),
        _ => None,
    }
}

/// The `ZMLX_*` variables of an environment, as UTF-8; a non-UTF-8 value is an error (other
/// variables are never decoded, so a foreign non-UTF-8 variable cannot stop zmlx).
pub fn zmlx_vars_of(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (k, v) in vars {
        if !k.as_encoded_bytes().starts_with(b"ZMLX_") {
            continue;
        }
        let Some(key) = k.to_str() else {
            bail!("environment variable {} has a name that is not valid UTF-8; unset it", k.to_string_lossy());
        };
        let Some(value) = v.to_str() else {
            bail!("{key}={}: the value is not valid UTF-8; set it to plain text or unset it", v.to_string_lossy());
        };
        out.insert(key.to_owned(), value.to_owned());
    }
    Ok(out)
}

/// The process's `ZMLX_*` variables (see `zmlx_vars_of`).
pub fn zmlx_vars() -> Result<BTreeMap<String, String>> {
    zmlx_vars_of(std::env::vars_os())
}

/// One variable's value; `None` if unset or not UTF-8 (`check_env` has rejected the latter).
pub fn var(name: &str) -> Option<String> {
    std::env::var_os(name).and_then(|v| v.into_string().ok())
}

/// A switch variable: unset → `default`; set → its parsed value (`check_env` rejected others).
pub fn switch_var(name: &str, default: bool) -> bool {
    var(name).and_then(|v| parse_switch(&v)).unwrap_or(default)
}

/// Checks every `ZMLX_*` variable of `vars`. `pattern_switches` are the `ZMLX_<PATTERN>` names.
/// Returns warnings for unknown `ZMLX_*` names (probably typos), errors for bad values.
pub fn check_vars(vars: &BTreeMap<String, String>, pattern_switches: &[String]) -> Result<Vec<String>> {
    let mut warnings = vec![];
    for (k, v) in vars {
        if let Some(known) = KNOWN.iter().find(|x| x.name == k) {
            if !(known.check)(v) {
                bail!("{k}={v:?} is not accepted: expected {}", known.accepts);
            }
        } else if pattern_switches.iter().any(|s| s == k) {
            if !switch(v) {
                bail!("{k}={v:?} is not accepted: expected 0 or 1 (also true/false, on/off, yes/no)");
            }
        } else {
            warnings.push(format!("{k} is not a variable zmlx reads (known: {}, ZMLX_<PATTERN>)", known_names()));
        }
    }
    Ok(warnings)
}

fn known_names() -> String {
    KNOWN.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

/// Checks the process environment once per process (warnings go to stderr the first time).
pub fn check_env() -> Result<()> {
    static CHECKED: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    let outcome = CHECKED.get_or_init(|| {
        let vars = zmlx_vars().map_err(|e| e.to_string())?;
        let switches: Vec<String> = crate::patterns::registry().iter().map(|p| p.info().switch_var()).collect();
        for w in check_vars(&vars, &switches).map_err(|e| e.to_string())? {
            eprintln!("[zmlx] warning: {w}");
        }
        Ok(())
    });
    outcome.clone().map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn non_utf8_values_are_errors_only_for_zmlx_variables() {
        let bad = OsString::from_vec(vec![0xff, 0xfe]);
        let ok = zmlx_vars_of([(OsString::from("HOME_X"), bad.clone()), (OsString::from("ZMLX_LEDGER"), "a".into())]);
        assert_eq!(ok.unwrap().len(), 1, "a foreign non-UTF-8 variable is ignored");
        let e = zmlx_vars_of([(OsString::from("ZMLX_PATTERNS"), bad)]).unwrap_err().to_string();
        assert!(e.contains("ZMLX_PATTERNS") && e.contains("not valid UTF-8"), "{e}");
    }

    #[test]
    fn values_are_range_checked() {
        let sw = vec!["ZMLX_MOE_MLP".to_string()];
        for (k, v) in [
            ("ZMLX_CPU_THREADS", "0"),
            ("ZMLX_CPU_THREADS", "-2"),
            ("ZMLX_CPU_THREADS", "many"),
            ("ZMLX_CPU_THREADS", "100000"),
            ("ZMLX_MEMORY_LIMIT_GB", "inf"),
            ("ZMLX_MEMORY_LIMIT_GB", "-1"),
            ("ZMLX_MEMORY_LIMIT_GB", "NaN"),
            ("ZMLX_CPU_ISA", "sse9"),
            ("ZMLX_GPU_EXPERIMENTAL", "2"),
            ("ZMLX_MOE_MLP", "maybe"),
            ("ZMLX_COMBINE_MODE", "fast"),
        ] {
            let e = check_vars(&vars(&[(k, v)]), &sw).unwrap_err().to_string();
            assert!(e.contains(k) && e.contains("expected"), "{k}={v}: {e}");
        }
        let ok = vars(&[("ZMLX_CPU_THREADS", "2"), ("ZMLX_MEMORY_LIMIT_GB", "0.5"), ("ZMLX_MOE_MLP", "off")]);
        assert!(check_vars(&ok, &sw).unwrap().is_empty());
        let w = check_vars(&vars(&[("ZMLX_THREADS", "2")]), &sw).unwrap();
        assert!(w[0].contains("ZMLX_THREADS is not a variable zmlx reads"), "{w:?}");
    }
}
