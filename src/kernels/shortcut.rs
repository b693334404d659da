//! The option-A shortcut of a downsampling residual block (He et al. 2016, §4.2) on NCHW `f32`
//! slices: subsample every `stride`-th row and column, then add `pad` zero channels on each side.
//! One parallel pass per direction. burn's `slice(..;2)` + `pad` took four single-threaded passes
//! (two of them through zero-filled buffers), with the rayon threads idle meanwhile: about 4 % of a
//! ResNet-20 training step on 2 cores.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::buffer::filled;

/// Shape of a shortcut: its input `[batch, channels, height, width]`, the subsampling stride and
/// the zero channels added on each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShortcutShape {
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ShortcutShape {
    /// The shortcut of an input of dimensions `[batch, channels, height, width]`.
    pub fn new([batch, channels, height, width]: [usize; 4], stride: usize, pad: usize) -> Self {
        Self {
            batch,
            channels,
            height,
            width,
            stride,
            pad,
        }
    }

    /// `(channels + 2·pad, ⌈height / stride⌉, ⌈width / stride⌉)`: rows and columns `0, stride, …`.
    pub fn out_dims(&self) -> [usize; 3] {
        [
            self.channels + 2 * self.pad,
            self.height.div_ceil(self.stride),
            self.width.div_ceil(self.stride),
        ]
    }

    fn in_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    fn out_len(&self) -> usize {
        self.out_dims().iter().product()
    }
}

/// `y[n, pad + c, i, j] = x[n, c, stride·i, stride·j]`, zero in the `pad` channels on each side.
///
/// # Shapes
/// - `x`: `[batch, channels, height, width]`
/// - returns `[batch, channels + 2·pad, ⌈height/stride⌉, ⌈width/stride⌉]`
pub fn forward(s: ShortcutShape, x: &[f32]) -> Vec<f32> {
    assert!(s.stride >= 1, "shortcut: stride 0");
    assert_eq!(x.len(), s.batch * s.in_len(), "shortcut: input length");
    let [_, oh, ow] = s.out_dims();
    let (plane, out_plane) = (s.height * s.width, oh * ow);
    let fill = |y: &mut [MaybeUninit<f32>]| {
        y.par_chunks_mut(s.out_len())
            .zip(x.par_chunks(s.in_len()))
            .for_each(|(yn, xn)| {
                let (below, rest) = yn.split_at_mut(s.pad * out_plane);
                let (kept, above) = rest.split_at_mut(s.channels * out_plane);
                below.iter_mut().chain(above).for_each(|v| {
                    v.write(0.0);
                });
                for (yc, xc) in kept.chunks_mut(out_plane).zip(xn.chunks(plane)) {
                    for (yr, xr) in yc.chunks_mut(ow).zip(xc.chunks(s.width * s.stride)) {
                        for (v, &x) in yr.iter_mut().zip(xr.iter().step_by(s.stride)) {
                            v.write(x);
                        }
                    }
                }
            })
    };
    // SAFETY: each image writes its `pad` zero channels on both sides and, for every kept
    // channel, all `oh` rows of `ow` outputs (input row `stride·i` exists for `i < oh`).
    unsafe { filled(s.batch * s.out_len(), fill) }
}

/// The adjoint of [`forward`]: `dx[n, c, stride·i, stride·j] = dy[n, pad + c, i, j]`, zero at the
/// pixels the subsampling skips; the padded channels' gradient is dropped.
///
/// # Shapes
/// - `dy`: `[batch, channels + 2·pad, ⌈height/stride⌉, ⌈width/stride⌉]`
/// - returns `[batch, channels, height, width]`
pub fn backward(s: ShortcutShape, dy: &[f32]) -> Vec<f32> {
    assert!(s.stride >= 1, "shortcut: stride 0");
    assert_eq!(dy.len(), s.batch * s.out_len(), "shortcut: gradient length");
    let [_, _, ow] = s.out_dims();
    let out_plane = s.out_dims()[1] * ow;
    let fill = |dx: &mut [MaybeUninit<f32>]| {
        dx.par_chunks_mut(s.in_len())
            .zip(dy.par_chunks(s.out_len()))
            .for_each(|(dxn, dy_n)| {
                let kept = &dy_n[s.pad * out_plane..][..s.channels * out_plane];
                for (dxc, dyc) in dxn
                    .chunks_mut(s.height * s.width)
                    .zip(kept.chunks(out_plane))
                {
                    // Input rows `stride·i .. stride·(i + 1)`: the first takes output row `i`
                    // at every `stride`-th column, the rest are skipped (zero).
                    let rows = dxc.chunks_mut(s.width * s.stride);
                    for (dxr, dyr) in rows.zip(dyc.chunks(ow)) {
                        let (kept, skipped) = dxr.split_at_mut(s.width);
                        for (run, &d) in kept.chunks_mut(s.stride).zip(dyr) {
                            run[0].write(d);
                            run[1..].fill(MaybeUninit::new(0.0));
                        }
                        skipped.fill(MaybeUninit::new(0.0));
                    }
                }
            })
    };
    // SAFETY: every image, channel, row and column of `dx` is written once.
    unsafe { filled(s.batch * s.in_len(), fill) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::values;

    /// The shapes ResNets use (even sides, stride 2, padding half the channels) and odd ones.
    fn shapes() -> Vec<ShortcutShape> {
        vec![
            ShortcutShape::new([3, 4, 8, 8], 2, 2),
            ShortcutShape::new([2, 3, 7, 5], 2, 1),
            ShortcutShape::new([2, 2, 9, 9], 3, 0),
            ShortcutShape::new([1, 3, 4, 4], 1, 2),
        ]
    }

    #[test]
    fn forward_subsamples_and_pads_with_zeros() {
        for s in shapes() {
            let x = values(s.batch * s.in_len(), 1);
            let y = forward(s, &x);
            let [c_out, oh, ow] = s.out_dims();
            assert_eq!(y.len(), s.batch * c_out * oh * ow, "{s:?}");
            for n in 0..s.batch {
                for c in 0..c_out {
                    for i in 0..oh {
                        for j in 0..ow {
                            let got = y[((n * c_out + c) * oh + i) * ow + j];
                            let want = if (s.pad..s.pad + s.channels).contains(&c) {
                                x[((n * s.channels + c - s.pad) * s.height + i * s.stride)
                                    * s.width
                                    + j * s.stride]
                            } else {
                                0.0
                            };
                            assert_eq!(got, want, "{s:?} at {n} {c} {i} {j}");
                        }
                    }
                }
            }
        }
    }

    /// ⟨dy, forward(x)⟩ = ⟨backward(dy), x⟩ for any x and dy, and the gradient is zero at
    /// the skipped pixels.
    #[test]
    fn backward_is_the_adjoint() {
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum::<f64>();
        for s in shapes() {
            let x = values(s.batch * s.in_len(), 2);
            let dy = values(s.batch * s.out_len(), 3);
            let dx = backward(s, &dy);
            let (lhs, rhs) = (dot(&dy, &forward(s, &x)), dot(&dx, &x));
            assert!((lhs - rhs).abs() < 1e-9 * (1.0 + lhs.abs()), "{s:?}");
            for (i, v) in dx.iter().enumerate() {
                let (row, col) = (i / s.width % s.height, i % s.width);
                if row % s.stride != 0 || col % s.stride != 0 {
                    assert_eq!(*v, 0.0, "{s:?} at {i}");
                }
            }
        }
    }
}
