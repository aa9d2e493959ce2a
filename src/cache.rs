//! mlx-lm's KVCache: buffers grown in steps of 256 positions, written in place.
use anyhow::Result;
use mlx_rs::ops::indexing::{Ellipsis, TryIndexMutOp, TryIndexOp};
use mlx_rs::{ops, Array};

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
        let capacity = self.keys.as_ref().map_or(0, |k| k.dim(2));
        if self.keys.is_none() || prev + l > capacity {
            let n_steps = (STEP + l - 1) / STEP;
            let grow = |cur: Option<&Array>, new: &Array| -> Result<Array> {
                let (b, h, d) = (new.dim(0), new.dim(1), new.dim(3));
                let fresh = ops::zeros_dtype(&[b, h, n_steps * STEP, d], new.dtype())?;
                Ok(match cur {
                    None => fresh,
                    Some(c) => {
                        let c = if prev % STEP != 0 { c.try_index((Ellipsis, ..prev, ..))? } else { c.clone() };
                        ops::concatenate(&[c, fresh], 2)?
                    }
                })
            };
            self.keys = Some(grow(self.keys.as_ref(), keys)?);
            self.values = Some(grow(self.values.as_ref(), values)?);
        }
        self.offset += l;
        let (k, v) = (self.keys.as_mut().unwrap(), self.values.as_mut().unwrap());
        k.try_index_mut((Ellipsis, prev..self.offset, ..), keys)?;
        v.try_index_mut((Ellipsis, prev..self.offset, ..), values)?;
        Ok((k.try_index((Ellipsis, ..self.offset, ..))?, v.try_index((Ellipsis, ..self.offset, ..))?))
    }

    /// Arrays to evaluate after a prefill chunk.
    pub fn state(&self) -> Vec<&Array> {
        self.keys.iter().chain(self.values.iter()).collect()
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
