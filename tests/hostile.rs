//! Hostile input for every subcommand: bad flags, bad environment, bad files, bad configs, closed
//! pipes. Rule: zmlx never panics (exit code 101 or "panicked" on stderr); bad input exits 2
//! with a message that names the flag, variable, file or key at fault.
mod common;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;
use zmlx::config::Family;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts no panic and returns (exit code, stderr).
fn no_panic(what: &str, out: &Output) -> (Option<i32>, String) {
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(101), "{what}: exit 101 is a panic\n{err}");
    assert!(!err.contains("panicked"), "{what}: panicked\n{err}");
    (out.status.code(), err)
}

/// Runs `cmd` and asserts exit 2 with every `needles` substring on stderr.
fn rejected(what: &str, cmd: &mut Command, needles: &[&str]) {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let (code, err) = no_panic(what, &out);
    assert_eq!(code, Some(2), "{what}: bad input exits 2; stderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{what}: stderr should mention {n:?}:\n{err}");
    }
}

fn zmlx(args: &[&str]) -> Command {
    let mut c = zmlx_cmd();
    c.args(args);
    c
}

#[test]
fn every_subcommand_with_bad_flags_exits_2_without_panicking() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["generate"], &["--model"]),
        (&["generate", "--model", "/x", "--temp=-1"], &["--temp", ">= 0"]),
        (&["generate", "--model", "/x", "--temp", "nan"], &["--temp", "finite"]),
        (&["generate", "--model", "/x", "--temp", "inf"], &["--temp"]),
        (&["generate", "--model", "/x", "--top-p", "0"], &["--top-p", "(0, 1]"]),
        (&["generate", "--model", "/x", "--top-p", "1.5"], &["--top-p"]),
        (&["generate", "--model", "/x", "--top-p", "NaN"], &["--top-p"]),
        (&["generate", "--model", "/x", "--max-tokens", "0"], &["--max-tokens", "at least 1"]),
        (&["generate", "--model", "/x", "--max-tokens=-3"], &["--max-tokens"]),
        (&["generate", "--model", "/x", "--dtype", "f64"], &["--dtype"]),
        (&["generate", "--model", "/x", "--warmup", "101"], &["--warmup", "0 to 100"]),
        (&["generate", "--model", "/x", "--seed", "x"], &["--seed"]),
        (&["validate", "/x", "--cooldown", "inf"], &["--cooldown", "finite"]),
        (&["validate", "/x", "--cooldown=-1"], &["--cooldown", "between 0 and"]),
        (&["validate", "/x", "--cooldown", "1e9"], &["--cooldown"]),
        (&["validate", "/x", "--runs", "0"], &["--runs", "at least 1"]),
        (&["validate", "/x", "--max-tokens", "0"], &["--max-tokens"]),
        (&["validate", "/x", "--arbiter", "f16"], &["--arbiter"]),
        (&["run", "/x", "--cooldown", "NaN"], &["--cooldown"]),
        (&["run", "/x", "--warmup=-1"], &["--warmup"]),
        (&["validate", "/x", "--warmup", "1000000"], &["--warmup", "0 to 100"]),
        (&["profile", "/x", "--tokens", "0"], &["--tokens"]),
        (&["profile", "/x", "--prefill", "0"], &["--prefill", "1 to 100"]),
        (&["profile", "/x", "--prefill", "many"], &["--prefill", "1 to 100"]),
        (&["synth", "--family", "llama", "--out", "/tmp/x"], &["unknown family `llama`"]),
        (
            &["synth", "--family", "mixtral", "--out", "/tmp/x", "--quantize", "7"],
            &["--quantize", "2, 3, 4, 5, 6 or 8"],
        ),
        (&["synth", "--family", "mixtral", "--out", "/tmp/x", "--group-size", "48"], &["--group-size"]),
        (&["synth", "--family", "mixtral", "--out", "/tmp/x", "--max-shard-mb", "0"], &["--max-shard-mb"]),
        (
            &["synth", "--family", "mixtral", "--out", "/tmp/x", "--max-shard-mb", "99999999999999999"],
            &["--max-shard-mb"],
        ),
        (&["history", "--since", "yesterday"], &["yesterday"]),
        (&["history", "--fidelity", "MAYBE"], &["--fidelity"]),
        (&["report"], &["CAPSULE"]),
        (&["diff", "/x"], &["<B>"]),
        (&["demo", "--max-tokens", "0"], &["--max-tokens"]),
        (&["patterns", "--bogus"], &["--bogus"]),
        (&["nonsense"], &["nonsense"]),
        (&["serve"], &["--model"]),
        (&["serve", "--model", "/x", "--port", "70000"], &["--port"]),
        (&["serve", "--model", "/x", "--port=-1"], &["--port"]),
        (&["serve", "--model", "/x", "--max-concurrency", "0"], &["--max-concurrency", "1..=1024"]),
        (&["serve", "--model", "/x", "--max-concurrency", "5000"], &["--max-concurrency"]),
        (&["serve", "--model", "/x", "--max-queue", "lots"], &["--max-queue"]),
        (&["serve", "--model", "/x", "--max-tokens-limit", "0"], &["--max-tokens-limit", "at least 1"]),
        (&["serve", "--model", "/x", "--drain-timeout", "0"], &["--drain-timeout"]),
        (&["serve", "--model", "/x", "--api-key", " "], &["--api-key", "empty"]),
        (&["serve", "--model", "/x", "--model-id", ""], &["--model-id", "empty"]),
        (&["serve", "--model", "/nonexistent/dir"], &["--model", "config.json"]),
    ];
    for (args, needles) in cases {
        rejected(&args.join(" "), &mut zmlx(args), needles);
    }
}

#[test]
fn bad_environment_is_named_never_a_panic() {
    let bad = OsString::from_vec(vec![b'o', 0xff, 0xfe]);
    // A non-UTF-8 ZMLX_ value: a clear error, for commands with and without a model.
    for args in [&["patterns"][..], &["generate", "--model", "/nonexistent"], &["history", "--ledger", "/nonexistent"]]
    {
        let mut c = zmlx(args);
        c.env("ZMLX_PATTERNS", &bad);
        rejected("non-UTF-8 ZMLX_PATTERNS", &mut c, &["ZMLX_PATTERNS", "not valid UTF-8"]);
    }
    // Someone else's non-UTF-8 variable is none of zmlx's business.
    let out = zmlx(&["patterns"]).env("SOME_OTHER_TOOL", &bad).output().unwrap();
    let (code, err) = no_panic("foreign non-UTF-8 variable", &out);
    assert_eq!(code, Some(0), "{err}");
    for (var, value) in [
        ("ZMLX_CPU_THREADS", "0"),
        ("ZMLX_CPU_THREADS", "lots"),
        ("ZMLX_CPU_THREADS", "1000000"),
        ("ZMLX_MEMORY_LIMIT_GB", "inf"),
        ("ZMLX_MEMORY_LIMIT_GB", "-4"),
        ("ZMLX_CPU_ISA", "avx1024"),
        ("ZMLX_GPU_EXPERIMENTAL", "2"),
        ("ZMLX_DEBUG_FALLBACK", "sure"),
        ("ZMLX_DECODE_PIPELINE", "off-ish"),
        ("ZMLX_CUDA_QMM", "fast"),
        ("ZMLX_SWIGLU_MLP", "maybe"),
        ("ZMLX_COMBINE_MODE", "fastest"),
    ] {
        let mut c = zmlx(&["patterns"]);
        c.env(var, value);
        rejected(&format!("{var}={value}"), &mut c, &[var, "expected"]);
    }
    // Unknown ZMLX_ names are probably typos: warned about, not fatal.
    let out = zmlx(&["patterns"]).env("ZMLX_THREADS", "2").output().unwrap();
    let (code, err) = no_panic("unknown ZMLX_ variable", &out);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("ZMLX_THREADS is not a variable zmlx reads"), "{err}");
}

#[test]
fn missing_and_foreign_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.jsonl");
    let m = missing.to_str().unwrap();
    rejected("history on a missing ledger", &mut zmlx(&["history", "--ledger", m]), &["no ledger at", m]);
    rejected("csv on a missing ledger", &mut zmlx(&["csv", "--ledger", m]), &["no ledger at", m]);
    rejected("diff on a missing ledger", &mut zmlx(&["diff", m, m]), &["no ledger at", m]);
    // ZMLX_LEDGER pointing nowhere is the same error.
    let mut c = zmlx(&["history"]);
    c.env("ZMLX_LEDGER", &missing);
    rejected("history via ZMLX_LEDGER", &mut c, &["no ledger at"]);
    rejected("history on a directory", &mut zmlx(&["history", "--ledger", dir.path().to_str().unwrap()]), &["ledger"]);

    let write = |name: &str, body: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.to_str().unwrap().to_owned()
    };
    for (name, body) in [
        ("obj.json", &b"{\"a\": 1}"[..]),
        ("list.json", b"[1, 2]"),
        ("str.json", b"\"capsule\""),
        ("meta-only.json", b"{\"meta\": {}}"),
        ("binary.json", &[0u8, 159, 146, 150, 255]),
        ("empty.json", b""),
        ("ledger-line.json", b"{\"model_id\":\"x\",\"runs\":3}\n{\"model_id\":\"y\"}\n"),
    ] {
        let p = write(name, body);
        rejected(&format!("report on {name}"), &mut zmlx(&["report", &p]), &["capsule", &p]);
    }
    rejected("report on a missing file", &mut zmlx(&["report", m]), &[m]);
    rejected("report on a directory", &mut zmlx(&["report", dir.path().to_str().unwrap()]), &["capsule"]);
}

/// A ledger with many distinct lines, so the output is far larger than a pipe's buffer.
fn big_ledger(dir: &Path) -> String {
    let mut text = String::new();
    for i in 0..3000 {
        text.push_str(&format!(
            "{{\"model_id\":\"org/model-{i}\",\"hardware\":\"cpu\",\"timestamp\":\"2026-11-01T00:00:00+00:00\",\
             \"fidelity\":\"PASS\",\"decode_tps_baseline\":1.0,\"decode_tps_patched\":2.0,\"decode_speedup\":2.0,\
             \"notes\":\"{}\"}}\n",
            "n".repeat(100)
        ));
    }
    let p = dir.join("big.jsonl");
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = big_ledger(dir.path());
    for args in [
        vec!["history", "--ledger", &ledger],
        vec!["history", "--ledger", &ledger, "--json"],
        vec!["csv", "--ledger", &ledger],
        vec!["diff", &ledger, &ledger],
        vec!["patterns", "--json"],
    ] {
        // `zmlx … | head -0`: the reader is gone before zmlx writes.
        let mut child = zmlx(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let (code, err) = no_panic(&args.join(" "), &out);
        assert!(
            code == Some(0) || out.status.signal() == Some(libc::SIGPIPE),
            "{}: a closed pipe ends the process quietly (status {:?}); stderr:\n{err}",
            args.join(" "),
            out.status
        );
    }
}

fn tiny(family: Family, quantize: Option<i32>) -> tempfile::TempDir {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(family, quantize, 0));
    dir
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn generate_rejects(dir: &Path, extra: &[&str], needles: &[&str]) {
    let mut c = zmlx(&["generate", "--max-tokens", "2", "--model", dir.to_str().unwrap()]);
    c.args(extra);
    rejected(&format!("generate {extra:?}"), &mut c, needles);
}

#[test]
fn nonsense_config_values_are_rejected_with_file_key_and_range() {
    let d = tiny(Family::Mixtral, None);
    let cfg = d.path().join("config.json");
    let original = std::fs::read_to_string(&cfg).unwrap();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("num_key_value_heads", 0.into(), "`num_key_value_heads` must be a positive integer"),
        ("num_key_value_heads", (-2).into(), "`num_key_value_heads` must be a positive integer"),
        ("num_attention_heads", 0.into(), "`num_attention_heads` must be a positive integer"),
        ("hidden_size", 0.into(), "`hidden_size` must be a positive integer"),
        ("rms_norm_eps", 0.into(), "`rms_norm_eps` must be a number > 0"),
        ("rms_norm_eps", (-1e-5).into(), "`rms_norm_eps` must be a number > 0"),
        ("rope_theta", 0.into(), "`rope_theta` must be a number > 0"),
        ("rope_theta", "big".into(), "`rope_theta` must be a number"),
        ("num_experts_per_tok", 99.into(), "num_experts_per_tok (99) must be between 1 and the number of experts"),
        ("num_experts_per_tok", 0.into(), "`num_experts_per_tok` must be a positive integer"),
        ("num_local_experts", 0.into(), "`num_local_experts` must be a positive integer"),
        ("vocab_size", 0.into(), "`vocab_size` must be a positive integer"),
        ("vocab_size", 4_000_000_000u64.into(), "fits in i32"),
        ("eos_token_id", "two".into(), "`eos_token_id` must be a token id"),
        ("eos_token_id", (-1).into(), "`eos_token_id` must be a token id"),
        ("eos_token_id", serde_json::json!([2, "x"]), "`eos_token_id` must be a token id"),
        ("max_position_embeddings", 0.into(), "`max_position_embeddings`"),
    ];
    for (key, value, want) in cases {
        std::fs::write(&cfg, &original).unwrap();
        edit_json(&cfg, |c| c[key] = value.clone());
        generate_rejects(d.path(), &[], &["config.json", want]);
    }
    // Heads that do not divide the hidden size (Mixtral derives head_dim from them).
    std::fs::write(&cfg, &original).unwrap();
    edit_json(&cfg, |c| {
        c["num_attention_heads"] = 6.into();
        c["num_key_value_heads"] = 3.into();
    });
    generate_rejects(d.path(), &[], &["hidden_size", "must be a multiple of num_attention_heads (6)"]);
    // A tokenizer with an id past the embedding rows: such an id must never reach the gather.
    std::fs::write(&cfg, &original).unwrap();
    let vocab = serde_json::from_str::<serde_json::Value>(&original).unwrap()["vocab_size"].as_u64().unwrap();
    edit_json(&d.path().join("tokenizer.json"), |t| {
        t["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({"id": vocab, "content": "<zmlx-extra>",
            "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    });
    generate_rejects(d.path(), &[], &["tokenizer.json", &format!("has id {vocab}"), "vocab_size"]);
}

#[test]
fn sigmoid_family_config_ranges() {
    let d = tiny(Family::Glm4Moe, None);
    let cfg = d.path().join("config.json");
    let original = std::fs::read_to_string(&cfg).unwrap();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("partial_rotary_factor", 1.5.into(), "must be even and between 2 and head_dim"),
        ("partial_rotary_factor", 0.into(), "`partial_rotary_factor` must be a number > 0"),
        ("routed_scaling_factor", (-1.0).into(), "`routed_scaling_factor` must be a number > 0"),
        ("first_k_dense_replace", (-1).into(), "`first_k_dense_replace` must be an integer >= 0"),
        ("n_shared_experts", (-1).into(), "`n_shared_experts` must be an integer >= 0"),
        ("n_group", 0.into(), "`n_group` must be a positive integer"),
    ];
    for (key, value, want) in cases {
        std::fs::write(&cfg, &original).unwrap();
        edit_json(&cfg, |c| c[key] = value.clone());
        generate_rejects(d.path(), &[], &["config.json", want]);
    }
}

#[test]
fn packed_weights_without_a_quantization_block_say_so() {
    let d = tiny(Family::Qwen3Moe, Some(4));
    edit_json(&d.path().join("config.json"), |c| {
        let o = c.as_object_mut().unwrap();
        o.remove("quantization");
        o.remove("quantization_config");
    });
    generate_rejects(d.path(), &[], &["is quantized", "no `quantization`", "\"bits\": 4"]);
}

#[test]
fn bad_run_inputs_on_a_real_checkpoint() {
    let d = tiny(Family::Qwen3Moe, None);
    let m = d.path().to_str().unwrap();
    // Half precision with float experts on the CPU: our message, not MLX's.
    for dt in ["bf16", "f16"] {
        generate_rejects(d.path(), &["--dtype", dt], &["not supported on the CPU backend", "--dtype f32"]);
    }
    generate_rejects(d.path(), &["--prompt", ""], &["prompt is empty"]);
    // Batched generation: the prompts file and the batch size.
    let pf = d.path().join("prompts.txt");
    std::fs::write(&pf, "hello\n\nworld\n").unwrap();
    let pfs = pf.to_str().unwrap();
    generate_rejects(d.path(), &["--prompts-file", pfs], &["--prompts-file", "line 2 is empty"]);
    generate_rejects(d.path(), &["--prompts-file", "/nonexistent/prompts.txt"], &["/nonexistent/prompts.txt"]);
    std::fs::write(&pf, "").unwrap();
    generate_rejects(d.path(), &["--prompts-file", pfs], &["has no prompts"]);
    std::fs::write(&pf, "hello\n").unwrap();
    for bad in ["0", "1025", "-3", "many"] {
        let flag = format!("--batch-size={bad}");
        generate_rejects(d.path(), &["--prompts-file", pfs, &flag], &["--batch-size", bad]);
        rejected("validate --batch-size", &mut zmlx(&["validate", m, &flag]), &["--batch-size", bad]);
    }
    generate_rejects(d.path(), &["--batch-size", "2"], &["--prompts-file"]);
    generate_rejects(d.path(), &["--prompts-file", pfs, "--prompt", "hi"], &["--prompt", "--prompts-file"]);
    rejected("validate an empty prompt", &mut zmlx(&["validate", m, "--prompt", ""]), &["no tokens"]);
    let pf = d.path().join("empty-prompt.txt");
    std::fs::write(&pf, "").unwrap();
    rejected(
        "validate an empty prompt file",
        &mut zmlx(&["validate", m, "--prompt-file", pf.to_str().unwrap()]),
        &["no tokens"],
    );
    rejected(
        "validate with a missing prompt file",
        &mut zmlx(&["validate", m, "--prompt-file", "/nonexistent/p.txt"]),
        &["--prompt-file", "/nonexistent/p.txt"],
    );
    rejected("unknown pattern", &mut zmlx(&["validate", m, "--patterns", "turbo"]), &["unknown pattern `turbo`"]);
    // A ledger path that is a directory: the run fails cleanly and no capsule is left behind.
    let caps = d.path().join("caps");
    rejected(
        "run into a directory ledger",
        &mut zmlx(&[
            "run",
            m,
            "--patterns",
            "moe_mlp",
            "--max-tokens",
            "2",
            "--runs",
            "1",
            "--ledger",
            d.path().to_str().unwrap(),
            "--capsule",
            caps.to_str().unwrap(),
        ]),
        &["ledger"],
    );
    let left: Vec<_> = std::fs::read_dir(&caps).map(|r| r.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "a capsule must not point at a ledger line that was never written: {left:?}");
}

/// `synth --config/--layers/--family`: a missing or non-JSON file, an unknown model_type, a
/// nonsense value, a family disagreeing with the file, 0 or too many layers — exit 2 naming the
/// file, key or flag; never a panic.
#[test]
fn synth_from_a_bad_config_names_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let missing = dir.path().join("missing.json");
    let m = missing.to_str().unwrap();
    rejected("--config missing", &mut zmlx(&["synth", "--config", m, "--out", o]), &["--config", m]);
    let bad = write("bad.json", "{ not json");
    rejected("--config not JSON", &mut zmlx(&["synth", "--config", &bad, "--out", o]), &[&bad, "not valid JSON"]);
    let arr = write("arr.json", "[1, 2]");
    rejected("--config not an object", &mut zmlx(&["synth", "--config", &arr, "--out", o]), &[&arr, "object"]);
    let llama = write("llama.json", r#"{"model_type": "llama", "hidden_size": 64}"#);
    rejected("unknown model_type", &mut zmlx(&["synth", "--config", &llama, "--out", o]), &[&llama, "`llama`"]);
    let untyped = write("untyped.json", r#"{"hidden_size": 64}"#);
    rejected("no model_type", &mut zmlx(&["synth", "--config", &untyped, "--out", o]), &[&untyped, "model_type"]);

    let d = tiny(Family::Mixtral, None);
    let cfg = d.path().join("config.json");
    let c = cfg.to_str().unwrap();
    for (key, value, needle) in [
        ("num_local_experts", serde_json::json!(0), "`num_local_experts` must be a positive integer"),
        ("hidden_size", serde_json::json!("wide"), "`hidden_size`"),
        ("num_experts_per_tok", serde_json::json!(99), "num_experts_per_tok (99)"),
        ("num_hidden_layers", serde_json::json!(-1), "`num_hidden_layers`"),
    ] {
        let original = std::fs::read_to_string(&cfg).unwrap();
        edit_json(&cfg, |v| v[key] = value.clone());
        rejected(
            &format!("--config with {key} = {value}"),
            &mut zmlx(&["synth", "--config", c, "--out", o]),
            &[c, needle],
        );
        std::fs::write(&cfg, original).unwrap();
    }
    for (args, needles) in [
        (vec!["--layers", "0"], vec!["--layers"]),
        (vec!["--layers=-3"], vec!["--layers"]),
        (vec!["--layers", "3"], vec!["--layers 3", "between 1 and 2", "num_hidden_layers", c]),
        (vec!["--layers", "many"], vec!["--layers"]),
        (vec!["--family", "qwen3_moe"], vec!["--family qwen3_moe", "mixtral", c]),
        (vec!["--preset", "full"], vec!["--preset", "--config"]),
    ] {
        let mut cmd = zmlx(&["synth", "--config", c, "--out", o]);
        cmd.args(&args);
        rejected(&format!("synth --config {args:?}"), &mut cmd, &needles);
    }
    rejected("synth without family or config", &mut zmlx(&["synth", "--out", o]), &["--family"]);
    rejected(
        "preset --layers too many",
        &mut zmlx(&["synth", "--family", "qwen3_moe", "--out", o, "--layers", "4"]),
        &["--layers 4", "between 1 and 3"],
    );
    assert!(!out.join("model.safetensors").exists(), "nothing is written for refused input");
}

/// `generate --chat/--system`: a checkpoint without a chat template, a broken template, a
/// template that raises, `--system` without `--chat` — exit 2 naming the checkpoint, file or
/// flag; never a panic.
#[test]
fn chat_flags_on_bad_checkpoints() {
    let d = tiny(Family::Qwen3Moe, None);
    let m = d.path().to_str().unwrap();
    generate_rejects(d.path(), &["--system", "be brief"], &["--system", "--chat"]);
    let cfg = d.path().join("tokenizer_config.json");
    let original = std::fs::read_to_string(&cfg).unwrap();
    edit_json(&cfg, |c| c["chat_template"] = "{% for m in messages %}{{ m.content }".into());
    generate_rejects(d.path(), &["--chat"], &["tokenizer_config.json field chat_template", "does not compile"]);
    edit_json(&cfg, |c| c["chat_template"] = "{{ raise_exception('system messages are not supported') }}".into());
    generate_rejects(d.path(), &["--chat", "--system", "S"], &["system messages are not supported"]);
    edit_json(&cfg, |c| c["chat_template"] = serde_json::json!([{"name": "rag", "template": "x"}]));
    generate_rejects(d.path(), &["--chat"], &["chat_template", "rag", "\"default\""]);
    std::fs::write(&cfg, "{ nope").unwrap();
    generate_rejects(d.path(), &["--chat"], &["tokenizer_config.json", "not valid JSON"]);
    std::fs::write(&cfg, &original).unwrap();
    edit_json(&cfg, |c| {
        c.as_object_mut().unwrap().remove("chat_template");
    });
    generate_rejects(d.path(), &["--chat"], &[m, "has no chat template", "drop --chat"]);
    // `synth --no-chat-template` writes such a checkpoint.
    let out = d.path().join("plain");
    let st = zmlx(&["synth", "--family", "qwen3_moe", "--margins", "off", "--no-chat-template", "--out"])
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(no_panic("synth --no-chat-template", &st).0, Some(0));
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(tc.get("chat_template").is_none() && tc["eos_token"] == "<|endoftext|>", "{tc}");
    generate_rejects(&out, &["--chat"], &["has no chat template"]);
}

/// `synth --route-skew`: a malformed or out-of-range value, or a skew that cannot fit the
/// hidden size — exit 2 naming the flag, the value and the accepted form; nothing written.
#[test]
fn synth_route_skew_values_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    for bad in ["zipf:0", "zipf:-1", "zipf:nan", "zipf:inf", "zipf:11", "zipf:", "zipf:one", "pareto:1", "1.2", ""] {
        rejected(
            &format!("--route-skew {bad:?}"),
            &mut zmlx(&["synth", "--family", "qwen3_moe", "--out", o, "--route-skew", bad]),
            &["--route-skew", bad, "`none` or `zipf:S`"],
        );
    }
    rejected(
        "--route-skew with groups as wide as the hidden size",
        zmlx(&["synth", "--family", "mixtral", "--out", o, "--route-skew", "zipf:1", "--quantize", "4"])
            .args(["--group-size", "128"]),
        &["--route-skew zipf:1", "hidden_size 128", "--group-size"],
    );
    assert!(!out.join("model.safetensors").exists(), "nothing is written for refused input");
}
