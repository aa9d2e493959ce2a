//! Expert offloading: routed experts stay in the safetensors files and only a bounded pool of
//! them per MoE layer is in memory. Each layer's expert weights are pool arrays `[C, ...]`
//! (C slots, E ≥ C experts); the MoE block evaluates its router, makes sure every selected
//! expert is in a slot (reading a miss's bytes from its file into the slot; a victim chosen by
//! LRU or LFU), and runs the experts — stock or patched, unchanged — on the slot indices. The
//! kernels see the same bytes as with the whole stack resident, so the output is bit-identical.
//! A prefetch thread loads the experts the *next* MoE layer's router picks on the current hidden
//! state while this layer computes.
//!
//! Ordering: MLX evaluates lazily on its own thread, so a slot may only be overwritten once no
//! queued kernel can read it. Every layer keeps its last output (`pending`) and evaluates it
//! before its slots change (cheap: by then it is usually done); the prefetcher is given a layer
//! only after that fence, and a layer waits for its prefetches before it changes slots itself.
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use anyhow::{bail, Result};
use mlx_rs::{Array, Dtype};

use crate::config::QuantParams;
use crate::nn::{keep_scales_stored, LoadCtx, QWeight, Weight};
use crate::slots::{CombineSlot, ExpertsSlot, RouterSlot, Routing};
use crate::weights::LazyTensor;

/// How big the expert pool is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheSize {
    /// Slots per MoE layer.
    Experts(usize),
    /// Bytes for all MoE layers together (slots per layer = what fits, at least top-k).
    Bytes(u64),
}

/// Which resident expert a miss replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Least recently used.
    Lru,
    /// Least frequently used (selections so far), ties by least recently used.
    Lfu,
}

/// `--expert-cache*` as parsed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OffloadConfig {
    pub size: CacheSize,
    pub policy: Policy,
    pub prefetch: bool,
    /// Experts per layer to pin after the warm-up: the most often selected ones.
    pub pin: usize,
}

/// Counters of one model's expert cache (all layers).
#[derive(Default)]
pub struct Stats {
    /// Selected experts already in a slot (one per distinct expert per layer call).
    pub hits: AtomicU64,
    /// Selected experts read from the file on demand.
    pub misses: AtomicU64,
    /// Hits on a slot the prefetcher filled and nothing had used yet.
    pub prefetch_hits: AtomicU64,
    /// Experts the prefetcher read.
    pub prefetch_loads: AtomicU64,
    /// Bytes read from the files (misses and prefetches).
    pub bytes_read: AtomicU64,
    /// Time the model thread waited for expert bytes (its own reads and prefetches it needed).
    pub stall_ns: AtomicU64,
}

/// A snapshot of [`Stats`] plus the pool's shape, for reports (`generate --json`, ledger, /metrics).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub hits: u64,
    pub misses: u64,
    pub prefetch_hits: u64,
    pub prefetch_loads: u64,
    pub bytes_read: u64,
    pub stall_seconds: f64,
    /// Slots per MoE layer and experts per MoE layer.
    pub slots_per_layer: usize,
    pub experts_per_layer: usize,
    pub moe_layers: usize,
    /// Bytes of all pools (what stays resident for experts).
    pub pool_bytes: u64,
    /// Bytes of all experts of all MoE layers (what a resident load would hold).
    pub expert_bytes: u64,
    pub policy: String,
    pub prefetch: bool,
    /// Experts pinned per layer (`--expert-cache-pin`, after the warm-up).
    #[serde(default)]
    pub pinned_per_layer: usize,
}

impl StatsSnapshot {
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }

    /// These counters plus `other`'s (same cache).
    pub fn plus(&self, other: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            hits: self.hits + other.hits,
            misses: self.misses + other.misses,
            prefetch_hits: self.prefetch_hits + other.prefetch_hits,
            prefetch_loads: self.prefetch_loads + other.prefetch_loads,
            bytes_read: self.bytes_read + other.bytes_read,
            stall_seconds: self.stall_seconds + other.stall_seconds,
            ..self.clone()
        }
    }

    /// One line for reports.
    pub fn summary(&self) -> String {
        format!(
            "{} of {} experts per layer ({} of {} GB), {}{}: hit rate {:.1} % ({} hits, {} misses, {} prefetched, {} \
             prefetch hits), {} GB read, {:.3} s waiting",
            self.slots_per_layer,
            self.experts_per_layer,
            gb(self.pool_bytes),
            gb(self.expert_bytes),
            self.policy,
            if self.prefetch { " + prefetch" } else { "" },
            100.0 * self.hit_rate(),
            self.hits,
            self.misses,
            self.prefetch_loads,
            self.prefetch_hits,
            gb(self.bytes_read),
            self.stall_seconds
        )
    }

    /// The counters accumulated since `earlier` (same cache).
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            hits: self.hits - earlier.hits,
            misses: self.misses - earlier.misses,
            prefetch_hits: self.prefetch_hits - earlier.prefetch_hits,
            prefetch_loads: self.prefetch_loads - earlier.prefetch_loads,
            bytes_read: self.bytes_read - earlier.bytes_read,
            stall_seconds: self.stall_seconds - earlier.stall_seconds,
            ..self.clone()
        }
    }
}

/// Bytes as GB with enough digits for small checkpoints.
pub fn gb(bytes: u64) -> String {
    let g = bytes as f64 / 1e9;
    if g >= 0.1 {
        format!("{g:.2}")
    } else {
        format!("{g:.4}")
    }
}

/// [`ExpertCache::live`]: the counters, readable from any thread.
pub struct LiveStats {
    stats: Arc<Stats>,
    /// The pool's shape (its counters are not used).
    shape: StatsSnapshot,
}

impl LiveStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let s = &self.stats;
        StatsSnapshot {
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            prefetch_hits: s.prefetch_hits.load(Ordering::Relaxed),
            prefetch_loads: s.prefetch_loads.load(Ordering::Relaxed),
            bytes_read: s.bytes_read.load(Ordering::Relaxed),
            stall_seconds: s.stall_ns.load(Ordering::Relaxed) as f64 * 1e-9,
            ..self.shape.clone()
        }
    }
}

/// One expert tensor of a layer: where each expert's bytes are and the pool array they go to.
struct PooledTensor {
    name: String,
    source: LazyTensor,
    /// The pool array's bytes (owned by `LayerCache::arrays`).
    pool: usize,
    /// Bytes of one expert in the pool.
    slot_bytes: usize,
    /// Stored → pool conversion.
    widen: Widen,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Widen {
    /// Same dtype: the file bytes as they are.
    Copy,
    Bf16ToF32,
    F16ToF32,
}

// SAFETY: `pool` is the address of an MLX CPU buffer that `LayerCache::arrays` keeps alive for
// as long as any `LayerShared` exists (the prefetch thread is joined first, see ExpertCache's
// Drop); writes to one slot happen only under the protocol in the module doc.
unsafe impl Send for PooledTensor {}
unsafe impl Sync for PooledTensor {}

impl PooledTensor {
    /// Reads expert `e` into slot `s`; returns the bytes read.
    fn load(&self, e: usize, s: usize) -> Result<u64> {
        let src = self.source.expert(e);
        // SAFETY: slot `s` < C lies inside the pool array (C × slot_bytes bytes), and nothing
        // reads or writes it concurrently (module doc).
        let dst =
            unsafe { std::slice::from_raw_parts_mut((self.pool + s * self.slot_bytes) as *mut u8, self.slot_bytes) };
        match self.widen {
            Widen::Copy => src.read_into(dst)?,
            Widen::Bf16ToF32 | Widen::F16ToF32 => {
                let mut raw = vec![0u8; src.len];
                src.read_into(&mut raw)?;
                for (i, h) in raw.chunks_exact(2).enumerate() {
                    let bits = u16::from_le_bytes([h[0], h[1]]);
                    let f = if self.widen == Widen::Bf16ToF32 {
                        half::bf16::from_bits(bits).to_f32()
                    } else {
                        half::f16::from_bits(bits).to_f32()
                    };
                    dst[4 * i..4 * i + 4].copy_from_slice(&f.to_le_bytes());
                }
            }
        }
        Ok(src.len as u64)
    }
}

/// Which expert each slot holds, and the bookkeeping of the policy.
struct SlotState {
    slot_of: Vec<Option<usize>>,
    expert_in: Vec<Option<usize>>,
    last_use: Vec<u64>,
    freq: Vec<u64>,
    /// Filled by the prefetcher, not used since.
    prefetched: Vec<bool>,
    /// Prefetch jobs of this layer not finished.
    inflight: usize,
    clock: u64,
    /// Slots never chosen as victims (`pin_most_frequent`).
    pinned: Vec<bool>,
}

/// What the prefetch thread and the model thread share of one layer.
struct LayerShared {
    tensors: Vec<PooledTensor>,
    experts: usize,
    slots: usize,
    policy: Policy,
    state: Mutex<SlotState>,
    done: Condvar,
    stats: Arc<Stats>,
}

impl LayerShared {
    /// A slot to overwrite: empty first, else by the policy among slots whose expert is not in
    /// `keep`. None when every slot holds a kept expert.
    fn victim(&self, st: &SlotState, keep: &[usize]) -> Option<usize> {
        if let Some(s) = st.expert_in.iter().position(Option::is_none) {
            return Some(s);
        }
        let free = (0..self.slots).filter(|&s| !st.pinned[s] && st.expert_in[s].is_some_and(|e| !keep.contains(&e)));
        match self.policy {
            Policy::Lru => free.min_by_key(|&s| st.last_use[s]),
            Policy::Lfu => free.min_by_key(|&s| (st.freq[st.expert_in[s].unwrap_or(0)], st.last_use[s])),
        }
    }

    fn assign(st: &mut SlotState, e: usize, s: usize) {
        if let Some(old) = st.expert_in[s] {
            st.slot_of[old] = None;
        }
        st.expert_in[s] = Some(e);
        st.slot_of[e] = Some(s);
    }

    fn read_expert(&self, e: usize, s: usize) -> Result<u64> {
        let mut n = 0;
        for t in &self.tensors {
            n += t.load(e, s).map_err(|err| anyhow::anyhow!("expert {e} of `{}`: {err:#}", t.name))?;
        }
        self.stats.bytes_read.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    /// Distinct experts one call may need: the slots not pinned (pinned experts a call needs
    /// count too, so this is conservative).
    fn capacity(&self) -> usize {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.slots - st.pinned.iter().filter(|&&p| p).count()
    }

    /// Loads the `n` experts selected most often so far (ties: lower index) and pins their
    /// slots; earlier pins are released first.
    fn pin_most_frequent(&self, n: usize) -> Result<()> {
        let top: Vec<usize> = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            while st.inflight > 0 {
                st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.pinned.iter_mut().for_each(|p| *p = false);
            let mut order: Vec<usize> = (0..self.experts).collect();
            order.sort_by_key(|&e| (std::cmp::Reverse(st.freq[e]), e));
            order.truncate(n);
            order
        };
        let slots = self.ensure(&top)?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for e in &top {
            st.pinned[slots[e]] = true;
        }
        Ok(())
    }

    /// The prefetch thread's job: load whichever of `experts` are not resident.
    fn prefetch(&self, experts: &[usize]) {
        for &e in experts {
            let s = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if st.slot_of[e].is_some() {
                    continue;
                }
                let Some(s) = self.victim(&st, experts) else { continue };
                Self::assign(&mut st, e, s);
                st.prefetched[s] = true;
                st.last_use[s] = st.clock;
                s
            };
            // A failed read leaves the slot marked for `e` with wrong bytes: drop the mapping
            // (the model thread then reads it itself and reports the error).
            if self.read_expert(e, s).is_err() {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.slot_of[e] = None;
                st.expert_in[s] = None;
                st.prefetched[s] = false;
            } else {
                self.stats.prefetch_loads.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.inflight -= 1;
        self.done.notify_all();
    }

    /// Makes every expert of `needed` (distinct) resident; returns each one's slot.
    fn ensure(&self, needed: &[usize]) -> Result<HashMap<usize, usize>> {
        let start = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // The prefetcher writes this layer's slots only while a job is in flight.
        while st.inflight > 0 {
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.clock += 1;
        let clock = st.clock;
        let mut map = HashMap::with_capacity(needed.len());
        let mut loads = Vec::new();
        for &e in needed {
            st.freq[e] += 1;
            match st.slot_of[e] {
                Some(s) => {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    if std::mem::take(&mut st.prefetched[s]) {
                        self.stats.prefetch_hits.fetch_add(1, Ordering::Relaxed);
                    }
                    st.last_use[s] = clock;
                    map.insert(e, s);
                }
                None => loads.push(e),
            }
        }
        for &e in &loads {
            let Some(s) = self.victim(&st, needed) else {
                bail!("expert cache: {} experts needed at once but only {} slots", needed.len(), self.slots);
            };
            Self::assign(&mut st, e, s);
            st.prefetched[s] = false;
            st.last_use[s] = clock;
            map.insert(e, s);
        }
        drop(st);
        for &e in &loads {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            if let Err(err) = self.read_expert(e, map[&e]) {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let s = map[&e];
                st.slot_of[e] = None;
                st.expert_in[s] = None;
                return Err(err);
            }
        }
        self.stats.stall_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(map)
    }
}

/// The next MoE layer's (stock) router and pool, for prefetch.
type NextLayer = (Rc<dyn RouterSlot>, Rc<LayerCache>);

/// One MoE layer's pool, as the model thread holds it.
pub struct LayerCache {
    /// The MoE block's module path.
    pub path: String,
    shared: Arc<LayerShared>,
    /// The pool arrays (their clones are the experts' weights).
    arrays: Vec<Array>,
    /// This layer's last routed output: evaluated before its slots change.
    pending: RefCell<Option<Array>>,
    /// The next MoE layer's router and pool, for prefetch.
    next: RefCell<Option<NextLayer>>,
    /// The prefetch thread's queue (None without prefetch, and once the cache is dropped).
    prefetcher: Rc<RefCell<Option<mpsc::Sender<Job>>>>,
}

impl Drop for LayerCache {
    fn drop(&mut self) {
        // The pool arrays go with this: no prefetch may still be writing into them.
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.inflight > 0 {
            st = self.shared.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

struct Job {
    layer: Arc<LayerShared>,
    experts: Vec<usize>,
}

impl LayerCache {
    /// Waits until no queued MLX work reads this layer's slots.
    fn fence(&self) -> Result<()> {
        if let Some(p) = self.pending.borrow_mut().take() {
            p.eval()?;
        }
        Ok(())
    }

    /// Links the next MoE layer (its stock router predicts what to prefetch).
    pub fn set_next(&self, router: Rc<dyn RouterSlot>, layer: Rc<LayerCache>) {
        *self.next.borrow_mut() = Some((router, layer));
    }

    /// Queues a load of the experts the next layer's router picks for `x`.
    fn prefetch_next(&self, x: &Array) -> Result<()> {
        let Some(tx) = self.prefetcher.borrow().clone() else {
            return Ok(());
        };
        let Some((router, next)) = self.next.borrow().clone() else {
            return Ok(());
        };
        let predicted = distinct(&host_indices(&router.route(x)?.indices)?);
        // Only the slots a miss may not take: a prediction wider than the pool is cut.
        let predicted: Vec<usize> = predicted.into_iter().take(next.shared.slots).collect();
        next.fence()?;
        next.shared.state.lock().unwrap_or_else(|p| p.into_inner()).inflight += 1;
        if tx.send(Job { layer: Arc::clone(&next.shared), experts: predicted }).is_err() {
            next.shared.state.lock().unwrap_or_else(|p| p.into_inner()).inflight -= 1;
        }
        Ok(())
    }

    /// The routed experts + combine of `x` `[B, L, D]` with `routing`, on this layer's pool:
    /// tokens in chunks whose distinct experts fit the slots.
    pub fn forward(
        &self,
        x: &Array,
        routing: &Routing,
        experts: &dyn ExpertsSlot,
        combine: &dyn CombineSlot,
    ) -> Result<Array> {
        let ids = host_indices(&routing.indices)?;
        self.prefetch_next(x)?;
        let k = routing.indices.dim(-1).max(1) as usize;
        let tokens = ids.len() / k;
        let chunks = token_chunks(&ids, k, self.shared.capacity());
        let out = if chunks.len() == 1 {
            self.run_chunk(x, routing, &ids, experts, combine)?
        } else {
            let d = x.dim(-1);
            let xf = x.reshape(&[1, tokens as i32, d])?;
            let idx = routing.indices.reshape(&[1, tokens as i32, k as i32])?;
            let w = routing.weights.reshape(&[1, tokens as i32, k as i32])?;
            let mut parts = Vec::with_capacity(chunks.len());
            for (a, b) in chunks {
                let sel = Array::from_slice(&(a as i32..b as i32).collect::<Vec<_>>(), &[(b - a) as i32]);
                let r = Routing { indices: idx.take_axis(&sel, 1)?, weights: w.take_axis(&sel, 1)? };
                parts.push(self.run_chunk(&xf.take_axis(&sel, 1)?, &r, &ids[a * k..b * k], experts, combine)?);
            }
            mlx_rs::ops::concatenate(&parts, 1)?.reshape(x.shape())?
        };
        Ok(out)
    }

    fn run_chunk(
        &self,
        x: &Array,
        routing: &Routing,
        ids: &[usize],
        experts: &dyn ExpertsSlot,
        combine: &dyn CombineSlot,
    ) -> Result<Array> {
        self.fence()?;
        let slots = self.shared.ensure(&distinct(ids))?;
        let remapped: Vec<u32> = ids.iter().map(|e| slots[e] as u32).collect();
        let r = Routing {
            indices: Array::from_slice(&remapped, routing.indices.shape()),
            weights: routing.weights.clone(),
        };
        let out = experts.forward_combined(x, &r, combine)?;
        *self.pending.borrow_mut() = Some(out.clone());
        Ok(out)
    }
}

/// Consecutive token ranges `[a, b)` whose distinct experts number at most `slots` (one token
/// needs at most k ≤ slots).
fn token_chunks(ids: &[usize], k: usize, slots: usize) -> Vec<(usize, usize)> {
    let tokens = ids.len() / k.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    let mut seen: Vec<usize> = Vec::new();
    for t in 0..tokens {
        let row = &ids[t * k..(t + 1) * k];
        let new = row.iter().filter(|e| !seen.contains(e)).count();
        if seen.len() + new > slots && t > start {
            out.push((start, t));
            start = t;
            seen.clear();
        }
        for &e in row {
            if !seen.contains(&e) {
                seen.push(e);
            }
        }
    }
    out.push((start, tokens));
    out
}

fn distinct(ids: &[usize]) -> Vec<usize> {
    let mut v = ids.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

/// Expert indices evaluated and read on the host, row-major.
fn host_indices(indices: &Array) -> Result<Vec<usize>> {
    let flat = indices.reshape(&[-1])?.as_dtype(Dtype::Uint32)?;
    flat.eval()?;
    Ok(flat.as_slice::<u32>().iter().map(|&i| i as usize).collect())
}

/// Every MoE layer's pool of one model, and the prefetch thread.
pub struct ExpertCache {
    pub layers: Vec<Rc<LayerCache>>,
    stats: Arc<Stats>,
    config: OffloadConfig,
    expert_bytes: u64,
    /// Experts a token selects.
    k: usize,
    sender: Rc<RefCell<Option<mpsc::Sender<Job>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ExpertCache {
    pub fn stats(&self) -> StatsSnapshot {
        let first = self.layers.first().map(|l| (l.shared.slots, l.shared.experts)).unwrap_or((0, 0));
        let shape = StatsSnapshot {
            slots_per_layer: first.0,
            experts_per_layer: first.1,
            moe_layers: self.layers.len(),
            pool_bytes: self.layers.iter().map(|l| l.arrays.iter().map(|a| a.nbytes() as u64).sum::<u64>()).sum(),
            expert_bytes: self.expert_bytes,
            policy: format!("{:?}", self.config.policy).to_lowercase(),
            prefetch: self.config.prefetch,
            pinned_per_layer: self.layers.first().map_or(0, |l| {
                l.shared.state.lock().unwrap_or_else(|p| p.into_inner()).pinned.iter().filter(|&&p| p).count()
            }),
            ..Default::default()
        };
        LiveStats { stats: Arc::clone(&self.stats), shape }.snapshot()
    }

    /// After a warm-up: pins the configured number of most selected experts (`--expert-cache-pin`).
    pub fn pin_after_warmup(&self) -> Result<()> {
        if self.config.pin > 0 {
            self.pin_most_frequent(self.config.pin)?;
        }
        Ok(())
    }

    /// Pins the `n` most often selected experts of every layer (counted so far, e.g. over a
    /// warm-up) in their slots, so no miss evicts them; `n` must leave at least top-k slots free.
    pub fn pin_most_frequent(&self, n: usize) -> Result<()> {
        for l in &self.layers {
            let free = l.shared.slots.saturating_sub(n);
            if free < self.k {
                bail!(
                    "--expert-cache-pin {n}: with {} slots per layer that leaves {free} for the {} experts a token \
                     selects; pin at most {} or give a larger cache",
                    l.shared.slots,
                    self.k,
                    l.shared.slots.saturating_sub(self.k)
                );
            }
            l.fence()?;
            l.shared.pin_most_frequent(n)?;
        }
        Ok(())
    }

    /// A thread-safe view of the counters (for the server's /metrics).
    pub fn live(&self) -> LiveStats {
        LiveStats { stats: Arc::clone(&self.stats), shape: self.stats() }
    }

    /// The pool of the MoE block at `path`.
    pub fn layer(&self, path: &str) -> Option<Rc<LayerCache>> {
        self.layers.iter().find(|l| l.path == path).cloned()
    }

    /// Gives every MoE block of `model` its pool and each pool the next MoE block's (stock)
    /// router, for prefetch. Every MoE block must have one.
    pub fn attach(&self, model: &mut crate::model::Model) -> Result<()> {
        let mut prev: Option<Rc<LayerCache>> = None;
        for (_, block) in model.moe_blocks_mut() {
            let Some(pool) = self.layer(&block.path) else {
                bail!("expert offloading: the MoE block `{}` has no expert pool (its experts were loaded)", block.path);
            };
            if let Some(p) = prev.take() {
                p.set_next(Rc::clone(block.router.stock()), Rc::clone(&pool));
            }
            block.offload = Some(Rc::clone(&pool));
            prev = Some(pool);
        }
        Ok(())
    }
}

impl Drop for ExpertCache {
    fn drop(&mut self) {
        // Closing the queue ends the thread once its jobs are done.
        self.sender.borrow_mut().take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Collects the pools while the model loads ([`pooled_weight`]), then becomes the [`ExpertCache`].
pub struct PoolBuilder {
    config: OffloadConfig,
    /// Slots per layer, fixed by the first expert tensor seen.
    slots: Option<usize>,
    moe_layers: usize,
    layers: Vec<(String, Vec<PooledTensor>, Vec<Array>, usize)>,
    expert_bytes: u64,
    stats: Arc<Stats>,
    k: usize,
}

impl PoolBuilder {
    pub fn new(config: OffloadConfig, moe_layers: usize) -> PoolBuilder {
        PoolBuilder { config, slots: None, moe_layers, layers: vec![], expert_bytes: 0, stats: Arc::default(), k: 0 }
    }

    /// Slots per layer for experts of `per_expert` bytes (all tensors of one expert of one
    /// layer), `experts` per layer and top-k `k`.
    fn slots_for(&mut self, per_expert: u64, experts: usize, k: usize) -> Result<usize> {
        if let Some(s) = self.slots {
            return Ok(s);
        }
        let s = match self.config.size {
            CacheSize::Experts(n) => n,
            CacheSize::Bytes(b) => (b / (per_expert * self.moe_layers.max(1) as u64).max(1)) as usize,
        };
        if s < k {
            let need = k as u64 * per_expert * self.moe_layers as u64;
            bail!(
                "--expert-cache: {s} expert slot(s) per layer is fewer than the {k} experts a token selects; give at \
                 least {k} experts per layer (--expert-cache-experts {k}) or {} GB (--expert-cache {})",
                gb(need),
                gb(need)
            );
        }
        let s = s.min(experts);
        self.slots = Some(s);
        Ok(s)
    }

    pub fn finish(self) -> Option<ExpertCache> {
        if self.layers.is_empty() {
            return None;
        }
        let (tx, rx) = if self.config.prefetch {
            let (tx, rx) = mpsc::channel::<Job>();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let sender = Rc::new(RefCell::new(tx));
        let thread = rx.map(|rx| {
            std::thread::Builder::new()
                .name("zmlx-expert-prefetch".into())
                .spawn(move || {
                    for job in rx {
                        job.layer.prefetch(&job.experts);
                    }
                })
                .expect("spawning the expert prefetch thread")
        });
        let stats = self.stats;
        let layers = self
            .layers
            .into_iter()
            .map(|(path, tensors, arrays, experts)| {
                let slots = self.slots.unwrap_or(0);
                Rc::new(LayerCache {
                    path,
                    shared: Arc::new(LayerShared {
                        tensors,
                        experts,
                        slots,
                        policy: self.config.policy,
                        state: Mutex::new(SlotState {
                            slot_of: vec![None; experts],
                            expert_in: vec![None; slots],
                            last_use: vec![0; slots],
                            freq: vec![0; experts],
                            prefetched: vec![false; slots],
                            inflight: 0,
                            clock: 0,
                            pinned: vec![false; slots],
                        }),
                        done: Condvar::new(),
                        stats: Arc::clone(&stats),
                    }),
                    arrays,
                    pending: RefCell::new(None),
                    next: RefCell::new(None),
                    prefetcher: Rc::clone(&sender),
                })
            })
            .collect();
        Some(ExpertCache {
            layers,
            stats,
            config: self.config,
            expert_bytes: self.expert_bytes,
            k: self.k,
            sender,
            thread,
        })
    }
}

/// Elements of one expert of a stacked tensor.
fn expert_elems(t: &LazyTensor) -> u64 {
    t.shape[1..].iter().map(|&v| v.max(0) as u64).product()
}

fn dtype_bytes(d: Dtype) -> u64 {
    match d {
        Dtype::Float32 | Dtype::Uint32 | Dtype::Int32 => 4,
        Dtype::Float16 | Dtype::Bfloat16 | Dtype::Uint16 | Dtype::Int16 => 2,
        Dtype::Float64 | Dtype::Uint64 | Dtype::Int64 | Dtype::Complex64 => 8,
        _ => 1,
    }
}

/// The MoE block path of an expert tensor path (`model.layers.3.mlp.switch_mlp.gate_proj` →
/// `model.layers.3.mlp`).
fn block_of(path: &str) -> &str {
    path.split(".switch_mlp.").next().unwrap_or(path)
}

/// A stacked expert weight `[E, out, in]` left in the files, as a pool of the configured slots
/// (`LoadCtx::weight` calls this for lazy tensors).
pub fn pooled_weight(ctx: &mut LoadCtx, path: &str, lead: &[i32], out: i32, inp: i32) -> Result<Weight> {
    if ctx.offload.is_none() {
        bail!("`{path}` was left in the checkpoint files but the model is not loading with an expert cache");
    }
    let [experts] = lead else {
        bail!("`{path}`: only stacked expert weights can be offloaded (leading shape {lead:?})");
    };
    let experts = *experts as usize;
    let k = ctx.config.num_experts_per_tok.max(1) as usize;
    let wname = format!("{path}.weight");
    let file = ctx.store.file_of(&wname);
    let quantized = ctx.store.contains(&format!("{path}.scales"));
    let mut parts: Vec<(String, LazyTensor, Dtype)> = Vec::new();
    let q = if quantized {
        let w = ctx.store.take_lazy(&wname)?;
        let sc = ctx.store.take_lazy(&format!("{path}.scales"))?;
        let bi = ctx.store.take_lazy(&format!("{path}.biases"))?;
        let packed = *w.shape.last().unwrap_or(&0);
        let groups = *sc.shape.last().unwrap_or(&0);
        if w.dtype != Dtype::Uint32 || packed <= 0 || groups <= 0 || (packed * 32) % inp != 0 || inp % groups != 0 {
            bail!(
                "{file}: quantized `{path}` has weight {:?} {:?} and scales {:?}, which do not fit input width {inp}",
                w.dtype,
                w.shape,
                sc.shape
            );
        }
        for (t, last, name) in [(&w, packed, "weight"), (&sc, groups, "scales"), (&bi, groups, "biases")] {
            if t.shape != [lead[0], out, last] {
                bail!("{file}: tensor `{path}.{name}` has shape {:?}, expected {:?}", t.shape, [lead[0], out, last]);
            }
        }
        if sc.dtype != bi.dtype || !keep_scales_stored(sc.dtype, ctx.dtype) {
            bail!(
                "{file}: `{path}` has {:?} scales/{:?} biases with compute dtype {:?}; expert offloading keeps them as \
                 stored, which needs both in one dtype equal to the compute dtype (or float32 compute: --dtype f32)",
                sc.dtype,
                bi.dtype,
                ctx.dtype
            );
        }
        let sdt = sc.dtype;
        parts.push(("weight".into(), w, Dtype::Uint32));
        parts.push(("scales".into(), sc, sdt));
        parts.push(("biases".into(), bi, sdt));
        Some(QuantParams { bits: packed * 32 / inp, group_size: inp / groups })
    } else {
        let w = ctx.store.take_lazy(&wname)?;
        if w.shape != [lead[0], out, inp] {
            bail!("{file}: tensor `{wname}` has shape {:?}, expected {:?}", w.shape, [lead[0], out, inp]);
        }
        parts.push(("weight".into(), w, ctx.dtype));
        None
    };
    let mut tensors = Vec::new();
    let mut arrays = Vec::new();
    let per_expert: u64 = parts.iter().map(|(_, t, d)| expert_elems(t) * dtype_bytes(*d)).sum();
    // Slots are sized from the whole layer's experts (this projection and the ones still in the
    // store), as pools hold them: float weights in the compute dtype.
    let block = block_of(path).to_owned();
    let rest: u64 = ctx
        .store
        .lazy_under(&format!("{block}.switch_mlp."))
        .map(|(name, t)| {
            let float_weight = name.ends_with(".weight") && t.dtype != Dtype::Uint32;
            expert_elems(t) * dtype_bytes(if float_weight { ctx.dtype } else { t.dtype })
        })
        .sum();
    let Some(builder) = ctx.offload.as_deref_mut() else { unreachable!("checked above") };
    builder.k = k;
    let slots = builder.slots_for(per_expert + rest, experts, k)?;
    builder.expert_bytes += per_expert * experts as u64;
    for (name, source, dtype) in parts {
        let widen = match (source.dtype, dtype) {
            (a, b) if a == b => Widen::Copy,
            (Dtype::Bfloat16, Dtype::Float32) => Widen::Bf16ToF32,
            (Dtype::Float16, Dtype::Float32) => Widen::F16ToF32,
            (a, b) => bail!(
                "{file}: `{path}.{name}` is stored as {a:?}; expert offloading cannot convert it to the compute dtype \
                 {b:?} (use --dtype matching the checkpoint, or f32)"
            ),
        };
        if source.experts() != experts {
            bail!("{file}: `{path}.{name}` has {} experts, expected {experts}", source.experts());
        }
        let mut shape = source.shape.clone();
        shape[0] = slots as i32;
        let (array, ptr) = crate::weights::cpu_array_alloc(&shape, dtype)?;
        let slot_bytes = array.nbytes() / slots;
        // SAFETY: the new array's own bytes; zeroed so an empty slot is never garbage.
        unsafe { std::ptr::write_bytes(ptr, 0, array.nbytes()) };
        tensors.push(PooledTensor { name: format!("{path}.{name}"), source, pool: ptr as usize, slot_bytes, widen });
        arrays.push(array);
    }
    let weight = match q {
        Some(q) => Weight::Quant(QWeight {
            weight: arrays[0].clone(),
            scales: arrays[1].clone(),
            biases: arrays[2].clone(),
            q,
        }),
        None => Weight::Float(arrays[0].clone()),
    };
    match builder.layers.iter_mut().find(|l| l.0 == block) {
        Some(l) => {
            l.1.extend(tensors);
            l.2.extend(arrays);
        }
        None => builder.layers.push((block, tensors, arrays, experts)),
    }
    Ok(weight)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_chunks_fit_the_slots() {
        // k = 2, 3 slots: tokens {0,1} {1,2} fit together (3 distinct); {3,4} starts a new chunk
        let ids = [0, 1, 1, 2, 3, 4, 3, 0];
        assert_eq!(token_chunks(&ids, 2, 3), vec![(0, 2), (2, 4)]);
        assert_eq!(token_chunks(&ids, 2, 8), vec![(0, 4)]);
        assert_eq!(token_chunks(&ids, 2, 2), vec![(0, 1), (1, 2), (2, 3), (3, 4)]);
    }

    #[test]
    fn expert_tensor_names() {
        assert!(crate::weights::is_expert_tensor("model.layers.0.mlp.switch_mlp.gate_proj.weight"));
        assert!(crate::weights::is_expert_tensor("model.layers.0.mlp.experts.12.up_proj.scales"));
        assert!(crate::weights::is_expert_tensor("model.layers.3.block_sparse_moe.experts.0.w1.weight"));
        assert!(!crate::weights::is_expert_tensor("model.layers.0.mlp.shared_experts.gate_proj.weight"));
        assert!(!crate::weights::is_expert_tensor("model.layers.0.mlp.gate.weight"));
        assert!(!crate::weights::is_expert_tensor("model.layers.0.mlp.experts.gate_up"));
    }
}
