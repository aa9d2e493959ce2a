//! The checkpoint's chat template, rendered the way `transformers`' `apply_chat_template` does:
//! a Jinja template (`chat_template.jinja`, else `chat_template` in tokenizer_config.json) run by
//! `minijinja` with Jinja2's `trim_blocks` / `lstrip_blocks`, the Python string and dict methods
//! templates call (`minijinja-contrib`'s pycompat: `.strip()`, `.startswith()`, `.split()`,
//! `.items()`, ...), and the globals transformers adds: `raise_exception`, `strftime_now`, a
//! `tojson` filter that writes `json.dumps`' text (not Jinja's HTML-escaped one), and the special
//! tokens of tokenizer_config.json (`bos_token`, `eos_token`, ...).
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use minijinja::value::{Kwargs, Value};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State, UndefinedBehavior};
use serde::{Deserialize, Serialize};

/// One chat turn, as the template sees it: `message['role']`, `message['content']`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// The special tokens transformers passes to the template (its `special_tokens_map`).
const SPECIAL_TOKEN_FIELDS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template plus the special tokens it is rendered with.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// Where the template came from, for messages: `<dir>/chat_template.jinja` or
    /// `<dir>/tokenizer_config.json field chat_template`.
    origin: String,
    special_tokens: BTreeMap<String, String>,
}

impl ChatTemplate {
    /// From the model dir: `chat_template.jinja` if present, else `chat_template` in
    /// tokenizer_config.json (a string, or a list of `{name, template}` where "default" is used).
    /// `Ok(None)` when the checkpoint has none.
    pub fn load(model_dir: &Path) -> Result<Option<ChatTemplate>> {
        let cfg_path = model_dir.join("tokenizer_config.json");
        let cfg = match std::fs::read(&cfg_path) {
            Ok(bytes) => Some(serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| {
                anyhow!(
                    "{} is not valid JSON ({e}); fix or replace the file (it holds the chat template and the special tokens)",
                    cfg_path.display()
                )
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(anyhow!("cannot read {}: {e}", cfg_path.display())),
        };
        if let Some(c) = &cfg {
            if !c.is_object() {
                bail!("{}: expected a JSON object at the top level, found {}", cfg_path.display(), json_kind(c));
            }
        }
        let special_tokens = match &cfg {
            Some(c) => special_tokens(c, &cfg_path)?,
            None => BTreeMap::new(),
        };

        let jinja_path = model_dir.join("chat_template.jinja");
        let (source, origin) = match std::fs::read(&jinja_path) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes)
                    .map_err(|_| anyhow!("{} is not UTF-8 text; re-save it as UTF-8", jinja_path.display()))?;
                (text, jinja_path.display().to_string())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match cfg.as_ref().and_then(|c| c.get("chat_template")) {
                    None | Some(serde_json::Value::Null) => return Ok(None),
                    Some(v) => (template_field(v, &cfg_path)?, format!("{} field chat_template", cfg_path.display())),
                }
            }
            Err(e) => return Err(anyhow!("cannot read {}: {e}", jinja_path.display())),
        };
        ChatTemplate::from_source(&source, special_tokens, &origin).map(Some)
    }

    /// Compiles `source` (the template text) with these special tokens; `origin` names it in errors.
    pub fn from_source(source: &str, special_tokens: BTreeMap<String, String>, origin: &str) -> Result<ChatTemplate> {
        let mut env = environment();
        env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(source)).map_err(|e| {
            anyhow!("{origin}: the chat template does not compile: {}; fix the template (Jinja syntax)", describe(&e))
        })?;
        Ok(ChatTemplate { env, source: source.to_owned(), origin: origin.to_owned(), special_tokens })
    }

    /// The template text as stored in the checkpoint.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from (file, and field for tokenizer_config.json).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// `bos_token`, `eos_token`, ... as given to the template.
    pub fn special_tokens(&self) -> &BTreeMap<String, String> {
        &self.special_tokens
    }

    /// Renders `messages` (plus `add_generation_prompt`), with the special tokens of
    /// tokenizer_config.json; template errors (incl. `raise_exception` messages) come back as
    /// `Err` with the template's message.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow!("{}: internal: template missing: {e}", self.origin))?;
        let mut ctx: BTreeMap<String, Value> =
            self.special_tokens.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect();
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        template
            .render(ctx)
            .map_err(|e| anyhow!("{}: rendering the chat template failed: {}", self.origin, describe(&e)))
    }
}

/// The `chat_template` field: a string, or a list of `{name, template}` of which "default" is used.
fn template_field(v: &serde_json::Value, cfg_path: &Path) -> Result<String> {
    let field = format!("{} field chat_template", cfg_path.display());
    match v {
        serde_json::Value::String(s) => Ok(s.clone()),
        serde_json::Value::Array(items) => {
            let mut names = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let name = item.get("name").and_then(|n| n.as_str());
                let template = item.get("template").and_then(|t| t.as_str());
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(t.to_owned()),
                    (Some(n), Some(_)) => names.push(n.to_owned()),
                    _ => bail!(
                        "{field}[{i}]: expected an object with string fields `name` and `template`, found {}",
                        short(item)
                    ),
                }
            }
            bail!(
                "{field}: a list of named templates ({}) without one named \"default\"; name the one to use \
                 \"default\" or write it to chat_template.jinja",
                if names.is_empty() { "empty".to_owned() } else { names.join(", ") }
            )
        }
        other => bail!(
            "{field}: expected a string or a list of {{name, template}} objects, found {}; fix the field or remove it",
            json_kind(other)
        ),
    }
}

/// tokenizer_config.json's special tokens: strings, or `{"content": ...}` objects (AddedToken).
fn special_tokens(cfg: &serde_json::Value, cfg_path: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for field in SPECIAL_TOKEN_FIELDS {
        let token = match cfg.get(field) {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Object(o)) => match o.get("content") {
                Some(serde_json::Value::String(s)) => s.clone(),
                _ => bail!(
                    "{} field {field}: an object without a string `content` ({}); write the token as a string",
                    cfg_path.display(),
                    short(&serde_json::Value::Object(o.clone()))
                ),
            },
            Some(other) => bail!(
                "{} field {field}: expected a string or {{\"content\": ...}}, found {}",
                cfg_path.display(),
                json_kind(other)
            ),
        };
        out.insert(field.to_owned(), token);
    }
    Ok(out)
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // transformers: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True); Jinja2
    // drops one trailing newline (keep_trailing_newline=False), as minijinja does by default.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

/// Prints values as Python's `str()` does where minijinja differs: `None`, `True`, `False`.
fn python_formatter(out: &mut minijinja::Output, state: &State, value: &Value) -> Result<(), Error> {
    if value.is_none() {
        out.write_str("None").map_err(Error::from)
    } else if value.kind() == minijinja::value::ValueKind::Bool {
        out.write_str(if value.is_true() { "True" } else { "False" }).map_err(Error::from)
    } else {
        minijinja::escape_formatter(out, state, value)
    }
}

fn raise_exception(message: Value) -> Result<Value, Error> {
    let text = match message.as_str() {
        Some(s) => s.to_owned(),
        None => message.to_string(),
    };
    Err(Error::new(ErrorKind::InvalidOperation, format!("raise_exception: {text}")))
}

/// `strftime_now(format)`: local time, Python `strftime` directives (chrono's, which match them).
fn strftime_now(format: &str) -> Result<Value, Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item> = StrftimeItems::new(format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(Error::new(ErrorKind::InvalidOperation, format!("strftime_now: bad format string {format:?}")));
    }
    Ok(Value::from(chrono::Local::now().format_with_items(items.into_iter()).to_string()))
}

/// `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)` =
/// Python's `json.dumps` with those arguments (transformers' override of Jinja's filter).
fn tojson(value: Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")?.or(indent) {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.clamp(0, 64) as usize)),
            (None, Some(s)) => Some(s.to_owned()),
            _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or a string")),
        },
    };
    let ensure_ascii: bool = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys: bool = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be two strings")),
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: cannot serialize: {e}")))?;
    let mut out = String::new();
    let opts = DumpOptions { indent, item_sep, key_sep, ensure_ascii, sort_keys };
    dump(&json, &opts, 0, &mut out);
    Ok(Value::from(out))
}

struct DumpOptions {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

fn dump(v: &serde_json::Value, o: &DumpOptions, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => out.push_str(&python_number(n)),
        J::String(s) => dump_str(s, o.ensure_ascii, out),
        J::Array(a) if a.is_empty() => out.push_str("[]"),
        J::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                dump(x, o, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(m) if m.is_empty() => out.push_str("{}"),
        J::Object(m) => {
            let mut entries: Vec<_> = m.iter().collect();
            if o.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                dump_str(k, o.ensure_ascii, out);
                out.push_str(&o.key_sep);
                dump(x, o, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

/// A number as Python's `json.dumps` writes it (`1.0`, `1e+16`, `Infinity`).
fn python_number(n: &serde_json::Number) -> String {
    if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
        if f.is_nan() {
            return "NaN".into();
        }
        if f.is_infinite() {
            return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
        }
        // Python's repr: shortest round-trip digits; exponent form outside 1e-4 <= |f| < 1e16.
        let a = f.abs();
        if a != 0.0 && !(1e-4..1e16).contains(&a) {
            let s = format!("{f:e}");
            let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
            let exp: i32 = exp.parse().unwrap_or(0);
            return format!("{mant}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
        }
        let s = format!("{f}");
        return if s.contains('.') { s } else { format!("{s}.0") };
    }
    n.to_string()
}

fn dump_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// transformers' `{% generation %}...{% endgeneration %}` (assistant-mask tracking) is a no-op
/// for rendering; minijinja has no such tag, so it becomes `{% if true %}...{% endif %}` (same
/// whitespace control).
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let body = inner.trim_start_matches(['-', '+']).trim_end_matches(['-', '+']).trim();
        let lead = &inner[..inner.len() - inner.trim_start_matches(['-', '+']).len()];
        let trail = &inner[inner.trim_end_matches(['-', '+']).len()..];
        match body {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// An error's message with its line: `syntax error at line 3: unexpected end of input`.
fn describe(e: &Error) -> String {
    let what = match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_owned(),
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    match e.line() {
        Some(line) => format!("{what} (template line {line})"),
        None => what,
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(src: &str) -> ChatTemplate {
        ChatTemplate::from_source(src, BTreeMap::new(), "test").unwrap()
    }

    #[test]
    fn shareable_across_threads() {
        fn f<T: Send + Sync + Clone>() {}
        f::<ChatTemplate>();
    }

    #[test]
    fn tojson_is_json_dumps() {
        let tpl = t("{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ s | tojson }}");
        let tmpl = tpl.env.get_template(TEMPLATE_NAME).unwrap();
        let x = serde_json::json!({"a": [1, 2.5, null, true], "b": {}});
        let out = tmpl.render(minijinja::context! { x => x, s => "<é\n>" }).unwrap();
        assert_eq!(
            out,
            "{\"a\": [1, 2.5, null, true], \"b\": {}}|{\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"b\": {}\n}|\"<é\\n>\""
        );
    }

    #[test]
    fn generation_tags_are_no_ops() {
        assert_eq!(strip_generation_tags("a{%- generation %}b{% endgeneration -%}c"), "a{%- if true %}b{% endif -%}c");
        let tpl = t("x{% generation %}y{% endgeneration %}z");
        assert_eq!(tpl.render(&[], false).unwrap(), "xyz");
    }

    #[test]
    fn python_values_and_methods() {
        let tpl = t("{{ none }} {{ true }} {{ ' a '.strip() }} {{ 'a,b'.split(',')[1] }} {{ 'xy'.startswith('x') }}");
        assert_eq!(tpl.render(&[], false).unwrap(), "None True a b True");
    }

    #[test]
    fn strftime_bad_format_is_an_error() {
        assert!(t("{{ strftime_now('%Y') }}").render(&[], false).unwrap().len() == 4);
        assert!(t("{{ strftime_now('%Q') }}").render(&[], false).is_err());
    }
}
