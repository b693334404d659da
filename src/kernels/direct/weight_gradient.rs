//! The weight gradient of the direct kernel's 3×3 convolutions, and the backward pass of the
//! stride-1 ones in one sweep.
//!
//! - **Stride 1** ([`super::chains`]): one fused multiply-add chain per weight, vectors over
//!   output channels, the output gradient transposed image by image; [`backward`] also computes
//!   the input gradient of each image while its output gradient is in cache (the adjoint of a
//!   stride-1 "same" convolution is one, with the weights flipped in space and in/out swapped,
//!   run by the forward tiles), so the output gradient is read from memory once (or, made image
//!   by image by the BatchNorm after the convolution, never: [`OutputGradient::Normalized`]).
//! - **Stride 2** (output planes at least 16 wide; here): sixteen lane sums per weight over the
//!   phase planes' grid, lane `l` taking grid positions `≡ l (mod 16)`, folded in halves
//!   ([`fold_lanes`]); the output gradient laid out once per image ([`Layout::lay_gradient`]).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::super::buffer::LineAligned;
use super::super::output_gradient::OutputGradient;
use super::chains;
use super::{ConvGeometry, Isa, Kind, LANES, Layout, PackedWeights, cpu, fits, handles};
#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};

/// Whether [`weight_gradient`] handles `g`: a 3×3 geometry the direct kernel fits, at stride 1
/// (chains) or with output planes at least 16 wide (lane sums on the grid; on narrower planes
/// its dropped grid columns are too large a share and im2col + GEMM is faster), on a path with
/// a direct kernel. The rule is the same on every instruction set, so every machine takes the
/// same path (and sum order).
pub fn handles_weight_gradient(g: &ConvGeometry) -> bool {
    handles(g) && g.kernel == 3 && (chains::handles(g) || g.out_width() >= 16)
}

/// Whether [`backward`] handles `g`: a stride-1 3×3 convolution on a path with a direct kernel.
pub fn handles_backward(g: &ConvGeometry) -> bool {
    handles(g) && chains::handles(g)
}

/// Lane sums of one block of the weight gradient's lane-sum buffer: 2 output channels × 9 taps
/// × [`LANES`] (the AVX2 tiles work on whole blocks, the AVX-512 tiles on their per-channel
/// halves).
pub(super) const TILE_SUMS: usize = 2 * 9 * LANES;

/// Bytes a weight-gradient group may fill: half the L2 cache (the other half for the tiles'
/// lane sums and whatever else runs).
pub(super) fn gradient_group_bytes() -> usize {
    cpu::l2_bytes() / 2
}

/// Images per lane-sum group: as many padded inputs and laid-out output gradients as fit in
/// [`gradient_group_bytes`] (they are swept several times per tile: once per kernel row, and on
/// AVX2 once per half of the lanes), at least one and at most `chunk`.
pub fn gradient_group(g: &ConvGeometry, chunk: usize) -> usize {
    let l = Layout::new(g);
    (gradient_group_bytes() / (4 * (l.padded_len(g) + l.gradient_len(g)))).clamp(1, chunk)
}

/// The sum of sixteen lane sums, folded in halves: lanes `l + 8` onto `l`, then `l + 4`,
/// `l + 2`, `l + 1` (what a 512-bit vector's halving reduction computes).
pub fn fold_lanes(lanes: &[f32; LANES]) -> f32 {
    let mut v = *lanes;
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            v[l] += v[l + width];
        }
        width /= 2;
    }
    v[0]
}

/// `dW = Σₙ Σ_p dYₙ[o, p] · X′ₙ[c, p + tap]` on instruction set `isa`, images summed in fixed
/// chunks of `chunk` (see the module documentation for the order within a chunk), so the result
/// depends neither on the thread count nor on the machine. On the lane-sum grid (stride 2) the
/// dropped columns multiply zeros with input pixels the true sum does not read: an infinite
/// input pixel (a diverged step) can turn a finite weight-gradient entry into NaN where im2col
/// would not.
///
/// # Shapes
/// - `x`: `[batch, in, h, w]`; `dy`: `[batch, out, out_h, out_w]`
/// - returns `[out, in, 3, 3]`
pub fn weight_gradient(
    isa: Isa,
    g: &ConvGeometry,
    x: &[f32],
    dy: &OutputGradient<'_>,
    chunk: usize,
) -> Vec<f32> {
    if chains::handles(g) {
        return chains::sweep(isa, g, x, dy, chunk, None);
    }
    lane_sums_in_groups(isa, g, x, &dy.whole(), chunk, gradient_group(g, chunk))
}

/// The backward pass of a stride-1 convolution ([`handles_backward`]) in one sweep: `(dx, dW)`,
/// `dx` the input gradient plus `plus` (when given; added as a separate addition would round
/// it) and `dW` as [`weight_gradient`]. `dx` is the forward kernel's on the adjoint: each
/// element's terms in output-channel-then-tap order, one fused multiply-add each from zero
/// (what `forward_image` on the flipped weights gives, bit for bit). A BatchNorm's input
/// gradient as `dy` ([`OutputGradient::Normalized`]) is made image by image in the sweep.
///
/// # Shapes
/// - `x`: `[batch, in, h, w]`; `weight`: `[out, in, 3, 3]`; `dy`: `[batch, out, h, w]`
/// - `plus`: `[batch, in, h, w]`
/// - returns `([batch, in, h, w], [out, in, 3, 3])`
pub fn backward(
    isa: Isa,
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    dy: &OutputGradient<'_>,
    plus: Option<&[f32]>,
    chunk: usize,
) -> (Vec<f32>, Vec<f32>) {
    assert!(
        chains::handles(g),
        "direct backward: unsupported geometry {g:?}"
    );
    assert!(
        weight.len() == g.out_channels * g.in_channels * 9
            && plus.is_none_or(|p| p.len() == g.batch * g.in_len()),
        "direct backward: weight or added gradient length"
    );
    let (out, cin) = (g.out_channels, g.in_channels);
    // The adjoint's weights: input channel `o`, tap `t`, output channel `c` = w[o, c, 8 − t]
    // (flipped in space).
    let flipped = PackedWeights::from_fn(out, 9, cin, |o, t, c| weight[(o * cin + c) * 9 + 8 - t]);
    let mut dw = Vec::new();
    let dx_fill = |dx: &mut [MaybeUninit<f32>]| {
        let input = chains::InputSide {
            weights: &flipped,
            plus,
            dx,
        };
        dw = chains::sweep(isa, g, x, dy, chunk, Some(input));
    };
    // SAFETY: the sweep writes every image's input gradient whole (`InputSide`).
    let dx = unsafe { super::super::buffer::filled(g.batch * g.in_len(), dx_fill) };
    (dx, dw)
}

/// The lane-sum weight gradient over chunks of `chunk` images in groups of `group` (what the L2
/// size decides; the sums are the same for every `group`).
pub(super) fn lane_sums_in_groups(
    isa: Isa,
    g: &ConvGeometry,
    x: &[f32],
    dy: &[f32],
    chunk: usize,
    group: usize,
) -> Vec<f32> {
    assert!(
        fits(g) && g.kernel == 3,
        "direct weight gradient: unsupported geometry {g:?}"
    );
    assert!(
        x.len() == g.batch * g.in_len() && dy.len() == g.batch * g.out_len(),
        "direct weight gradient: input lengths"
    );
    assert!(
        group >= 1 && chunk >= 1,
        "direct weight gradient: empty groups"
    );
    let l = Layout::new(g);
    let (x_len, dy_len, dy_plane) = (l.padded_len(g), l.gradient_len(g), l.gradient_plane(g));
    let lead = l.gradient_lead();
    let taps: [usize; 9] = l.taps(g).try_into().expect("a 3×3 kernel has nine taps");
    let (out, cin) = (g.out_channels, g.in_channels);
    let tiles = out.div_ceil(2) * cin;
    let partials: Vec<Vec<f32>> = x
        .par_chunks(chunk * g.in_len())
        .zip(dy.par_chunks(chunk * g.out_len()))
        .map_init(
            // Zeroed once: padding, dropped grid columns and slack are never written.
            || {
                (
                    LineAligned::zeroed(group * x_len),
                    LineAligned::zeroed(group * dy_len),
                )
            },
            |(padded, laid), (xs, dys)| {
                let mut sums = vec![0.0; tiles * TILE_SUMS];
                for (xg, dyg) in xs
                    .chunks(group * g.in_len())
                    .zip(dys.chunks(group * g.out_len()))
                {
                    let images = xg.len() / g.in_len();
                    for (i, (xi, dyi)) in xg
                        .chunks(g.in_len())
                        .zip(dyg.chunks(g.out_len()))
                        .enumerate()
                    {
                        l.pad(isa, g, xi, &mut padded[i * x_len..][..x_len]);
                        l.lay_gradient(isa, g, dyi, &mut laid[i * dy_len..][..dy_len]);
                    }
                    let group = GradientGroup {
                        padded: &padded[..images * x_len],
                        // Read from `lead + row + 1` on, the laid-out gradients are on the
                        // grid, each channel's starting a cache line.
                        gridded: &laid[lead + l.row + 1..images * dy_len],
                        images,
                        x_len,
                        dy_len,
                        dy_plane,
                    };
                    group.accumulate(isa, g, &l, &taps, &mut sums);
                }
                fold_tiles(g, &sums)
            },
        )
        .collect();
    super::super::sum_in_order(&partials, out * cin * 9)
}

/// `dW` (`[out, in, 3, 3]`) from the lane sums of every tile.
fn fold_tiles(g: &ConvGeometry, sums: &[f32]) -> Vec<f32> {
    let (out, cin) = (g.out_channels, g.in_channels);
    let mut dw = vec![0.0; out * cin * 9];
    for (tile, lanes) in sums.chunks_exact(TILE_SUMS).enumerate() {
        let (o, c) = (tile / cin * 2, tile % cin);
        for (j, row) in lanes.chunks_exact(9 * LANES).enumerate().take(out - o) {
            for (t, lane) in row.chunks_exact(LANES).enumerate() {
                let lane: &[f32; LANES] = lane.try_into().expect("LANES lane sums");
                dw[((o + j) * cin + c) * 9 + t] = fold_lanes(lane);
            }
        }
    }
    dw
}

/// A group of images prepared for the lane-sum weight gradient: padded inputs `x_len` floats
/// apart and gridded output gradients `dy_len` floats apart, a channel's grid `dy_plane` floats
/// from the next one's (the laid-out output gradients of [`Layout::lay_gradient`]).
pub(super) struct GradientGroup<'a> {
    pub(super) padded: &'a [f32],
    pub(super) gridded: &'a [f32],
    pub(super) images: usize,
    pub(super) x_len: usize,
    pub(super) dy_len: usize,
    pub(super) dy_plane: usize,
}

impl GradientGroup<'_> {
    /// Adds this group's terms to the lane sums of every tile: `sums` is
    /// `[out/2 (rounded up), in, 2, 9, LANES]`, tile `(o/2, c)` holding output channels
    /// `o, o + 1` × input channel `c` × the nine taps.
    fn accumulate(
        &self,
        isa: Isa,
        g: &ConvGeometry,
        l: &Layout,
        taps: &[usize; 9],
        sums: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if isa.0 == Kind::Avx512 {
            self.accumulate_in_threes(isa, g, l, taps, sums);
            return;
        }
        self.assert_lengths(g, l, sums);
        let cin = g.in_channels;
        // AVX2: rows of tiles, `cin` tiles each (output channels `2·row`, `2·row + 1`), two
        // rows at once where there are two.
        let mut rows = sums.chunks_exact_mut(cin * TILE_SUMS).enumerate();
        while let Some((row, tiles)) = rows.next() {
            let o = row * 2;
            let pair = rows.next().map(|(_, next)| next);
            let mut next = pair.map(|next| next.chunks_exact_mut(TILE_SUMS));
            for (c, lanes) in tiles.chunks_exact_mut(TILE_SUMS).enumerate() {
                let lanes: &mut [f32; TILE_SUMS] = lanes.try_into().expect("TILE_SUMS lane sums");
                let second = next.as_mut().map(|n| {
                    let lanes: &mut [f32; TILE_SUMS] = n
                        .next()
                        .expect("as many tiles in each row")
                        .try_into()
                        .expect("TILE_SUMS lane sums");
                    lanes
                });
                // SAFETY: the CPU has `isa` (see `copy_row`), AVX2 here (AVX-512 returned
                // above); every read is inside the buffers `assert_lengths` checked
                // buffers: channel `c`'s plane plus the farthest tap plus the grid stays inside
                // `padded_len`, output channels `o..o + 2` (`o..o + 4` for a pair of rows)
                // inside the gridded gradients (rounded up to even).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match second {
                        Some(second) => {
                            avx2::gradient_tile_pair(self, c, o, l, taps, [lanes, second])
                        }
                        None => avx2::gradient_tile(self, c, o, l, taps, lanes),
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = (isa, o, c, lanes, second);
                    unreachable!("an Isa exists only on x86-64");
                }
            }
        }
    }

    /// The buffers the tiles read and the lane sums they add to hold what `g` needs: the
    /// tiles' `unsafe` relies on it.
    fn assert_lengths(&self, g: &ConvGeometry, l: &Layout, sums: &mut [f32]) {
        let (out, cin) = (g.out_channels, g.in_channels);
        assert!(
            self.images > 0
                && self.padded.len() >= (self.images - 1) * self.x_len + l.padded_len(g)
                && self.dy_plane >= l.grid
                && self.dy_len >= (out.next_multiple_of(2) - 1) * self.dy_plane + l.grid
                && self.gridded.len()
                    >= (self.images - 1) * self.dy_len
                        + (out.next_multiple_of(2) - 1) * self.dy_plane
                        + l.grid
                && sums.len() == out.div_ceil(2) * cin * TILE_SUMS,
            "direct weight gradient: buffer lengths"
        );
    }

    /// [`GradientGroup::accumulate`] on the AVX-512 tiles: output channels in threes (the last
    /// one or two alone, see [`avx512::gradient_tile`]), each channel's lane sums found in its
    /// half of a two-channel tile of `sums`.
    #[cfg(target_arch = "x86_64")]
    fn accumulate_in_threes(
        &self,
        isa: Isa,
        g: &ConvGeometry,
        l: &Layout,
        taps: &[usize; 9],
        sums: &mut [f32],
    ) {
        use avx512::CHANNEL_SUMS;
        assert_eq!(isa.0, Kind::Avx512, "direct weight gradient: AVX-512 tiles");
        self.assert_lengths(g, l, sums);
        let (out, cin) = (g.out_channels, g.in_channels);
        let mut halves: Vec<&mut [f32]> = sums.chunks_exact_mut(CHANNEL_SUMS).collect();
        // Channel `j`'s lane sums with input channel `c`: tile `(j/2, c)`, half `j mod 2`.
        let half = |j: usize, c: usize| ((j / 2) * cin + c) * 2 + j % 2;
        for o in (0..out).step_by(3) {
            for c in 0..cin {
                // SAFETY: `isa` is AVX-512 (asserted), and an `Isa` exists only on a CPU that
                // has it; the reads stay inside the buffers `assert_lengths` checked, channels
                // `o .. o + n ≤ out`.
                macro_rules! tile {
                    ($n:literal) => {{
                        let blocks = halves
                            .get_disjoint_mut(std::array::from_fn::<_, $n, _>(|j| half(o + j, c)))
                            .expect("distinct channels have distinct lane sums");
                        let lanes = blocks.map(|b| {
                            <&mut [f32; CHANNEL_SUMS]>::try_from(&mut **b)
                                .expect("CHANNEL_SUMS lane sums")
                        });
                        unsafe { avx512::gradient_tile::<$n>(self, c, o, l, taps, lanes) }
                    }};
                }
                match out - o {
                    1 => tile!(1),
                    2 => tile!(2),
                    _ => tile!(3),
                }
            }
        }
    }
}
