//! Turning decoded images into normalized, augmented tensor batches.
//!
//! Augmentation is the standard CIFAR recipe: a random 32×32 crop of the image zero-padded by 4
//! pixels on each side, then a random horizontal flip. Both, and the per-epoch shuffle, draw from
//! seeded generators, so a seed fixes the whole data order.

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use super::cifar::{CHANNELS, IMAGE_BYTES, IMAGE_SIDE, PLANE_BYTES, Split};

/// Zero padding around an image before the random crop.
pub const CROP_PADDING: usize = 4;

/// Per-channel mean and standard deviation, in pixel units scaled to `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    pub mean: [f32; CHANNELS],
    pub std: [f32; CHANNELS],
}

impl Normalization {
    /// The statistics of `split`'s pixels (the training split, so no test data leaks in).
    pub fn of(split: &Split) -> Self {
        let mut sum = [0f64; CHANNELS];
        let mut sum_sq = [0f64; CHANNELS];
        for image in split.images.chunks_exact(IMAGE_BYTES) {
            for (c, plane) in image.chunks_exact(PLANE_BYTES).enumerate() {
                let (s, q) = plane.iter().fold((0u64, 0u64), |(s, q), &p| {
                    (s + p as u64, q + (p as u64) * (p as u64))
                });
                sum[c] += s as f64;
                sum_sq[c] += q as f64;
            }
        }
        let n = (split.len().max(1) * PLANE_BYTES) as f64;
        let mut mean = [0f32; CHANNELS];
        let mut std = [1f32; CHANNELS];
        for c in 0..CHANNELS {
            let m = sum[c] / n / 255.0;
            let var = (sum_sq[c] / n / (255.0 * 255.0) - m * m).max(0.0);
            mean[c] = m as f32;
            std[c] = if var > 0.0 { var.sqrt() as f32 } else { 1.0 };
        }
        Self { mean, std }
    }

    /// Lookup table: normalized value of every byte, per channel.
    fn table(&self) -> [[f32; 256]; CHANNELS] {
        let mut table = [[0f32; 256]; CHANNELS];
        for (c, row) in table.iter_mut().enumerate() {
            for (byte, value) in row.iter_mut().enumerate() {
                *value = (byte as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        table
    }
}

/// A batch on the host, ready to become tensors.
#[derive(Debug, Clone)]
pub struct HostBatch {
    /// `[batch, 3, 32, 32]` normalized pixels, row-major.
    pub pixels: Vec<f32>,
    pub labels: Vec<i64>,
}

impl HostBatch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// # Shapes
    /// - images: `[batch, 3, 32, 32]`
    /// - labels: `[batch]`
    pub fn to_tensors(self, device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
        let n = self.len();
        let images = Tensor::from_data(
            TensorData::new(self.pixels, [n, CHANNELS, IMAGE_SIDE, IMAGE_SIDE]),
            device,
        );
        let labels = Tensor::from_data(TensorData::new(self.labels, [n]), device);
        (images, labels)
    }
}

/// Builds batches from a split: normalization always, augmentation when enabled.
#[derive(Debug, Clone)]
pub struct Batcher {
    table: [[f32; 256]; CHANNELS],
    augment: bool,
}

impl Batcher {
    pub fn new(normalization: Normalization, augment: bool) -> Self {
        Self {
            table: normalization.table(),
            augment,
        }
    }

    /// The images at `indices`; `rng` drives augmentation (ignored when it is off).
    pub fn batch(&self, split: &Split, indices: &[usize], rng: &mut StdRng) -> HostBatch {
        let mut pixels = vec![0f32; indices.len() * IMAGE_BYTES];
        for (out, &index) in pixels.chunks_exact_mut(IMAGE_BYTES).zip(indices) {
            let image = split.image(index);
            if self.augment {
                let max = 2 * CROP_PADDING + 1;
                let dy = rng.random_range(0..max);
                let dx = rng.random_range(0..max);
                let flip = rng.random::<bool>();
                self.write_augmented(image, out, dy, dx, flip);
            } else {
                for (c, (src, dst)) in image
                    .chunks_exact(PLANE_BYTES)
                    .zip(out.chunks_exact_mut(PLANE_BYTES))
                    .enumerate()
                {
                    for (d, &s) in dst.iter_mut().zip(src) {
                        *d = self.table[c][s as usize];
                    }
                }
            }
        }
        let labels = indices.iter().map(|&i| split.labels[i] as i64).collect();
        HostBatch { pixels, labels }
    }

    /// Crop at offset (`dy`, `dx`) of the zero-padded image, then flip if asked.
    fn write_augmented(&self, image: &[u8], out: &mut [f32], dy: usize, dx: usize, flip: bool) {
        let side = IMAGE_SIDE as isize;
        let pad = CROP_PADDING as isize;
        for c in 0..CHANNELS {
            let plane = &image[c * PLANE_BYTES..(c + 1) * PLANE_BYTES];
            let lut = &self.table[c];
            let zero = lut[0];
            for y in 0..IMAGE_SIDE {
                let sy = y as isize + dy as isize - pad;
                let row = &mut out[c * PLANE_BYTES + y * IMAGE_SIDE..][..IMAGE_SIDE];
                if !(0..side).contains(&sy) {
                    row.fill(zero);
                    continue;
                }
                let src = &plane[sy as usize * IMAGE_SIDE..][..IMAGE_SIDE];
                for (x, value) in row.iter_mut().enumerate() {
                    let xx = if flip { IMAGE_SIDE - 1 - x } else { x };
                    let sx = xx as isize + dx as isize - pad;
                    *value = if (0..side).contains(&sx) {
                        lut[src[sx as usize] as usize]
                    } else {
                        zero
                    };
                }
            }
        }
    }
}

/// The order of one epoch: a permutation of `0..len` drawn from `stream` of `epoch` under
/// `seed` (a single client's order is stream 0).
pub fn epoch_order(len: usize, seed: u64, epoch: usize, stream: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if shuffle {
        order.shuffle(&mut epoch_rng(seed, epoch, stream));
    }
    order
}

/// A generator for `stream` (0 = shuffle, 1 = augmentation, …) of `epoch` under `seed`.
pub fn epoch_rng(seed: u64, epoch: usize, stream: u64) -> StdRng {
    // SplitMix-style mixing keeps nearby (seed, epoch, stream) triples far apart.
    let mut z = seed
        .wrapping_add((epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_image(value: impl Fn(usize, usize, usize) -> u8) -> Split {
        let mut images = vec![0u8; IMAGE_BYTES];
        for c in 0..CHANNELS {
            for y in 0..IMAGE_SIDE {
                for x in 0..IMAGE_SIDE {
                    images[c * PLANE_BYTES + y * IMAGE_SIDE + x] = value(c, y, x);
                }
            }
        }
        Split {
            images,
            labels: vec![4],
        }
    }

    const IDENTITY: Normalization = Normalization {
        mean: [0.0; 3],
        std: [1.0 / 255.0; 3],
    };

    #[test]
    fn normalization_statistics() {
        let split = one_image(|c, _, x| if x % 2 == 0 { 0 } else { 255 * (c as u8 % 2) });
        let n = Normalization::of(&split);
        assert!((n.mean[0] - 0.0).abs() < 1e-6 && (n.mean[1] - 0.5).abs() < 1e-6);
        assert!((n.std[1] - 0.5).abs() < 1e-6);
        assert_eq!(n.std[0], 1.0, "constant channel keeps std 1");
    }

    #[test]
    fn plain_batch_is_the_image() {
        let split = one_image(|c, y, x| (c * 50 + y + x) as u8);
        let batcher = Batcher::new(IDENTITY, false);
        let b = batcher.batch(&split, &[0], &mut epoch_rng(0, 0, 1));
        assert_eq!(b.labels, vec![4]);
        assert!((b.pixels[PLANE_BYTES + 3 * IMAGE_SIDE + 5] - 58.0).abs() < 1e-4);
    }

    #[test]
    fn crop_shifts_and_pads_with_zero_pixels() {
        let split = one_image(|_, y, x| (y * 2 + x) as u8 + 1);
        let batcher = Batcher::new(IDENTITY, true);
        let mut out = vec![0f32; IMAGE_BYTES];
        // Offset (0, 0) of the padded image: the first 4 rows and columns are padding.
        batcher.write_augmented(split.image(0), &mut out, 0, 0, false);
        let close = |a: f32, b: f32| (a - b).abs() < 1e-4;
        assert!(close(out[0], 0.0));
        assert!(close(out[4 * IMAGE_SIDE + 4], 1.0));
        assert!(close(out[5 * IMAGE_SIDE + 6], (2 + 2 + 1) as f32));
        // Centre crop with a flip mirrors each row.
        batcher.write_augmented(split.image(0), &mut out, 4, 4, true);
        assert!(close(out[0], (31 + 1) as f32));
        assert!(close(out[IMAGE_SIDE - 1], 1.0));
    }

    #[test]
    fn order_is_seeded_permutation() {
        let a = epoch_order(100, 7, 3, 0, true);
        assert_eq!(a, epoch_order(100, 7, 3, 0, true));
        assert_ne!(a, epoch_order(100, 7, 4, 0, true));
        assert_ne!(a, epoch_order(100, 7, 3, 2, true));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(epoch_order(5, 7, 3, 0, false), vec![0, 1, 2, 3, 4]);
    }
}
