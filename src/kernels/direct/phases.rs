//! The input gradient of a phase-split convolution ([`super::phase_split`]: 3×3, stride 2,
//! padding 1, even sides) on the direct kernel's forward tiles, image by image.
//!
//! Phase `(qh, qw)` of the input gradient, the pixels `(2i + qh, 2j + qw)`, gets terms only from
//! the taps of that phase (1, 2, 2 and 4 of the nine): tap `(ki, kj)` read input pixel
//! `(2·oh + ki − 1, 2·ow + kj − 1)`, so pixel `(2i + qh, ·)` receives the output gradient of row
//! `oh = i` (`ki ≥ 1`) or `oh = i + 1` (`ki = 0`), and the same for columns. Each phase plane is
//! therefore a direct convolution of the output gradient — padded with one zero row below and
//! one zero column on the right, read at offsets `0`, `1`, `row`, `row + 1` — with its phase's
//! taps and weights, in-channels and out-channels swapped. The four phase planes are then
//! interleaved into the image (adding the other consumer's gradient, if any, on the way).
//!
//! Sum order, the same on every instruction set: per element, output-gradient channels
//! outermost, then its phase's taps in row-major order, one fused multiply-add per term from
//! zero.

use std::mem::MaybeUninit;

use super::{Isa, Kind, LANES, PackedWeights, Plane, Source, convolve, copy_row, phase_split};
use crate::kernels::geometry::ConvGeometry;

/// Whether [`input_gradient_image`] handles `g` (the geometries the forward pass runs on phase
/// planes).
pub fn handles(g: &ConvGeometry) -> bool {
    g.in_channels > 0 && g.out_channels > 0 && phase_split(g)
}

/// The phase `(qh, qw)` of kernel tap `t` (row-major in the 3×3 kernel) as `2·qh + qw`, and the
/// rows and columns `(0 or 1, 0 or 1)` past `(i, j)` where it reads the output gradient.
fn phase_of_tap(t: usize) -> (usize, (usize, usize)) {
    let (ki, kj) = (t / 3, t % 3);
    // `ki = 0` reads input row 2(oh − 1) + 1: phase row 1, output-gradient row i + 1.
    let (qh, down) = if ki == 0 { (1, 1) } else { (ki - 1, 0) };
    let (qw, right) = if kj == 0 { (1, 1) } else { (kj - 1, 0) };
    (2 * qh + qw, (down, right))
}

/// Sizes of the padded output gradient: rows of `out_w + 1`, planes of `out_h + 1` rows.
struct Layout {
    row: usize,
    plane: usize,
    grid: usize,
}

impl Layout {
    fn new(g: &ConvGeometry) -> Self {
        let row = g.out_width() + 1;
        Self {
            row,
            plane: (g.out_height() + 1) * row,
            grid: (g.out_height() * row).div_ceil(LANES) * LANES,
        }
    }

    /// Floats of one image's padded output gradient, with the slack the last channel's last
    /// vector reads past its plane (the farthest tap, `row + 1`, plus the grid).
    fn padded_len(&self, g: &ConvGeometry) -> usize {
        (g.out_channels - 1) * self.plane + self.row + 1 + self.grid
    }
}

/// One phase's taps (offsets in the padded output gradient) and weights, packed as
/// `[out, taps, in′]`.
struct Phase {
    taps: Vec<usize>,
    weights: PackedWeights,
}

/// The weights of a phase-split convolution arranged for its input gradient: per phase, its
/// taps and their weights.
pub struct PhaseWeights {
    phases: Vec<Phase>,
    geometry: ConvGeometry,
}

impl PhaseWeights {
    /// # Shapes
    /// - `weight`: `[out, in, 3, 3]`
    pub fn new(g: &ConvGeometry, weight: &[f32]) -> Self {
        assert!(
            handles(g),
            "phase input gradient: unsupported geometry {g:?}"
        );
        assert_eq!(
            weight.len(),
            g.out_channels * g.in_channels * 9,
            "phase input gradient: weight length"
        );
        let (row, cin) = (Layout::new(g).row, g.in_channels);
        let phases = (0..4)
            .map(|q| {
                let kernel_taps: Vec<(usize, usize)> = (0..9)
                    .filter_map(|t| {
                        let (phase, (down, right)) = phase_of_tap(t);
                        (phase == q).then_some((t, down * row + right))
                    })
                    .collect();
                let weights =
                    PackedWeights::from_fn(g.out_channels, kernel_taps.len(), cin, |o, t, c| {
                        weight[(o * cin + c) * 9 + kernel_taps[t].0]
                    });
                Phase {
                    taps: kernel_taps.iter().map(|&(_, at)| at).collect(),
                    weights,
                }
            })
            .collect();
        Self {
            phases,
            geometry: *g,
        }
    }
}

/// Buffers of [`input_gradient_image`] for a run of images (one per rayon job).
pub struct PhaseScratch {
    /// One image's padded output gradient (zeroed once: only the interiors are written).
    padded: Vec<f32>,
    /// The four phase planes of one image's input gradient, `[4, in, out_h, out_w]`.
    phases: Vec<f32>,
    out_grid: Vec<f32>,
}

impl PhaseScratch {
    pub fn new(g: &ConvGeometry) -> Self {
        Self {
            padded: vec![0.0; Layout::new(g).padded_len(g)],
            phases: vec![0.0; g.in_len()],
            out_grid: Vec::new(),
        }
    }
}

/// The input gradient of one image, `dx = convᵀ(dy)` (+ `plus`, added as a separate addition
/// would round it), in the sum order of the module documentation.
///
/// # Shapes
/// - `dy`: `[out, out_h, out_w]`; `plus`: `[in, h, w]`
/// - `dx`: `[in, h, w]`, written in full
pub fn input_gradient_image(
    isa: Isa,
    g: &ConvGeometry,
    dy: &[f32],
    weights: &PhaseWeights,
    scratch: &mut PhaseScratch,
    plus: Option<&[f32]>,
    dx: &mut [MaybeUninit<f32>],
) {
    assert!(
        weights.geometry.in_channels == g.in_channels
            && weights.geometry.out_channels == g.out_channels
            && (weights.geometry.height, weights.geometry.width) == (g.height, g.width)
            && handles(g),
        "phase input gradient: weights for {:?}, not {g:?}",
        weights.geometry
    );
    assert!(
        dy.len() == g.out_len()
            && dx.len() == g.in_len()
            && plus.is_none_or(|p| p.len() == g.in_len()),
        "phase input gradient: image lengths"
    );
    let l = Layout::new(g);
    assert!(
        scratch.padded.len() == l.padded_len(g) && scratch.phases.len() == g.in_len(),
        "phase input gradient: scratch made for another geometry"
    );
    let (oh, ow) = (g.out_height(), g.out_width());
    for (src, plane) in dy
        .chunks_exact(oh * ow)
        .zip(scratch.padded.chunks_mut(l.plane))
    {
        for (r, src_row) in src.chunks_exact(ow).enumerate() {
            copy_row(isa, src_row, super::as_slots(&mut plane[r * l.row..][..ow]));
        }
    }
    let out = Plane {
        channels: g.in_channels,
        height: oh,
        width: ow,
    };
    let phase_len = g.in_channels * oh * ow;
    for (phase, dxq) in weights
        .phases
        .iter()
        .zip(scratch.phases.chunks_exact_mut(phase_len))
    {
        let source = Source {
            input: &scratch.padded,
            plane: l.plane,
            channels: g.out_channels,
            taps: &phase.taps,
            square_3x3: false,
            weights: &phase.weights,
            row: l.row,
            grid: l.grid,
            paired: false,
        };
        convolve(
            isa,
            &source,
            out,
            &mut scratch.out_grid,
            super::as_slots(dxq),
        );
    }
    // dx[c, 2i + qh, 2j + qw] = phase (qh, qw) [c, i, j]
    let phase =
        |q: usize, c: usize, i: usize| &scratch.phases[q * phase_len + (c * oh + i) * ow..][..ow];
    let w = g.width;
    for (c, dxc) in dx.chunks_exact_mut(g.height * w).enumerate() {
        for (r, dst) in dxc.chunks_exact_mut(w).enumerate() {
            let (i, qh) = (r / 2, r % 2);
            let plus_row = plus.map(|p| &p[(c * g.height + r) * w..][..w]);
            interleave_row(
                isa,
                phase(2 * qh, c, i),
                phase(2 * qh + 1, c, i),
                plus_row,
                dst,
            );
        }
    }
}

/// `dst[2j] = even[j]`, `dst[2j + 1] = odd[j]` (+ `plus[·]`), writing all of `dst`.
fn interleave_row(
    isa: Isa,
    even: &[f32],
    odd: &[f32],
    plus: Option<&[f32]>,
    dst: &mut [MaybeUninit<f32>],
) {
    assert!(
        even.len() == odd.len()
            && dst.len() == 2 * even.len()
            && plus.is_none_or(|p| p.len() == dst.len()),
        "interleave_row: lengths"
    );
    #[cfg(target_arch = "x86_64")]
    if isa.0 == Kind::Avx512 {
        // SAFETY: the CPU has AVX-512 (an `Isa` exists only then); lengths asserted above.
        unsafe { super::avx512::interleave_row(even, odd, plus, dst) };
        return;
    }
    let _ = (isa, Kind::Avx2);
    for (j, (e, o)) in even.iter().zip(odd).enumerate() {
        let (a, b) = plus.map_or((0.0, 0.0), |p| (p[2 * j], p[2 * j + 1]));
        // Without `plus`, the values themselves (`x + 0.0` would turn −0 into +0).
        let (e, o) = if plus.is_some() {
            (e + a, o + b)
        } else {
            (*e, *o)
        };
        dst[2 * j].write(e);
        dst[2 * j + 1].write(o);
    }
}
