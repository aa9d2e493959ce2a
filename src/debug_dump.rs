//! Diagnostics (`ZMLX_DUMP_DIR=dir`): the first forward call of a process whose dump does not
//! exist yet (the prefill) saves its embedding, each layer's attention and layer output, and
//! layer 0's named intermediates (recorded by the attention and the MoE block through `record`) to
//! `dir/hidden.safetensors`, so a GPU run can be compared op by op with mlx-lm
//! (scripts/gpu/layer_diff.py). Without the variable every hook is a cheap no-op.
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Result;
use mlx_rs::{Array, Dtype};

thread_local! {
    static SINK: RefCell<Option<Vec<(String, Array)>>> = const { RefCell::new(None) };
}

fn dir() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| std::env::var_os("ZMLX_DUMP_DIR").map(PathBuf::from)).as_deref()
}

/// Whether layer 0 of a dumped call is running (so a caller can skip building what it would record).
pub fn recording() -> bool {
    SINK.with(|s| s.borrow().is_some())
}

/// Records `a` under `name` while layer 0 of a dumped call runs.
pub fn record(name: &str, a: &Array) {
    SINK.with(|s| {
        if let Some(v) = s.borrow_mut().as_mut() {
            v.push((name.to_owned(), a.clone()));
        }
    });
}

/// The dump of one forward call.
pub struct CallDump {
    file: PathBuf,
    saved: Vec<(String, Array)>,
}

impl CallDump {
    /// Some when this call is to be dumped.
    pub fn start(embed: &Array) -> Option<CallDump> {
        let file = dir()?.join("hidden.safetensors");
        (!file.exists()).then(|| CallDump { file, saved: vec![("embed".into(), embed.clone())] })
    }

    pub fn before_layer(&mut self, i: usize) {
        if i == 0 {
            SINK.with(|s| *s.borrow_mut() = Some(Vec::new()));
        }
    }

    pub fn after_layer(&mut self, i: usize, attn: Array, out: &Array) {
        if i == 0 {
            let inner = SINK.with(|s| s.borrow_mut().take()).unwrap_or_default();
            self.saved.extend(inner.into_iter().map(|(k, v)| (format!("l0.{k}"), v)));
        }
        self.saved.push((format!("layer{i}.attn"), attn));
        self.saved.push((format!("layer{i}.out"), out.clone()));
    }

    pub fn save(self) -> Result<()> {
        if let Some(d) = self.file.parent() {
            std::fs::create_dir_all(d)?;
        }
        let f32s: Vec<(String, Array)> =
            self.saved.into_iter().map(|(k, v)| Ok((k, v.as_dtype(Dtype::Float32)?))).collect::<Result<_>>()?;
        Array::save_safetensors(f32s.iter().map(|(k, v)| (k.as_str(), v)), None, &self.file)?;
        Ok(())
    }
}
