//! Streaming safetensors writer: every tensor is a lazy [`safetensors::View`] whose bytes are
//! generated when the serializer asks for them (`serialize_to_file` writes the header, then asks
//! each view for its data in order) and dropped once written, so memory stays at about one
//! tensor whatever the checkpoint size. Shards of at most `max_bytes` (`model-0000i-of-0000n`)
//! with `model.safetensors.index.json`, or one `model.safetensors`; metadata `{"format": "mlx"}`.
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

/// One tensor to write: its header entry and how to make its bytes.
pub struct Planned<'a> {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub bytes: usize,
    pub make: Box<dyn Fn() -> Vec<u8> + 'a>,
}

struct Lazy<'p, 'a> {
    t: &'p Planned<'a>,
    bar: &'p ProgressBar,
}

impl safetensors::View for Lazy<'_, '_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.t.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.t.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let v = (self.t.make)();
        // A wrong length would corrupt every later offset: an internal bug, never input.
        assert_eq!(
            v.len(),
            self.t.bytes,
            "synth: tensor {} made {} bytes, planned {}",
            self.t.name,
            v.len(),
            self.t.bytes
        );
        self.bar.inc(v.len() as u64);
        Cow::Owned(v)
    }
    fn data_len(&self) -> usize {
        self.t.bytes
    }
}

/// Writes `tensors` into `out`; returns the files written. Progress bar on a terminal for
/// checkpoints above 256 MiB.
pub fn write_shards(out: &Path, tensors: &[Planned], max_bytes: u64) -> Result<Vec<PathBuf>> {
    let total: u64 = tensors.iter().map(|t| t.bytes as u64).sum();
    let mut groups: Vec<Vec<&Planned>> = vec![vec![]];
    let mut size = 0u64;
    for t in tensors {
        let n = t.bytes as u64;
        if size > 0 && size + n > max_bytes {
            groups.push(vec![]);
            size = 0;
        }
        groups.last_mut().unwrap().push(t);
        size += n;
    }
    // Remove stale weights from an earlier synth into the same directory.
    for e in std::fs::read_dir(out)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("model") && (name.ends_with(".safetensors") || name.ends_with(".index.json")) {
            std::fs::remove_file(e.path())?;
        }
    }
    let bar = if total > 256 << 20 {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("writing {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let meta: Option<HashMap<String, String>> = Some([("format".to_string(), "mlx".to_string())].into());
    let n = groups.len();
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (i, g) in groups.iter().enumerate() {
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let path = out.join(&name);
        let views = g.iter().map(|t| (t.name.as_str(), Lazy { t, bar: &bar }));
        safetensors::serialize_to_file(views, &meta, &path).map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
        for t in g {
            weight_map.insert(t.name.clone(), json!(name));
        }
        files.push(path);
    }
    bar.finish_and_clear();
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(out.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    }
    Ok(files)
}
