//! The bytes of synthesized tensors, in pure Rust: a Xoshiro256++ stream per (seed, logical
//! tensor name, block index, part), so a tensor does not depend on which others are written or in
//! what order, and expert `e` of a stacked tensor is the same matrix as the Hugging Face layout's
//! per-expert tensor `e` (both are keyed by the stacked name and `e`).
//!
//! Float values are normal (rand_distr's ziggurat), converted to the stored dtype with
//! round-to-nearest-even. Quantized tensors are written directly in MLX's affine layout: the
//! packed words are uniform random bits (every bit pattern is a valid packed tensor, for every
//! bit width, and its q values are uniform over 0..2^b), and each group's scale is chosen so the
//! dequantized weights `scale·q + bias` have the float init's standard deviation:
//! `var(q) = (4^b − 1)/12`, so `scale = std / sqrt((4^b − 1)/12)` (jittered ±10 % per group) and
//! `bias = mean − scale·(2^b − 1)/2` (plus a jitter of ±5 % of std).
use half::{bf16, f16};
use rand::{Rng, RngCore, SeedableRng};
use rand_distr::StandardNormal;
use rand_xoshiro::Xoshiro256PlusPlus;

/// Which stream of a block.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Float = 1,
    Packed = 2,
    Groups = 3,
    Tokens = 4,
    Calibration = 5,
}

/// The random stream of block `index` of the logical tensor `name` (FNV-1a of the key, expanded
/// by SplitMix64 inside `seed_from_u64`).
pub fn rng(seed: u64, name: &str, index: u64, stream: Stream) -> Xoshiro256PlusPlus {
    let mut h = 0xcbf29ce484222325u64;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
    };
    eat(&seed.to_le_bytes());
    eat(name.as_bytes());
    eat(&[0xff]);
    eat(&index.to_le_bytes());
    eat(&[stream as u8]);
    Xoshiro256PlusPlus::seed_from_u64(h)
}

/// Stored float dtype of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatKind {
    F32,
    F16,
    Bf16,
}

impl FloatKind {
    pub fn size(self) -> usize {
        match self {
            FloatKind::F32 => 4,
            _ => 2,
        }
    }

    pub fn st(self) -> safetensors::Dtype {
        match self {
            FloatKind::F32 => safetensors::Dtype::F32,
            FloatKind::F16 => safetensors::Dtype::F16,
            FloatKind::Bf16 => safetensors::Dtype::BF16,
        }
    }

    pub fn push(self, out: &mut Vec<u8>, x: f32) {
        match self {
            FloatKind::F32 => out.extend_from_slice(&x.to_le_bytes()),
            FloatKind::F16 => out.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
            FloatKind::Bf16 => out.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
        }
    }
}

/// Stored float bytes back to f32 (little-endian f32, f16 or bf16).
pub fn to_f32(bytes: Vec<u8>, dtype: safetensors::Dtype) -> Vec<f32> {
    match dtype {
        safetensors::Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        safetensors::Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
    }
}

/// `n` normal values `mean + std·z` from `r`.
pub fn normals(r: &mut Xoshiro256PlusPlus, n: usize, mean: f32, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let z: f32 = r.sample(StandardNormal);
            mean + std * z
        })
        .collect()
}

/// Appends `n` normal values in `kind` to `out`.
pub fn push_normals(out: &mut Vec<u8>, r: &mut Xoshiro256PlusPlus, n: usize, mean: f32, std: f32, kind: FloatKind) {
    for _ in 0..n {
        let z: f32 = r.sample(StandardNormal);
        kind.push(out, mean + std * z);
    }
}

/// Appends `bytes` uniform random bytes (packed q values) to `out`.
pub fn push_packed(out: &mut Vec<u8>, r: &mut Xoshiro256PlusPlus, bytes: usize) {
    let start = out.len();
    out.resize(start + bytes, 0);
    r.fill_bytes(&mut out[start..]);
}

/// (scale, bias) of `groups` groups of `bits`-bit weights whose dequantized values have standard
/// deviation ≈ `std` around `mean`.
pub fn group_params(
    r: &mut Xoshiro256PlusPlus,
    groups: usize,
    bits: i32,
    mean: f32,
    std: f32,
) -> impl Iterator<Item = (f32, f32)> + '_ {
    let levels = (1u64 << bits) as f64;
    let base = std as f64 / ((levels * levels - 1.0) / 12.0).sqrt();
    let half_span = (levels - 1.0) / 2.0;
    (0..groups).map(move |_| {
        let (u, v): (f64, f64) = (r.random(), r.random());
        let scale = base * (0.9 + 0.2 * u);
        let bias = mean as f64 - scale * half_span + std as f64 * 0.1 * (v - 0.5);
        (scale as f32, bias as f32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dequantized uniform q with the chosen scales has the requested std, for every width.
    #[test]
    fn dequantized_std_matches_the_float_init() {
        for bits in [2, 3, 4, 5, 6, 8] {
            let mut r = rng(1, "w", 0, Stream::Groups);
            let mut q = rng(1, "w", 0, Stream::Packed);
            let params: Vec<_> = group_params(&mut r, 2000, bits, 0.0, 0.5).collect();
            let (mut s1, mut s2, mut n) = (0f64, 0f64, 0f64);
            for (scale, bias) in params {
                for _ in 0..64 {
                    let v = (q.next_u32() & ((1 << bits) - 1)) as f64 * scale as f64 + bias as f64;
                    s1 += v;
                    s2 += v * v;
                    n += 1.0;
                }
            }
            let (m, sd) = (s1 / n, (s2 / n - (s1 / n).powi(2)).sqrt());
            assert!(m.abs() < 0.02, "{bits} bits: mean {m}");
            assert!((sd - 0.5).abs() < 0.02, "{bits} bits: std {sd}");
        }
    }

    #[test]
    fn streams_are_keyed() {
        let a = rng(0, "x", 0, Stream::Float).next_u64();
        assert_eq!(a, rng(0, "x", 0, Stream::Float).next_u64());
        assert_ne!(a, rng(1, "x", 0, Stream::Float).next_u64());
        assert_ne!(a, rng(0, "y", 0, Stream::Float).next_u64());
        assert_ne!(a, rng(0, "x", 1, Stream::Float).next_u64());
        assert_ne!(a, rng(0, "x", 0, Stream::Packed).next_u64());
    }
}
