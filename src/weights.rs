//! Checkpoint tensors: finds the safetensors files, validates their headers (truncation, dtypes)
//! before MLX reads them, and hands tensors out by name with errors that name file and tensor.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use mlx_rs::{Array, Dtype};

/// Where a tensor came from, for error messages.
#[derive(Debug, Clone)]
struct Origin {
    file: PathBuf,
}

/// All tensors of a checkpoint, lazily loaded by MLX, keyed by name.
pub struct WeightStore {
    tensors: BTreeMap<String, Array>,
    origin: HashMap<String, Origin>,
    dir: PathBuf,
}

/// The safetensors files of a checkpoint: the index's files if there is an index, else every
/// `model*.safetensors` (mlx-lm's glob).
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: expected a `weight_map` object of tensor name -> file", index.display()))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .map(|f| {
                f.as_str()
                    .map(|s| dir.join(s))
                    .ok_or_else(|| anyhow!("{}: weight_map values must be file names", index.display()))
            })
            .collect::<Result<_>>()?;
        files.sort();
        files.dedup();
        for f in &files {
            if !f.exists() {
                bail!(
                    "{} lists {} but that file is missing; re-download or re-convert the checkpoint",
                    index.display(),
                    f.display()
                );
            }
        }
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("model") && name.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no model*.safetensors files in {}; a checkpoint needs its weights next to config.json", dir.display());
    }
    Ok(files)
}

fn safetensors_dtype(d: safetensors::Dtype) -> Option<Dtype> {
    use safetensors::Dtype as S;
    Some(match d {
        S::BOOL => Dtype::Bool,
        S::U8 => Dtype::Uint8,
        S::I8 => Dtype::Int8,
        S::U16 => Dtype::Uint16,
        S::I16 => Dtype::Int16,
        S::F16 => Dtype::Float16,
        S::BF16 => Dtype::Bfloat16,
        S::U32 => Dtype::Uint32,
        S::I32 => Dtype::Int32,
        S::F32 => Dtype::Float32,
        S::U64 => Dtype::Uint64,
        S::I64 => Dtype::Int64,
        _ => return None,
    })
}

/// Checks a safetensors file's header against its size, so a truncated download is reported
/// by name instead of surfacing later as a read error deep inside MLX.
fn validate_file(path: &Path) -> Result<Vec<String>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: read-only mapping of a file we do not modify; only the header is parsed.
    let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
        anyhow!(
            "{} is not a valid safetensors file ({e:?}); it is probably truncated or corrupt — re-download it",
            path.display()
        )
    })?;
    let mut names = Vec::new();
    for (name, info) in meta.tensors() {
        if safetensors_dtype(info.dtype).is_none() {
            bail!("{}: tensor `{name}` has dtype {:?}, which MLX cannot load", path.display(), info.dtype);
        }
        names.push(name);
    }
    Ok(names)
}

impl WeightStore {
    /// Opens every safetensors file of `dir`; tensors are read lazily by MLX when evaluated.
    pub fn open(dir: &Path) -> Result<WeightStore> {
        let mut tensors = BTreeMap::new();
        let mut origin = HashMap::new();
        for file in checkpoint_files(dir)? {
            let names = validate_file(&file)?;
            let loaded =
                Array::load_safetensors(&file).map_err(|e| anyhow!("MLX could not read {}: {e}", file.display()))?;
            if loaded.len() != names.len() {
                bail!("{}: MLX read {} tensors but the header lists {}", file.display(), loaded.len(), names.len());
            }
            for (name, arr) in loaded {
                if let Some(prev) = origin.get(&name) {
                    let prev: &Origin = prev;
                    bail!("tensor `{name}` appears in both {} and {}", prev.file.display(), file.display());
                }
                origin.insert(name.clone(), Origin { file: file.clone() });
                tensors.insert(name, arr);
            }
        }
        Ok(WeightStore { tensors, origin, dir: dir.to_path_buf() })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Where `name` is stored, for messages.
    pub fn file_of(&self, name: &str) -> String {
        self.origin.get(name).map(|o| o.file.display().to_string()).unwrap_or_else(|| self.dir.display().to_string())
    }

    /// Removes and returns a tensor; a missing one is an error naming the checkpoint.
    pub fn take(&mut self, name: &str) -> Result<Array> {
        self.tensors.remove(name).ok_or_else(|| {
            anyhow!(
                "tensor `{name}` is missing from the checkpoint in {} (is the file complete and the \
                 config's model_type/num_hidden_layers/num_experts right?)",
                self.dir.display()
            )
        })
    }

    pub fn peek_dtype(&self, name: &str) -> Option<Dtype> {
        self.tensors.get(name).map(Array::dtype)
    }

    pub fn take_opt(&mut self, name: &str) -> Option<Array> {
        self.tensors.remove(name)
    }

    /// Takes a tensor and checks its shape.
    pub fn take_shaped(&mut self, name: &str, shape: &[i32]) -> Result<Array> {
        let file = self.file_of(name);
        let a = self.take(name)?;
        if a.shape() != shape {
            bail!("{file}: tensor `{name}` has shape {:?}, expected {shape:?} (from config.json)", a.shape());
        }
        Ok(a)
    }

    /// Puts a (possibly rebuilt) tensor back, e.g. experts stacked by a sanitize step.
    pub fn insert(&mut self, name: String, a: Array, from: &str) {
        let origin = self.origin.get(from).cloned().unwrap_or(Origin { file: self.dir.clone() });
        self.origin.insert(name.clone(), origin);
        self.tensors.insert(name, a);
    }

    /// After a model took what it needs, anything left is an error (mlx-lm loads strictly).
    pub fn finish(self) -> Result<()> {
        if self.tensors.is_empty() {
            return Ok(());
        }
        let extra: Vec<String> = self.tensors.keys().take(5).map(|k| format!("`{k}` ({})", self.file_of(k))).collect();
        bail!(
            "{} unexpected tensor(s) in the checkpoint, e.g. {}; the config.json does not describe these weights \
             (wrong model_type or num_hidden_layers?)",
            self.tensors.len(),
            extra.join(", ")
        )
    }
}

/// Float dtype check with a message naming the tensor.
pub fn expect_float(store: &WeightStore, name: &str, a: &Array) -> Result<()> {
    if !matches!(a.dtype(), Dtype::Float32 | Dtype::Float16 | Dtype::Bfloat16) {
        bail!(
            "{}: tensor `{name}` has dtype {:?}, expected a float (f32, f16 or bf16)",
            store.file_of(name),
            a.dtype()
        );
    }
    Ok(())
}
