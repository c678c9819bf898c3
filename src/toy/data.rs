//! The procedural image set: coloured shapes on coloured backgrounds, deterministic from a seed.
//!
//! Every image is drawn from its own random stream, `hash(seed, index)`, so `dataset(n, seed)`
//! is a prefix of `dataset(m, seed)` for `m ≥ n`, and the training stream (see
//! [`train_seed`]) never repeats the held-out images (see [`held_out_seed`]). Labels cycle
//! through the classes (`label = index mod N`), so any `n` that is a multiple of N is exactly
//! balanced and any other `n` is balanced to one image.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::{ToyError, CLASSES, IMAGE_SIZE, NUM_CLASSES};

/// Images with their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct ToyData {
    /// Pixels in `[-1, 1]`, NCHW (`n × 3 × 32 × 32`) flattened.
    pub images: Vec<f32>,
    /// Class index per image (into [`CLASSES`]).
    pub labels: Vec<usize>,
    /// Number of images.
    pub n: usize,
}

impl ToyData {
    /// The images as a `[n, 3, 32, 32]` tensor on `device`.
    pub fn images_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 4> {
        Tensor::from_data(
            TensorData::new(self.images.clone(), [self.n, 3, IMAGE_SIZE, IMAGE_SIZE]),
            device,
        )
    }

    /// The labels as a `[n]` integer tensor on `device`.
    pub fn labels_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 1, Int> {
        let labels: Vec<i64> = self.labels.iter().map(|&l| l as i64).collect();
        Tensor::from_data(TensorData::new(labels, [self.n]), device)
    }

    /// Number of images per class.
    pub fn class_counts(&self) -> [usize; NUM_CLASSES] {
        let mut counts = [0; NUM_CLASSES];
        for &l in &self.labels {
            counts[l] += 1;
        }
        counts
    }
}

/// `n` images (labels cycling through the classes) from the stream of `seed`.
pub fn dataset(n: usize, seed: u64) -> ToyData {
    dataset_range(seed, 0, n)
}

/// Images `start .. start + n` of the stream of `seed` (the training loop walks the stream).
pub fn dataset_range(seed: u64, start: usize, n: usize) -> ToyData {
    let pixels = 3 * IMAGE_SIZE * IMAGE_SIZE;
    let mut images = Vec::with_capacity(n * pixels);
    let mut labels = Vec::with_capacity(n);
    for index in start..start + n {
        let label = index % NUM_CLASSES;
        images.extend(render_indexed(label, seed, index as u64));
        labels.push(label);
    }
    ToyData { images, labels, n }
}

/// `n` images of one class (`label`), from the stream of `seed`.
pub fn dataset_of_class(label: usize, n: usize, seed: u64) -> Result<ToyData, ToyError> {
    check_class(label)?;
    let mut images = Vec::with_capacity(n * 3 * IMAGE_SIZE * IMAGE_SIZE);
    for index in 0..n {
        images.extend(render_indexed(label, seed, index as u64));
    }
    Ok(ToyData {
        images,
        labels: vec![label; n],
        n,
    })
}

/// The seed of the training stream derived from a run's seed.
pub fn train_seed(seed: u64) -> u64 {
    mix(seed ^ 0x7472_6169_6e00_0000)
}

/// The seed of the held-out split derived from a run's seed (disjoint from [`train_seed`]'s
/// stream).
pub fn held_out_seed(seed: u64) -> u64 {
    mix(seed ^ 0x6865_6c64_6f75_7400)
}

/// The index of a class name (as in [`CLASSES`]), or [`ToyError::UnknownClassName`].
pub fn class_index(name: &str) -> Result<usize, ToyError> {
    CLASSES
        .iter()
        .position(|c| c.eq_ignore_ascii_case(name.trim()))
        .ok_or_else(|| ToyError::UnknownClassName { name: name.to_string() })
}

/// Checks a class index.
pub(crate) fn check_class(label: usize) -> Result<(), ToyError> {
    if label < NUM_CLASSES {
        Ok(())
    } else {
        Err(ToyError::UnknownClass { index: label })
    }
}

/// SplitMix64's finaliser: a bijective 64-bit hash.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small deterministic generator (SplitMix64) for the data, the noise and the training loop.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(mix(seed))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    /// A standard normal sample (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// `n` standard normal samples as f32.
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal() as f32).collect()
    }
}

fn render_indexed(label: usize, seed: u64, index: u64) -> Vec<f32> {
    render(
        label,
        &mut Rng::new(mix(seed) ^ mix(index.wrapping_mul(0x2545_f491_4f6c_dd1d))),
    )
}

/// Is the point `(u, v)` (shape frame: centre 0, half-size 1, v pointing down) inside the shape?
fn inside(label: usize, u: f64, v: f64) -> bool {
    match label {
        // circle
        0 => u * u + v * v <= 0.92,
        // square
        1 => u.abs().max(v.abs()) <= 0.8,
        // triangle, apex up
        2 => {
            let (top, bottom) = (-0.95, 0.75);
            v <= bottom && v >= top && u.abs() <= 0.95 * (v - top) / (bottom - top)
        }
        // cross (plus sign)
        3 => (u.abs() <= 0.3 && v.abs() <= 1.0) || (v.abs() <= 0.3 && u.abs() <= 1.0),
        // ring
        4 => {
            let r2 = u * u + v * v;
            (0.3..=1.0).contains(&r2)
        }
        // diamond
        _ => u.abs() + v.abs() <= 1.05,
    }
}

/// One image of class `label`, RGB in `[-1, 1]`, CHW flattened.
fn render(label: usize, rng: &mut Rng) -> Vec<f32> {
    let s = IMAGE_SIZE as f64;
    // Background: a linear gradient between two colours in a random direction.
    let c0 = [rng.uniform(), rng.uniform(), rng.uniform()];
    let mix_to = rng.range(0.0, 0.5);
    let c1: Vec<f64> = c0.iter().map(|&c| c + (rng.uniform() - c) * mix_to).collect();
    let angle = rng.range(0.0, std::f64::consts::TAU);
    let (dx, dy) = (angle.cos(), angle.sin());
    let mean = [(c0[0] + c1[0]) / 2.0, (c0[1] + c1[1]) / 2.0, (c0[2] + c1[2]) / 2.0];
    // Foreground: a colour clearly apart from the background's mean.
    let fg = loop {
        let c = [rng.uniform(), rng.uniform(), rng.uniform()];
        let d2: f64 = c.iter().zip(&mean).map(|(a, b)| (a - b).powi(2)).sum();
        if d2 >= 0.25 {
            break c;
        }
    };
    // Size (half-extent in pixels), position and a small rotation.
    let r = rng.range(6.0, 12.0);
    let cx = rng.range(r + 1.0, s - 1.0 - r);
    let cy = rng.range(r + 1.0, s - 1.0 - r);
    let theta = rng.range(-0.35, 0.35);
    let (cos, sin) = (theta.cos(), theta.sin());

    const SUB: usize = 3;
    let mut out = vec![0f32; 3 * IMAGE_SIZE * IMAGE_SIZE];
    for y in 0..IMAGE_SIZE {
        for x in 0..IMAGE_SIZE {
            let mut cover = 0usize;
            for sy in 0..SUB {
                for sx in 0..SUB {
                    let px = x as f64 + (sx as f64 + 0.5) / SUB as f64 - cx;
                    let py = y as f64 + (sy as f64 + 0.5) / SUB as f64 - cy;
                    let u = (cos * px + sin * py) / r;
                    let v = (-sin * px + cos * py) / r;
                    cover += inside(label, u, v) as usize;
                }
            }
            let a = cover as f64 / (SUB * SUB) as f64;
            let g = (((x as f64 + 0.5) / s - 0.5) * dx + ((y as f64 + 0.5) / s - 0.5) * dy) / std::f64::consts::SQRT_2
                + 0.5;
            for ch in 0..3 {
                let bg = c0[ch] + (c1[ch] - c0[ch]) * g;
                let value = bg * (1.0 - a) + fg[ch] * a;
                out[(ch * IMAGE_SIZE + y) * IMAGE_SIZE + x] = (value * 2.0 - 1.0) as f32;
            }
        }
    }
    out
}
