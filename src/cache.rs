//! mlx-lm's KVCache: buffers grown in steps of 256 positions, written in place; and the split of
//! a batch of independent sequences into per-sequence attention calls.
use anyhow::{bail, Result};
use mlx_rs::ops::indexing::{Ellipsis, TryIndexMutOp, TryIndexOp};
use mlx_rs::{ops, Array, Dtype};

const STEP: i32 = 256;

#[derive(Default)]
pub struct KvCache {
    keys: Option<Array>,
    values: Option<Array>,
    /// Number of positions already cached.
    pub offset: i32,
}

impl KvCache {
    /// Appends `keys`/`values` `[B, H, L, D]` and returns everything cached so far.
    pub fn update_and_fetch(&mut self, keys: &Array, values: &Array) -> Result<(Array, Array)> {
        let prev = self.offset;
        let l = keys.dim(2);
        self.reserve(
            l,
            [keys.dim(0), keys.dim(1), keys.dim(3)],
            [values.dim(0), values.dim(1), values.dim(3)],
            (keys.dtype(), values.dtype()),
        )?;
        self.offset += l;
        let (k, v) = (self.keys.as_mut().unwrap(), self.values.as_mut().unwrap());
        k.try_index_mut((Ellipsis, prev..self.offset, ..), keys)?;
        v.try_index_mut((Ellipsis, prev..self.offset, ..), values)?;
        Ok((k.try_index((Ellipsis, ..self.offset, ..))?, v.try_index((Ellipsis, ..self.offset, ..))?))
    }

    /// Makes room for `l` more positions (mlx-lm's growth: whole steps of 256, the used part of
    /// the old buffer kept) for keys `[B, H, ·, Dk]` and values `[B, H, ·, Dv]` (`[B, H, Dk]`,
    /// `[B, H, Dv]` given) of the given dtypes.
    pub fn reserve(&mut self, l: i32, k_bhd: [i32; 3], v_bhd: [i32; 3], dtypes: (Dtype, Dtype)) -> Result<()> {
        let prev = self.offset;
        let capacity = self.keys.as_ref().map_or(0, |k| k.dim(2));
        if self.keys.is_some() && prev + l <= capacity {
            return Ok(());
        }
        let n_steps = (STEP + l - 1) / STEP;
        let grow = |cur: Option<&Array>, [b, h, d]: [i32; 3], dtype: Dtype| -> Result<Array> {
            let fresh = ops::zeros_dtype(&[b, h, n_steps * STEP, d], dtype)?;
            Ok(match cur {
                None => fresh,
                Some(c) => {
                    let c = if prev % STEP != 0 { c.try_index((Ellipsis, ..prev, ..))? } else { c.clone() };
                    ops::concatenate(&[c, fresh], 2)?
                }
            })
        };
        self.keys = Some(grow(self.keys.as_ref(), k_bhd, dtypes.0)?);
        self.values = Some(grow(self.values.as_ref(), v_bhd, dtypes.1)?);
        Ok(())
    }

    /// The key and value buffers `[B, H, capacity, D]` (after [`reserve`](Self::reserve)).
    pub fn buffers(&self) -> Option<(&Array, &Array)> {
        Some((self.keys.as_ref()?, self.values.as_ref()?))
    }

    /// Installs buffers that a fused kernel wrote `l` new positions into (at `offset`).
    pub fn commit(&mut self, keys: Array, values: Array, l: i32) {
        self.keys = Some(keys);
        self.values = Some(values);
        self.offset += l;
    }

    /// Arrays to evaluate after a prefill chunk.
    pub fn state(&self) -> Vec<&Array> {
        self.keys.iter().chain(self.values.iter()).collect()
    }
}

/// Runs the position-dependent part of attention (`f`: RoPE, cache update, SDPA) for a batch.
/// `parts` are `[B, ...]` arrays whose row b belongs to sequence b. One cache: `f` sees the
/// whole batch (mlx-lm's layout). One cache per row: `f` runs once per sequence on its rows and
/// cache, and the outputs are joined along axis 0 — so a sequence's attention is computed
/// exactly as in a batch-1 run (its own length, no padding, no mask over other rows), which is
/// what makes batched decode batch-invariant.
pub fn per_sequence(
    parts: &[&Array],
    caches: &mut [KvCache],
    mut f: impl FnMut(&[Array], &mut KvCache) -> Result<Array>,
) -> Result<Array> {
    let b = parts.first().map_or(0, |a| a.dim(0));
    match caches {
        [] => bail!("attention was given no KV cache"),
        [one] => f(&parts.iter().map(|&a| a.clone()).collect::<Vec<_>>(), one),
        many if many.len() as i32 == b => {
            let mut outs = Vec::with_capacity(many.len());
            for (i, cache) in many.iter_mut().enumerate() {
                let i = i as i32;
                let rows = parts.iter().map(|a| a.try_index(i..i + 1)).collect::<Result<Vec<_>, _>>()?;
                outs.push(f(&rows, cache)?);
            }
            Ok(ops::concatenate(&outs, 0)?)
        }
        many => bail!("attention got {} KV caches for a batch of {b} rows: give one, or one per row", many.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mlx_rs::random;

    /// Growing past the 256-slot step keeps exactly what a plain concatenation would.
    #[test]
    fn growth_matches_concatenation() {
        let mut cache = KvCache::default();
        let mut all_k: Vec<Array> = vec![];
        for (i, l) in [3, 1, 300, 1, 200].into_iter().enumerate() {
            let key = random::key(i as u64).unwrap();
            let k = random::normal::<f32>(&[1, 2, l, 4][..], None, None, &key).unwrap();
            let v = k.multiply(Array::from_f32(2.0)).unwrap();
            let (ck, cv) = cache.update_and_fetch(&k, &v).unwrap();
            all_k.push(k);
            let want = ops::concatenate(&all_k, 2).unwrap();
            assert_eq!(ck.shape(), want.shape());
            assert!(ck.eq_values(&want).unwrap());
            assert!(cv.eq_values(want.multiply(Array::from_f32(2.0)).unwrap()).unwrap());
        }
        assert_eq!(cache.offset, 505);
    }
}
