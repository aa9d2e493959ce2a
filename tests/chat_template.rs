//! Chat templates: zmlx's rendering (minijinja) and chat encoding against transformers'
//! `apply_chat_template` (tokenize=False text and tokenize=True ids, run by the oracle Python) on
//! the synthesized checkpoint's ChatML template and two real-world-style templates
//! (tests/fixtures/chat_templates: Qwen3-style ChatML with thinking, Mixtral-style `[INST]` with
//! `raise_exception`); plus loading rules (chat_template.jinja first, list form, none) and errors.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::{json, Value};
use zmlx::chat_template::{ChatMessage, ChatTemplate};
use zmlx::config::{Family, ModelConfig};
use zmlx::tokenizer::TextTokenizer;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(repo_root().join("tests/fixtures/chat_templates").join(name)).unwrap()
}

fn m(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// A tiny synthesized checkpoint (float, no margins: only its tokenizer and config are used).
fn synth_checkpoint(dir: &Path, chat_template: bool) {
    let mut o = synth_opts(Family::Qwen3Moe, None, 0);
    o.margins = zmlx::synth::MarginMode::Off;
    o.chat_template = chat_template;
    let _g = mlx_lock();
    synth_into(dir, &o);
}

/// A checkpoint dir holding `base`'s config and tokenizer, for a fixture template.
fn copy_tokenizer(base: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(base.join(f), dir.join(f)).unwrap();
    }
}

struct Case {
    dir: PathBuf,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
}

/// transformers' results for every case: Ok((text, ids)) or Err(message).
fn transformers_oracle(cases: &[Case]) -> Vec<Result<(String, Vec<u32>), String>> {
    let input: Vec<Value> = cases
        .iter()
        .map(|c| json!({"model": c.dir, "messages": c.messages, "add_generation_prompt": c.add_generation_prompt}))
        .collect();
    let mut child = Command::new(oracle_python())
        .arg(repo_root().join("tests/oracle/chat_template_oracle.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the transformers oracle");
    serde_json::to_writer(child.stdin.take().unwrap(), &input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "transformers oracle failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("oracle JSON");
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| match r.get("error") {
            Some(e) => Err(e.as_str().unwrap().to_owned()),
            None => Ok((
                r["text"].as_str().unwrap().to_owned(),
                r["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
            )),
        })
        .collect()
}

#[test]
fn rendering_and_ids_match_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let synth = tmp.path().join("synth");
    synth_checkpoint(&synth, true);

    // Qwen3-style template in chat_template.jinja; a decoy in tokenizer_config.json must lose.
    let qwen = tmp.path().join("qwen3");
    copy_tokenizer(&synth, &qwen);
    std::fs::write(qwen.join("chat_template.jinja"), fixture("qwen3_style.jinja")).unwrap();
    let mut cfg = read_json(&qwen.join("tokenizer_config.json"));
    cfg["chat_template"] = json!("DECOY {{ messages | length }}");
    write_json(&qwen.join("tokenizer_config.json"), &cfg);

    // Mixtral-style template as the "default" of a named list; <s> / </s> as added special tokens
    // (past the synthesized vocab; config.json's vocab_size grows to match), bos as an object.
    let mixtral = tmp.path().join("mixtral");
    copy_tokenizer(&synth, &mixtral);
    let mut model_cfg = read_json(&mixtral.join("config.json"));
    let vocab = model_cfg["vocab_size"].as_u64().unwrap();
    model_cfg["vocab_size"] = json!(vocab + 2);
    write_json(&mixtral.join("config.json"), &model_cfg);
    let mut tj = read_json(&mixtral.join("tokenizer.json"));
    for (i, t) in ["<s>", "</s>"].iter().enumerate() {
        tj["added_tokens"].as_array_mut().unwrap().push(json!({"id": vocab + i as u64, "content": t,
            "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    write_json(&mixtral.join("tokenizer.json"), &tj);
    let mut cfg = read_json(&mixtral.join("tokenizer_config.json"));
    cfg["chat_template"] = json!([
        {"name": "tool_use", "template": "DECOY"},
        {"name": "default", "template": fixture("mixtral_style.jinja")},
    ]);
    cfg["bos_token"] = json!({"__type": "AddedToken", "content": "<s>", "lstrip": false, "normalized": false, "rstrip": false,
        "single_word": false, "special": true});
    cfg["eos_token"] = json!("</s>");
    write_json(&mixtral.join("tokenizer_config.json"), &cfg);

    let sys = m("system", "You are a terse assistant.");
    let hi = m("user", "Hello! How do routers forward packets?");
    let reply = m("assistant", "Hop by hop, by longest prefix.");
    let again = m("user", "And TCP? Say it with \"quotes\", é, 日本 and a\nnewline.");
    let thought = m("assistant", "<think>\nThe user wants TCP.\n</think>\n\nReliable, ordered bytes.");
    let mut cases = Vec::new();
    let mut add = |dir: &Path, msgs: &[&ChatMessage]| {
        for agp in [true, false] {
            cases.push(Case {
                dir: dir.to_owned(),
                messages: msgs.iter().map(|&x| x.clone()).collect(),
                add_generation_prompt: agp,
            });
        }
    };
    for dir in [&synth, &qwen, &mixtral] {
        add(dir, &[&hi]);
        add(dir, &[&sys, &hi]);
        add(dir, &[&sys, &hi, &reply, &again]);
        add(dir, &[&hi, &reply, &again]);
    }
    add(&qwen, &[&sys, &hi, &thought, &again, &thought]);
    add(&qwen, &[&hi, &m("assistant", "calling"), &m("tool", "{\"ok\": true}"), &m("tool", "42")]);
    // Errors: the synth template's unknown role / late system message, Mixtral's role order.
    add(&synth, &[&hi, &sys]);
    add(&synth, &[&m("tool", "x")]);
    add(&mixtral, &[&hi, &hi]);
    add(&mixtral, &[&reply]);
    add(&mixtral, &[&sys, &m("tool", "x")]);

    let expected = transformers_oracle(&cases);
    assert_eq!(expected.len(), cases.len());
    let mut loaded = std::collections::HashMap::new();
    let (mut rendered, mut errors) = (0, 0);
    for (case, want) in cases.iter().zip(&expected) {
        let (template, tok) = loaded.entry(case.dir.clone()).or_insert_with(|| {
            let config = ModelConfig::load(&case.dir).unwrap();
            let t = ChatTemplate::load(&case.dir).unwrap().expect("the fixture has a chat template");
            (t, TextTokenizer::load(&case.dir, &config).unwrap())
        });
        let got = template.render(&case.messages, case.add_generation_prompt);
        let what =
            format!("{} {:?} add_generation_prompt={}", case.dir.display(), case.messages, case.add_generation_prompt);
        match (want, got) {
            (Ok((text, ids)), Ok(ours)) => {
                assert_eq!(&ours, text, "rendered text differs from transformers: {what}");
                assert_eq!(&tok.encode_chat(&ours).unwrap(), ids, "chat ids differ from transformers: {what}");
                rendered += 1;
            }
            (Err(theirs), Err(ours)) => {
                // The template's own raise_exception message reaches the caller.
                let msg = theirs.split_once(": ").map_or(theirs.as_str(), |(_, m)| m);
                assert!(format!("{ours:#}").contains(msg), "{what}: our error {ours:#} lacks transformers' {msg:?}");
                errors += 1;
            }
            (want, got) => panic!("{what}: transformers {want:?}, zmlx {got:?}"),
        }
    }
    assert_eq!((rendered, errors), (cases.len() - 10, 10));

    // `zmlx generate --chat --system`: the prompt ids are transformers' (as mlx_lm.generate's).
    let i = cases
        .iter()
        .position(|c| c.dir == synth && c.add_generation_prompt && c.messages == [sys.clone(), hi.clone()])
        .unwrap();
    let out = zmlx_cmd()
        .args(["generate", "--chat", "--system", &sys.content, "--prompt", &hi.content, "--json", "--max-tokens", "1"])
        .arg("--model")
        .arg(&synth)
        .output()
        .unwrap();
    assert!(out.status.success(), "generate --chat: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u32> = serde_json::from_value(v["prompt_ids"].clone()).unwrap();
    assert_eq!(ids, expected[i].as_ref().unwrap().1, "generate --chat prompt_ids");

    // The special tokens the templates write are single ids, not their characters.
    let (t, tok) = &loaded[&synth];
    let ids = tok.encode_chat(&t.render(std::slice::from_ref(&hi), true).unwrap()).unwrap();
    let im_start = 1; // synth: <|endoftext|>, <|im_start|>, <|im_end|> are ids 0, 1, 2
    assert_eq!(ids.first(), Some(&im_start));
    assert_eq!(ids.iter().filter(|&&i| i == im_start).count(), 2, "{ids:?}");
    let (t, tok) = &loaded[&mixtral];
    let ids = tok.encode_chat(&t.render(std::slice::from_ref(&hi), true).unwrap()).unwrap();
    assert_eq!(ids[0] as u64, vocab, "<s> is written by the template, once: {ids:?}");
}

#[test]
fn synth_template_renders_chatml() {
    let tmp = tempfile::tempdir().unwrap();
    zmlx::synth::tokenizer::write_tokenizer(tmp.path(), 300, true).unwrap();
    let t = ChatTemplate::load(tmp.path()).unwrap().unwrap();
    let msgs = [m("system", "S"), m("user", "U"), m("assistant", "A"), m("user", "V")];
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n\
         <|im_start|>user\nV<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(t.render(&msgs[1..2], false).unwrap(), "<|im_start|>user\nU<|im_end|>\n");
    assert_eq!(t.render(&[], true).unwrap(), "<|im_start|>assistant\n");
    let e = format!("{:#}", t.render(&[m("user", "U"), m("system", "S")], true).unwrap_err());
    assert!(e.contains("The system message must be the first message") && e.contains("tokenizer_config.json"), "{e}");
    assert_eq!(t.special_tokens().get("eos_token").map(String::as_str), Some("<|endoftext|>"));
    assert!(!t.special_tokens().contains_key("bos_token"), "synth's bos_token is null");
}

#[test]
fn missing_template_is_none() {
    let tmp = tempfile::tempdir().unwrap();
    // No tokenizer_config.json at all, then one without chat_template, then chat_template null.
    assert!(ChatTemplate::load(tmp.path()).unwrap().is_none());
    zmlx::synth::tokenizer::write_tokenizer(tmp.path(), 300, false).unwrap();
    let cfg_path = tmp.path().join("tokenizer_config.json");
    assert!(read_json(&cfg_path).get("chat_template").is_none());
    assert!(ChatTemplate::load(tmp.path()).unwrap().is_none());
    let mut cfg = read_json(&cfg_path);
    cfg["chat_template"] = Value::Null;
    write_json(&cfg_path, &cfg);
    assert!(ChatTemplate::load(tmp.path()).unwrap().is_none());
    // A chat_template.jinja alone is enough.
    std::fs::write(tmp.path().join("chat_template.jinja"), "{{ messages[0].content }}!").unwrap();
    let t = ChatTemplate::load(tmp.path()).unwrap().unwrap();
    assert_eq!(t.render(&[m("user", "hi")], false).unwrap(), "hi!");
    assert!(t.origin().ends_with("chat_template.jinja"));
}

fn load_err(dir: &Path) -> String {
    match ChatTemplate::load(dir) {
        Ok(t) => panic!("expected an error, loaded {:?}", t.map(|t| t.origin().to_owned())),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_templates_and_configs_are_errors_naming_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cfg = d.join("tokenizer_config.json");
    let set = |v: Value| write_json(&cfg, &json!({"eos_token": "</s>", "chat_template": v}));

    std::fs::write(&cfg, "{ not json").unwrap();
    let e = load_err(d);
    assert!(e.contains("tokenizer_config.json") && e.contains("not valid JSON"), "{e}");

    set(json!("line one\n{% for m in messages %}{{ m.content }\n"));
    let e = load_err(d);
    assert!(e.contains("field chat_template") && e.contains("does not compile") && e.contains("line 2"), "{e}");

    set(json!(42));
    let e = load_err(d);
    assert!(e.contains("field chat_template") && e.contains("a number"), "{e}");

    set(json!([{"name": "tool_use", "template": "x"}, {"name": "rag", "template": "y"}]));
    let e = load_err(d);
    assert!(e.contains("tool_use, rag") && e.contains("\"default\""), "{e}");

    set(json!([{"name": "default"}]));
    let e = load_err(d);
    assert!(e.contains("chat_template[0]") && e.contains("`template`"), "{e}");

    write_json(&cfg, &json!({"bos_token": 7, "chat_template": "x"}));
    let e = load_err(d);
    assert!(e.contains("field bos_token"), "{e}");

    // chat_template.jinja wins over the field, and its syntax errors name it.
    set(json!("from the config"));
    std::fs::write(d.join("chat_template.jinja"), "{% if %}").unwrap();
    let e = load_err(d);
    assert!(e.contains("chat_template.jinja") && e.contains("does not compile"), "{e}");
    std::fs::write(d.join("chat_template.jinja"), "from the file {{ eos_token }}").unwrap();
    assert_eq!(ChatTemplate::load(d).unwrap().unwrap().render(&[], false).unwrap(), "from the file </s>");
    std::fs::write(d.join("chat_template.jinja"), [0xffu8, 0xfe]).unwrap();
    assert!(load_err(d).contains("not UTF-8"));
}

#[test]
fn render_errors_are_errors_not_panics() {
    let t = |src: &str| ChatTemplate::from_source(src, Default::default(), "T").unwrap();
    let msgs = [m("user", "hi")];
    for (src, want) in [
        ("{{ raise_exception('no ' + messages[0].role + ' allowed') }}", "no user allowed"),
        ("{{ messages[5].role.upper() }}", "T"),
        ("{{ messages.nope.deeper }}", "T"),
        ("{{ strftime_now('%Q') }}", "strftime_now"),
        ("{{ messages | tojson(indent=[]) }}", "indent"),
        ("{% for x in range(10) %}{{ x.nope() }}{% endfor %}", "T"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "T"),
    ] {
        let e = format!("{:#}", t(src).render(&msgs, true).unwrap_err());
        assert!(e.contains(want), "{src}: {e}");
    }
    // Python-style string methods and json.dumps-style tojson, as templates expect.
    let out = t(
        "{{ messages | tojson }}|{{ ' x '.strip() }}|{{ 'a-b'.split('-') | join('+') }}|{{ {'k': 1}.items() | list }}",
    )
    .render(&msgs, false)
    .unwrap();
    assert_eq!(out, "[{\"role\": \"user\", \"content\": \"hi\"}]|x|a+b|[[\"k\", 1]]");
    // A date, today's: strftime_now works.
    let year = t("{{ strftime_now('%Y') }}").render(&msgs, false).unwrap();
    assert!(year.len() == 4 && year.starts_with('2'), "{year}");
}
