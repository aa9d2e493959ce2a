//! Checkpoint tensors: finds the safetensors files, validates their headers (truncation, dtypes),
//! memory-maps them as MLX arrays without copying, and hands tensors out by name with errors that
//! name file and tensor.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use mlx_rs::{Array, Dtype};

/// Where a tensor came from, for error messages.
#[derive(Debug, Clone)]
struct Origin {
    file: PathBuf,
}

/// All tensors of a checkpoint, arrays over the mapped files, keyed by name; with expert
/// offloading, the expert tensors only as where their bytes are ([`LazyTensor`]).
pub struct WeightStore {
    tensors: BTreeMap<String, Array>,
    lazy: BTreeMap<String, LazyTensor>,
    origin: HashMap<String, Origin>,
    dir: PathBuf,
}

/// Bytes of one tensor (or of one expert's slice of it) in a safetensors file.
#[derive(Clone)]
pub struct FileBytes {
    pub file: Arc<File>,
    pub path: Arc<PathBuf>,
    /// Absolute offset in the file.
    pub offset: u64,
    pub len: usize,
}

impl FileBytes {
    /// Reads these bytes into `dst` (`dst.len() == self.len`), naming the file on failure.
    pub fn read_into(&self, dst: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(dst, self.offset)
            .with_context(|| format!("cannot read {} bytes at {} of {}", self.len, self.offset, self.path.display()))
    }
}

/// A tensor left in its file: a stacked expert tensor `[E, ...]` (one range) or per-expert
/// tensors stacked by a sanitize step (one range per expert). Never read as a whole.
#[derive(Clone)]
pub struct LazyTensor {
    pub dtype: Dtype,
    /// Logical shape, the expert axis first when stacked.
    pub shape: Vec<i32>,
    parts: Vec<FileBytes>,
    stacked_from_parts: bool,
}

impl LazyTensor {
    /// Experts along the first axis.
    pub fn experts(&self) -> usize {
        self.shape.first().copied().unwrap_or(0).max(0) as usize
    }

    /// The bytes of expert `e` (`shape[1..]`, row-major).
    pub fn expert(&self, e: usize) -> FileBytes {
        if self.stacked_from_parts {
            return self.parts[e].clone();
        }
        let whole = &self.parts[0];
        let per = whole.len / self.experts().max(1);
        FileBytes { offset: whole.offset + (e * per) as u64, len: per, ..whole.clone() }
    }
}

/// Whether a checkpoint tensor holds routed experts (stacked `switch_mlp` or HF per-expert
/// `experts.N`): what expert offloading leaves in the files.
pub fn is_expert_tensor(name: &str) -> bool {
    if name.contains(".switch_mlp.") {
        return true;
    }
    // `.experts.<digits>.` (not `shared_experts`)
    name.split(".experts.")
        .skip(1)
        .any(|rest| rest.split('.').next().is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
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

/// The header of a safetensors file, checked against the file's size, so a truncated download is
/// reported by name instead of surfacing later as a read error deep inside MLX. Returns the
/// offset where the tensor data starts and the tensors (name, dtype, shape, byte range).
/// One tensor of a safetensors header.
struct TensorEntry {
    name: String,
    dtype: Dtype,
    /// Bytes per element.
    size: usize,
    shape: Vec<i32>,
    /// Byte range in the data section.
    range: (usize, usize),
}

fn read_header(path: &Path, bytes: &[u8]) -> Result<(usize, Vec<TensorEntry>)> {
    let (n, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
        anyhow!(
            "{} is not a valid safetensors file ({e:?}); it is probably truncated or corrupt — re-download it",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let Some(dtype) = safetensors_dtype(info.dtype) else {
            bail!("{}: tensor `{name}` has dtype {:?}, which MLX cannot load", path.display(), info.dtype);
        };
        let shape =
            info.shape.iter().map(|&d| i32::try_from(d)).collect::<Result<Vec<i32>, _>>().map_err(|_| {
                anyhow!("{}: tensor `{name}` has a dimension over 2^31 ({:?})", path.display(), info.shape)
            })?;
        out.push(TensorEntry { name, dtype, size: info.dtype.size(), shape, range: info.data_offsets });
    }
    Ok((n + 8, out))
}

extern "C" {
    /// kernels/cpu/zmlx_mmap.cpp: an MLX CPU array reading `data` in place.
    fn zmlx_cpu_array_over(
        res: *mut mlx_sys::mlx_array,
        data: *mut std::ffi::c_void,
        shape: *const std::ffi::c_int,
        dim: std::ffi::c_int,
        dtype: mlx_sys::mlx_dtype,
        payload: *mut std::ffi::c_void,
        dtor: unsafe extern "C" fn(*mut std::ffi::c_void),
    ) -> std::ffi::c_int;
    /// kernels/cpu/zmlx_mmap.cpp: a new uninitialised MLX CPU array and its bytes.
    fn zmlx_cpu_array_alloc(
        res: *mut mlx_sys::mlx_array,
        shape: *const std::ffi::c_int,
        dim: std::ffi::c_int,
        dtype: mlx_sys::mlx_dtype,
        data: *mut *mut std::ffi::c_void,
    ) -> std::ffi::c_int;
}

/// Drops the mapping reference an MLX array held (the `dtor` of `mlx_array_new_data_managed_payload`).
unsafe extern "C" fn release_mapping(payload: *mut std::ffi::c_void) {
    // SAFETY: `payload` is the `Arc::into_raw` made for this array in `map_file`, released once.
    drop(unsafe { Arc::from_raw(payload as *const memmap2::MmapMut) });
}

/// Every tensor of one safetensors file as an MLX array over a private copy-on-write mapping of
/// the file, without copying on the CPU backend: MLX's own constructors copy there (its CPU
/// allocator cannot adopt foreign memory), so `zmlx_cpu_array_over` (kernels/cpu/zmlx_mmap.cpp)
/// builds the array on the mapped bytes. The checkpoint's pages are then the weights and nothing
/// is read before it is used (the kernel pages them in, and can drop clean pages again under
/// pressure). Other backends go through `mlx_array_new_data_managed_payload`, which copies
/// (CUDA; Metal unless page-aligned), releasing the mapping reference right after.
/// Each array holds a reference to the mapping; the file is unmapped when the last one is freed.
/// The mapping is private and writable, so if MLX ever writes in place into a weight buffer it
/// gets its own copy of the page, never the file. A tensor whose data is not aligned to its
/// element size is read into a buffer MLX owns instead (MLX's CPU kernels assume element-aligned
/// data): safetensors does not promise alignment, and MLX's `save_safetensors` (so every
/// `mlx_lm.convert` output) writes the header unpadded, so there it is usually every tensor —
/// one copy, as MLX's loader makes, without the mapping's pages staying resident.
/// Byte order: safetensors is little-endian, as is every target zmlx builds for (x86-64, aarch64).
fn map_file(path: &Path, lazy: &dyn Fn(&str) -> bool) -> Result<Vec<(String, Loaded)>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let shared_file = Arc::new(file.try_clone().with_context(|| format!("cannot open {}", path.display()))?);
    let shared_path = Arc::new(path.to_path_buf());
    // SAFETY: a private mapping; the file is not ours to change and we never write through it.
    // (Another process truncating the file under us would fault, as with any mmap-based loader.)
    let mut map = unsafe { memmap2::MmapOptions::new().map_copy(&file) }
        .with_context(|| format!("cannot map {}", path.display()))?;
    let (start, tensors) = read_header(path, &map)?;
    let base = map.as_mut_ptr();
    // The CPU backend adopts the mapped bytes (zmlx_mmap.cpp); others copy inside MLX.
    let zero_copy = crate::mlx_env::backend() == crate::mlx_env::Backend::Cpu;
    let map = Arc::new(map);
    let mut out = Vec::with_capacity(tensors.len());
    for TensorEntry { name, dtype, size, shape, range: (b, e) } in tensors {
        if lazy(&name) {
            let bytes = FileBytes {
                file: Arc::clone(&shared_file),
                path: Arc::clone(&shared_path),
                offset: (start + b) as u64,
                len: e - b,
            };
            out.push((name, Loaded::Lazy(LazyTensor { dtype, shape, parts: vec![bytes], stacked_from_parts: false })));
            continue;
        }
        // SAFETY: read_header checked every byte range against the file's length.
        let ptr = unsafe { base.add(start + b) };
        let dim = shape.len() as i32;
        let raw = if e > b && (ptr as usize) % size != 0 {
            if zero_copy {
                // Read it (not through the mapping, whose pages would stay resident) into a
                // buffer MLX owns.
                let mut raw = unsafe { mlx_sys::mlx_array_new() };
                let mut data = std::ptr::null_mut();
                let rc = unsafe { zmlx_cpu_array_alloc(&mut raw, shape.as_ptr(), dim, dtype.into(), &mut data) };
                if rc != 0 || data.is_null() {
                    unsafe { mlx_sys::mlx_array_free(raw) };
                    bail!("MLX could not allocate tensor `{name}` of {} ({} bytes)", path.display(), e - b);
                }
                // SAFETY: `data` is the new array's own buffer of exactly `e - b` bytes.
                let dst = unsafe { std::slice::from_raw_parts_mut(data as *mut u8, e - b) };
                if let Err(err) = file.read_exact_at(dst, (start + b) as u64) {
                    unsafe { mlx_sys::mlx_array_free(raw) };
                    bail!("cannot read tensor `{name}` of {}: {err}", path.display());
                }
                raw
            } else {
                unsafe { mlx_sys::mlx_array_new_data(ptr as *const _, shape.as_ptr(), dim, dtype.into()) }
            }
        } else {
            let payload = Arc::into_raw(Arc::clone(&map)) as *mut std::ffi::c_void;
            // SAFETY: `ptr` points at `e - b` bytes of the mapping (with the 8-byte header
            // before it), which the payload keeps alive until MLX calls `release_mapping`.
            if zero_copy {
                let mut raw = unsafe { mlx_sys::mlx_array_new() };
                let rc = unsafe {
                    zmlx_cpu_array_over(
                        &mut raw,
                        ptr as *mut _,
                        shape.as_ptr(),
                        dim,
                        dtype.into(),
                        payload,
                        release_mapping,
                    )
                };
                if rc != 0 {
                    unsafe { mlx_sys::mlx_array_free(raw) };
                    bail!(
                        "MLX could not read {}: cannot make an array of tensor `{name}` over the mapped file",
                        path.display()
                    );
                }
                raw
            } else {
                unsafe {
                    mlx_sys::mlx_array_new_data_managed_payload(
                        ptr as *mut _,
                        shape.as_ptr(),
                        dim,
                        dtype.into(),
                        payload,
                        Some(release_mapping),
                    )
                }
            }
        };
        if raw.ctx.is_null() {
            bail!("MLX could not read {}: cannot make an array of tensor `{name}`", path.display());
        }
        // SAFETY: a fresh, owned mlx_array.
        out.push((name, Loaded::Array(unsafe { Array::from_ptr(raw) })));
    }
    Ok(out)
}

/// A tensor as [`map_file`] hands it out.
enum Loaded {
    Array(Array),
    Lazy(LazyTensor),
}

/// A new, uninitialised, row-contiguous MLX CPU array and a pointer to its bytes (for the caller
/// to fill before anything reads it).
pub fn cpu_array_alloc(shape: &[i32], dtype: Dtype) -> Result<(Array, *mut u8)> {
    let mut raw = unsafe { mlx_sys::mlx_array_new() };
    let mut data = std::ptr::null_mut();
    // SAFETY: shape outlives the call; MLX writes the new array into `raw`.
    let rc = unsafe { zmlx_cpu_array_alloc(&mut raw, shape.as_ptr(), shape.len() as i32, dtype.into(), &mut data) };
    if rc != 0 || data.is_null() || raw.ctx.is_null() {
        unsafe { mlx_sys::mlx_array_free(raw) };
        bail!("MLX could not allocate a {dtype:?} array of shape {shape:?}");
    }
    // SAFETY: a fresh, owned mlx_array.
    Ok((unsafe { Array::from_ptr(raw) }, data as *mut u8))
}

impl WeightStore {
    /// Opens every safetensors file of `dir`, memory-mapped: tensors are arrays over the files'
    /// pages (see [`map_file`]), read only when used.
    pub fn open(dir: &Path) -> Result<WeightStore> {
        WeightStore::open_with(dir, &|_| false)
    }

    /// [`open`](Self::open), leaving the tensors `lazy` selects in the files ([`LazyTensor`]).
    pub fn open_with(dir: &Path, lazy: &dyn Fn(&str) -> bool) -> Result<WeightStore> {
        let mut tensors = BTreeMap::new();
        let mut lazies = BTreeMap::new();
        let mut origin = HashMap::new();
        for file in checkpoint_files(dir)? {
            let loaded = map_file(&file, lazy)?;
            for (name, t) in loaded {
                if let Some(prev) = origin.get(&name) {
                    let prev: &Origin = prev;
                    bail!("tensor `{name}` appears in both {} and {}", prev.file.display(), file.display());
                }
                origin.insert(name.clone(), Origin { file: file.clone() });
                match t {
                    Loaded::Array(a) => tensors.insert(name, a).map(|_| ()),
                    Loaded::Lazy(l) => lazies.insert(name, l).map(|_| ()),
                };
            }
        }
        Ok(WeightStore { tensors, lazy: lazies, origin, dir: dir.to_path_buf() })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.lazy.contains_key(name)
    }

    /// Every tensor name, loaded or left in the files.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys().chain(self.lazy.keys())
    }

    /// The lazy tensors whose names start with `prefix`.
    pub fn lazy_under<'s>(&'s self, prefix: &'s str) -> impl Iterator<Item = (&'s String, &'s LazyTensor)> + 's {
        self.lazy.range(prefix.to_owned()..).take_while(move |(k, _)| k.starts_with(prefix))
    }

    pub fn is_lazy(&self, name: &str) -> bool {
        self.lazy.contains_key(name)
    }

    /// Removes and returns a tensor left in its file; a missing one is an error naming the checkpoint.
    pub fn take_lazy(&mut self, name: &str) -> Result<LazyTensor> {
        self.lazy.remove(name).ok_or_else(|| {
            anyhow!(
                "tensor `{name}` is missing from the checkpoint in {} (or was loaded into memory)",
                self.dir.display()
            )
        })
    }

    /// Per-expert lazy tensors `{prefix}.{e}.{suffix}` (e = 0..E) as one stacked lazy tensor
    /// `into` (what [`crate::models`]' sanitize does with arrays for HF layouts). False when
    /// expert 0's tensor is not lazy (then the caller stacks arrays).
    pub fn stack_lazy(&mut self, prefix: &str, suffix: &str, experts: i32, into: &str) -> Result<bool> {
        let first = format!("{prefix}.0.{suffix}");
        if !self.lazy.contains_key(&first) {
            return Ok(false);
        }
        let mut parts = Vec::with_capacity(experts.max(0) as usize);
        let mut head: Option<(Dtype, Vec<i32>)> = None;
        for e in 0..experts {
            let name = format!("{prefix}.{e}.{suffix}");
            let t = self.lazy.remove(&name).ok_or_else(|| {
                anyhow!(
                    "{}: tensor `{name}` is missing: expert 0 has `{first}`, so all {experts} experts (num_experts in config.json) must",
                    self.file_of(&first)
                )
            })?;
            match &head {
                None => head = Some((t.dtype, t.shape.clone())),
                Some((d, sh)) if *d != t.dtype || *sh != t.shape => bail!(
                    "{}: `{name}` is {:?} {:?} but `{first}` is {d:?} {sh:?}; every expert must have the same shape and dtype",
                    self.file_of(&name),
                    t.dtype,
                    t.shape
                ),
                Some(_) => {}
            }
            parts.push(t.parts[0].clone());
        }
        let (dtype, shape) = head.unwrap_or((Dtype::Float32, vec![]));
        let shape = std::iter::once(experts).chain(shape).collect();
        let origin = self.origin.get(&first).cloned().unwrap_or(Origin { file: self.dir.clone() });
        self.origin.insert(into.to_owned(), origin);
        self.lazy.insert(into.to_owned(), LazyTensor { dtype, shape, parts, stacked_from_parts: true });
        Ok(true)
    }

    /// Where `name` is stored, for messages.
    pub fn file_of(&self, name: &str) -> String {
        self.origin.get(name).map(|o| o.file.display().to_string()).unwrap_or_else(|| self.dir.display().to_string())
    }

    /// Removes and returns a tensor; a missing one is an error naming the checkpoint.
    pub fn take(&mut self, name: &str) -> Result<Array> {
        if self.lazy.contains_key(name) {
            bail!("tensor `{name}` holds routed experts, which expert offloading leaves in {}", self.file_of(name));
        }
        self.tensors.remove(name).ok_or_else(|| {
            anyhow!(
                "tensor `{name}` is missing from the checkpoint in {} (is the file complete and the \
                 config's model_type/num_hidden_layers/num_experts right?)",
                self.dir.display()
            )
        })
    }

    pub fn peek_dtype(&self, name: &str) -> Option<Dtype> {
        self.tensors.get(name).map(Array::dtype).or_else(|| self.lazy.get(name).map(|l| l.dtype))
    }

    pub fn take_opt(&mut self, name: &str) -> Option<Array> {
        self.lazy.remove(name);
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
        if self.tensors.is_empty() && self.lazy.is_empty() {
            return Ok(());
        }
        let extra: Vec<String> = self.names().take(5).map(|k| format!("`{k}` ({})", self.file_of(k))).collect();
        bail!(
            "{} unexpected tensor(s) in the checkpoint, e.g. {}; the config.json does not describe these weights \
             (wrong model_type or num_hidden_layers?)",
            self.tensors.len() + self.lazy.len(),
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
