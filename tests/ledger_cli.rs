//! `zmlx run` / `history` / `report` / `diff` / `csv` end to end: a line written by the Python
//! original is read, shown and left byte-identical; every run (PASS or FAIL) appends one line.
mod common;

use std::path::Path;

use common::*;
use zmlx::config::Family;

const PYTHON_LINE: &str = r#"{"model_id":"mlx-community/GLM-4.7-Flash-4bit","model_family":"glm","architecture":"moe","patterns_applied":["moe_mlp","swiglu_mlp"],"hardware":"Apple M4 Max 36GB","notes":"Control: current best patch set (no RoPE fusion). capsule=benchmarks/repro_capsules/glm47_flash_control_m4max_20260205.json","macos_version":"26.1","mlx_version":"0.30.4.dev20260204+2f324cc","zmlx_version":"0.8.0","zmlx_commit":"c6df299","python_version":"3.14.2","custom_mlx":true,"timestamp":"2026-02-05T01:01:40.104915+00:00","fidelity":"PASS","fidelity_detail":"200/200 tokens identical","modules_patched":47,"decode_tps_baseline":86.6,"decode_tps_patched":92.4,"decode_speedup":1.067,"decode_runs_baseline":[86.4,86.6,86.8],"decode_runs_patched":[92.5,92.4,92.0],"prefill_tps_baseline":275.5,"prefill_tps_patched":279.4,"prefill_change":0.0142,"peak_mem_baseline_gb":16.91,"peak_mem_patched_gb":16.91,"max_tokens":200,"gen_tokens":200,"runs":3}"#;

fn zmlx(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let out = zmlx_cmd().current_dir(cwd).env_remove("ZMLX_LEDGER").args(args).output().unwrap();
    let (o, e) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(!e.contains("panicked"), "{e}");
    (out.status.code().unwrap_or(-1), o, e)
}

#[test]
fn run_records_and_history_reads_python_lines() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let model = w.join("qwen3-q4");
    {
        let _g = mlx_lock();
        synth_into(&model, &synth_opts(Family::Qwen3Moe, Some(4), 2));
    }
    let m = model.to_str().unwrap();
    std::fs::create_dir_all(w.join("benchmarks")).unwrap();
    let ledger = w.join("benchmarks/matrix.jsonl");
    std::fs::write(&ledger, format!("{PYTHON_LINE}\n")).unwrap();

    let (code, out, _) = zmlx(
        w,
        &[
            "run",
            m,
            "--patterns",
            "swiglu_mlp",
            "moe_mlp",
            "--runs",
            "1",
            "--max-tokens",
            "12",
            "--notes",
            "fused",
            "--capsule",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("[matrix] Result: PASS | decode "), "{out}");
    let (code, out, _) = zmlx(
        w,
        &[
            "run",
            m,
            "--patterns",
            "debug_drop_expert",
            "--allow-unsafe",
            "--runs",
            "1",
            "--max-tokens",
            "12",
            "--notes",
            "wrong on purpose",
        ],
    );
    assert_eq!(code, 1, "FAIL exits 1: {out}");
    // A pattern that does not apply to the family patches nothing: a SKIP line with the reason,
    // no speed ratio (the original's SKIP rows: zeros and prefill_change -1.0), exit 3.
    let (code, out, _) = zmlx(w, &["run", m, "--patterns", "glm47_rope", "--runs", "1", "--max-tokens", "12"]);
    assert_eq!(code, 3, "SKIP exits 3: {out}");
    assert!(out.contains("[matrix] Result: SKIP | SKIPPED: nothing patched"), "{out}");

    let text = std::fs::read_to_string(&ledger).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4);
    let skip: serde_json::Value = serde_json::from_str(lines.pop().unwrap()).unwrap();
    assert_eq!(skip["fidelity"], "SKIP");
    assert!(skip["fidelity_detail"].as_str().unwrap().contains("does not apply to the qwen3_moe family"), "{skip}");
    assert_eq!((skip["decode_speedup"].as_f64(), skip["prefill_change"].as_f64()), (Some(0.0), Some(-1.0)));
    assert_eq!(skip["gen_tokens"], 0);
    assert_eq!(lines[0], PYTHON_LINE, "the Python line is never rewritten");
    let ours: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(ours["fidelity"], "PASS");
    assert_eq!(ours["patterns_applied"], serde_json::json!(["moe_mlp", "swiglu_mlp"]));
    assert_eq!(ours["backend"], "cpu");
    assert_eq!(ours["libmlx_version"], "0.32.2");
    assert!(ours["capsule"].as_str().unwrap().starts_with("repro_capsules/"));
    // The original's keys come first, in its order; ours follow.
    let keys: Vec<&String> = ours.as_object().unwrap().keys().collect();
    assert_eq!(keys[0], "model_id");
    assert_eq!(keys[28], "runs");
    assert_eq!(keys[29], "backend");
    let fail: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
    assert_eq!(fail["fidelity"], "FAIL", "a failed run is still recorded");

    let (code, out, _) = zmlx(w, &["history"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("(4 entries)")
            && out.contains("Control: current best patch set")
            && out.contains("wrong on purpose"),
        "{out}"
    );
    let (_, out, _) = zmlx(w, &["history", "glm"]);
    assert!(out.contains("History for 'glm' (1 entries)"), "{out}");
    let (_, out, _) = zmlx(w, &["history", "--fidelity", "FAIL", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (code, _, err) = zmlx(w, &["history", "--plot", "decode.svg"]);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read_to_string(w.join("decode.svg")).unwrap().contains("<svg"));

    let capsule = std::fs::read_dir(w.join("repro_capsules")).unwrap().next().unwrap().unwrap().path();
    let (code, out, _) = zmlx(w, &["report", capsule.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("Fidelity") && out.contains("PASS"), "{out}");
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&capsule).unwrap()).unwrap();
    let variant = &raw["swiglu_mlp+moe_mlp"];
    assert_eq!(variant["baseline"]["token_ids"][0].as_array().unwrap().len(), 12, "raw token ids are kept");
    assert!(raw["meta"]["command_line"].as_array().unwrap().iter().any(|a| a == "--capsule"));

    let (_, out, _) = zmlx(w, &["csv"]);
    assert_eq!(out.lines().count(), 1 + 4, "header + latest per (model, hardware, patterns): {out}");
    let (code, out, _) = zmlx(w, &["diff", "benchmarks/matrix.jsonl", "benchmarks/matrix.jsonl"]);
    assert_eq!(code, 0);
    assert!(out.contains("+0.0%") || out.contains("0.0%"), "{out}");

    // A corrupt line is reported with its number; the rest still reads; nothing is rewritten.
    std::fs::write(&ledger, format!("{PYTHON_LINE}\n{{\"model_id\": \"torn\n{}\n", lines[1])).unwrap();
    let before = std::fs::read(&ledger).unwrap();
    let (code, out, err) = zmlx(w, &["history"]);
    assert_eq!(code, 0);
    assert!(err.contains("matrix.jsonl:2: skipped unreadable line"), "{err}");
    assert!(out.contains("(2 entries)"), "{out}");
    assert_eq!(std::fs::read(&ledger).unwrap(), before);
}
