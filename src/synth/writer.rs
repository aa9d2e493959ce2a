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

/// Overwrites the bytes of `tensors` (same dtype, shape and size as written) in the checkpoint
/// in `dir`, in place: the safetensors headers give each tensor's file and byte range.
pub fn rewrite(dir: &Path, tensors: &[Planned]) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("model")))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    let mut left: HashMap<&str, &Planned> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    for path in files {
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
        let mut n = [0u8; 8];
        f.read_exact(&mut n)?;
        let n = u64::from_le_bytes(n);
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header)?;
        let header: serde_json::Value = serde_json::from_slice(&header)?;
        for (name, entry) in header.as_object().into_iter().flatten() {
            let Some(t) = left.remove(name.as_str()) else { continue };
            let range = &entry["data_offsets"];
            let (b, e) = (range[0].as_u64().unwrap_or(0), range[1].as_u64().unwrap_or(0));
            let bytes = (t.make)();
            if e - b != bytes.len() as u64 || bytes.len() != t.bytes {
                return Err(anyhow!(
                    "internal: {} in {} holds {} bytes, rewrite has {}",
                    name,
                    path.display(),
                    e - b,
                    bytes.len()
                ));
            }
            f.seek(SeekFrom::Start(8 + n + b))?;
            f.write_all(&bytes)?;
        }
    }
    if let Some(name) = left.keys().next() {
        return Err(anyhow!("internal: tensor {name} to rewrite is not in {}", dir.display()));
    }
    Ok(())
}
