//! Direct convolution for stride-1 "same" convolutions (odd kernel `k`, padding `(k − 1)/2`) and
//! ResNet's downsampling ones (3×3, stride 2, padding 1, even sides; [`phase_split`]): the
//! forward pass of ResNet's 3×3 convolutions; their input gradient (at stride 1 the forward
//! pass of the flipped-weight adjoint, at stride 2 in [`phases`]); and their weight gradient
//! ([`weight_gradient`]: at stride 1 as chains over output-channel vectors, [`chains`], computed
//! in one sweep with the input gradient when the batch has a chunk per thread; at stride 2 as
//! lane sums on the grid, output planes ≥ 16 wide). No patch matrix is built. This module owns the
//! layout and the summation order; the register tiles that follow that order are per
//! instruction set, in [`avx512`] (16 lanes, 32 registers) and [`avx2`] (8 lanes, 16
//! registers). CPUs with neither (and runs forcing `SPLITAUX_KERNEL_PATH=portable`, see
//! [`super::cpu`]) use im2col + GEMM instead.
//!
//! Each image is copied once into zero-padded planes, `(h + k − 1) × (w + k − 1)` per channel
//! (two other layouts below: phase planes at stride 2, and [`Layout::paired`] for the AVX-512
//! forward tiles on 8-wide planes).
//! The output is computed on the *padded-width grid*: position `g = oh·w′ + ow` with
//! `w′ = w + k − 1`, so that for every tap `(ki, kj)` the inputs of consecutive grid positions
//! are consecutive floats of the padded plane, at `g + ki·w′ + kj`. The `k − 1` grid columns
//! past `w` in each row are computed and dropped. The forward tiles instead take their vectors
//! within output rows when the width is a multiple of the vector (8 floats on AVX2, 16 on
//! AVX-512; [`Positions::Rows`]): each vector's inputs are still consecutive floats, and no
//! column is dropped. At stride 2 each channel is instead split into four zero-padded *phase
//! planes* (even/odd rows × even/odd columns, `(out_h + 1) × (out_w + 1)`): every tap reads one
//! of them at a fixed offset ([`Layout::taps`]), so the same tiles run on them, on a grid of
//! `out_w + 1` columns. That replaced im2col + GEMM for these convolutions (ResNet-20, batch 128,
//! 2 threads, Intel Xeon family 6 model 207, `examples/kernel_times`: forward 16→32 at 32×32
//! 2.6 → 1.35 ms, 32→64 at 16×16 2.2 → 1.6 ms; input gradient 16→32 3.5 → 1.7 ms; weight
//! gradient 16→32 2.6 → 2.35 ms).
//!
//! # One summation order on every machine
//! Both instruction sets add every output's terms in the same order, so the direct kernels give
//! the same bits on an AVX-512 and an AVX2 machine (sweeps split over machines, resumed runs and
//! multi-process runs rely on it). Which convolutions run here is decided by the geometry alone
//! ([`handles`], [`handles_phase_input_gradient`], [`handles_weight_gradient`]), the same on
//! both. The rest (stride-2 weight gradients of outputs under 16 wide, other strides, and
//! everything on the portable path) is im2col + the `gemm`
//! crate, whose microkernel and depth blocking are its own choice per CPU (see `gemm.rs`): that
//! part has not been compared across machines. Tile shapes and cache blocking decide only *when*
//! a term is added, never *where* in its sum:
//! - **Forward**: `y[o, g] = fma(x′[c, g + tap], w[o, c, tap], …)`, one fused multiply-add per
//!   term, starting from zero, channels outermost and taps in row-major order within a channel
//!   (`c·k² + tap`, the im2col row order). The stride-2 input gradient follows the same rule
//!   with its phase's taps ([`phases`]).
//! - **Weight gradient at stride 1** ([`chains`]): per image and band of about 128 positions,
//!   one fused multiply-add chain per weight from zero over the band's positions in row-major
//!   order, added to the chunk's sum (chunks of `REDUCTION_CHUNK` images).
//! - **Weight gradient at stride 2** (per chunk of images): sixteen lane sums per weight, lane
//!   `l` taking grid positions `≡ l (mod 16)` of every image in turn, one fused multiply-add
//!   per term; then the lanes folded in halves (`l + 8` onto `l`, then `+ 4`, `+ 2`, `+ 1`, see
//!   [`fold_lanes`]). Image groups sized to the L2 cache only decide when the lane sums are
//!   parked in memory between sweeps.
//!
//! The scalar references in the tests compute exactly these orders, and each instruction set the
//! CPU has must match them bit for bit.

use std::mem::MaybeUninit;

use super::cpu::{self, KernelPath};
use super::geometry::ConvGeometry;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod chains;
mod phases;
mod weight_gradient;

pub use phases::{PhaseScratch, PhaseWeights, input_gradient_image};
#[cfg(test)]
use weight_gradient::lane_sums_in_groups;
use weight_gradient::{GradientGroup, TILE_SUMS, gradient_group_bytes};
pub use weight_gradient::{
    backward, fold_lanes, gradient_group, handles_backward, handles_weight_gradient,
    weight_gradient,
};

/// Output channels the packed weights are padded to a multiple of: the AVX-512 tile's width, and
/// room for the AVX2 tiles' one channel past an odd count.
const OUT_BLOCK: usize = 8;
/// Grid positions per lane-sum vector of the weight gradient, and the grid's rounding.
const LANES: usize = 16;

/// An instruction set with a direct kernel that this CPU has. Only [`Isa::chosen`] and
/// [`Isa::available`] make one (the field is private), so holding an `Isa` proves the CPU can
/// run its tiles: the kernels' `unsafe` relies on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Isa(Kind);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// AVX-512 F + VL: 16 lanes, 32 registers.
    Avx512,
    /// AVX2 + FMA: 8 lanes, 16 registers.
    Avx2,
}

impl Isa {
    /// The instruction set of this process's kernel path ([`cpu::kernel_path`]), if it has a
    /// direct kernel.
    pub fn chosen() -> Option<Self> {
        match cpu::kernel_path() {
            KernelPath::Avx512 => Some(Isa(Kind::Avx512)),
            KernelPath::Avx2 => Some(Isa(Kind::Avx2)),
            KernelPath::Portable => None,
        }
    }

    /// Every instruction set this CPU can run (whatever the chosen path), for the tests.
    pub fn available() -> Vec<Self> {
        let features = cpu::cpu().features;
        [
            (Isa(Kind::Avx512), KernelPath::Avx512),
            (Isa(Kind::Avx2), KernelPath::Avx2),
        ]
        .into_iter()
        .filter(|(_, path)| path.supported(features))
        .map(|(isa, _)| isa)
        .collect()
    }
}

impl Kind {
    /// How this instruction set's forward tiles lay their vectors on output rows `width` wide
    /// (see [`Positions`]; a question about the tiles, not the CPU, so the tests can ask it of
    /// an instruction set the CPU lacks).
    fn positions(self, width: usize) -> Positions {
        match self {
            Kind::Avx512 if width.is_multiple_of(AVX512_WIDTH) => Positions::Rows,
            Kind::Avx512 => Positions::Masked,
            Kind::Avx2 if width.is_multiple_of(AVX2_WIDTH) => Positions::Rows,
            Kind::Avx2 => Positions::Grid,
        }
    }
}

/// Floats per AVX2 vector.
const AVX2_WIDTH: usize = 8;
/// Floats per AVX-512 vector.
const AVX512_WIDTH: usize = 16;

/// Where a forward tile's vectors of output positions lie, and where it stores them. Every
/// output is the same fused multiply-add chain whichever is used (the module's sum order); they
/// differ only in which positions share a vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Positions {
    /// Whole rows of vectors (the width a multiple of the vector: 8 floats on AVX2, 16 on
    /// AVX-512): vector `k` of `n` lanes holds the outputs `n·k .. n·k + n` of a channel's
    /// plane, all in one output row, stored straight to the output. No dropped columns are
    /// computed (at 16×16 they were 11 % of the grid, at 32×32 6 %) and nothing is copied out.
    Rows,
    /// Consecutive grid positions (AVX2, other widths), stored whole to an output grid that is
    /// then copied out row by row: AVX2's masked store, `vmaskmovps`, cost 12 % of the kernel's
    /// time on Zen 3.
    Grid,
    /// Consecutive grid positions stored straight to the output with lane masks (AVX-512 on
    /// other widths, whose `k` masks are cheap).
    Masked,
    /// Pairs of output rows 8 wide (AVX-512, 3×3 at stride 1 on planes 8 wide and an even number
    /// of rows high, [`Layout::paired`]):
    /// the input planes have no padding columns, so the 16 inputs of two rows are consecutive;
    /// the taps reaching left or right of a row load with the lanes that would wrap around
    /// masked to zero. Stored whole; no column is dropped (a fifth of the grid was at 8×8).
    Pairs,
}

/// Whether `g` is a geometry the direct kernel's forward pass handles: stride 1 with an odd
/// "same" kernel, or a [`phase_split`] stride-2 convolution.
pub fn fits(g: &ConvGeometry) -> bool {
    g.in_channels > 0
        && ((g.stride == 1 && g.kernel % 2 == 1 && 2 * g.padding == g.kernel - 1) || phase_split(g))
}

/// Whether `g` is a 3×3, padding-1, stride-2 convolution on an even-sided input (a ResNet's
/// downsampling convolution), which the direct kernel runs on the input split into its four
/// *phase planes*: the pixels `(2i + qh, 2j + qw)` for each phase `(qh, qw)`. Every tap of
/// such a convolution reads one phase plane, shifted by at most one pixel up or left (see
/// [`Layout::taps`]), so on zero-padded phase planes it is a direct convolution with the taps
/// spread over four planes, computed like a stride-1 one (on an output grid a column wider than
/// the output, `out_w + 1`).
fn phase_split(g: &ConvGeometry) -> bool {
    g.stride == 2
        && g.kernel == 3
        && g.padding == 1
        && g.height.is_multiple_of(2)
        && g.width.is_multiple_of(2)
}

/// Whether this process runs the direct kernel for `g`: a geometry it handles, on a kernel path
/// with a direct kernel (AVX-512 or AVX2; `SPLITAUX_KERNEL_PATH=portable` turns it off).
pub fn handles(g: &ConvGeometry) -> bool {
    fits(g) && Isa::chosen().is_some()
}

/// The weights of a convolution reordered for the kernel: `[in, k·k, out′]`, `out′` the output
/// channels rounded up to [`OUT_BLOCK`] (the extra ones zero), so a tile's weights for one input
/// channel and tap are consecutive floats.
pub struct PackedWeights {
    data: Vec<f32>,
    out_padded: usize,
}

impl PackedWeights {
    /// # Shapes
    /// - `weight`: `[out, in, k, k]`
    pub fn new(g: &ConvGeometry, weight: &[f32]) -> Self {
        let (cin, taps) = (g.in_channels, g.kernel * g.kernel);
        Self::from_fn(cin, taps, g.out_channels, |c, t, o| {
            weight[(o * cin + c) * taps + t]
        })
    }

    /// `[channels, taps, out′]` packed weights with `w(c, t, o)` at input channel `c`, tap `t`,
    /// output channel `o`.
    fn from_fn(
        channels: usize,
        taps: usize,
        out: usize,
        w: impl Fn(usize, usize, usize) -> f32,
    ) -> Self {
        let out_padded = out.div_ceil(OUT_BLOCK) * OUT_BLOCK;
        let mut data = vec![0.0; channels * taps * out_padded];
        for c in 0..channels {
            for t in 0..taps {
                for o in 0..out {
                    data[(c * taps + t) * out_padded + o] = w(c, t, o);
                }
            }
        }
        Self { data, out_padded }
    }
}

/// `dst.copy_from_slice(src)` for one image row, inline with vector moves: rows are 8–32
/// floats, where a `memcpy` call costs more than the copy (3–5 % of a training step).
fn copy_row(isa: Isa, src: &[f32], dst: &mut [MaybeUninit<f32>]) {
    assert_eq!(src.len(), dst.len(), "copy_row: lengths");
    // SAFETY: an `Isa` reaches the kernels only when the CPU has it (`Isa::chosen`,
    // `Isa::available`); `dst` holds `src.len()` floats.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let dst = dst.as_mut_ptr().cast::<f32>();
        match isa.0 {
            Kind::Avx512 => avx512::copy_row(src, dst),
            Kind::Avx2 => avx2::copy_row(src, dst),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        for (d, s) in dst.iter_mut().zip(src) {
            d.write(*s);
        }
    }
}

/// `even[j] = src[2j]`, `odd[j] = src[2j + 1]`: one input row split into two phase-plane rows.
fn deinterleave_row(isa: Isa, src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    assert!(
        src.len() == 2 * even.len() && even.len() == odd.len(),
        "deinterleave_row: lengths"
    );
    #[cfg(target_arch = "x86_64")]
    if isa.0 == Kind::Avx512 {
        // SAFETY: the CPU has AVX-512 (an `Isa` exists only then); lengths asserted above.
        unsafe { avx512::deinterleave_row(src, even, odd) };
        return;
    }
    let _ = isa;
    for ((pair, e), o) in src.chunks_exact(2).zip(even).zip(odd) {
        *e = pair[0];
        *o = pair[1];
    }
}

/// `floats` as slots to write (every `f32` is a valid `MaybeUninit<f32>`; only initialized
/// values are written through it).
fn as_slots(floats: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same layout; writes through the view store initialized floats only.
    unsafe { std::slice::from_raw_parts_mut(floats.as_mut_ptr().cast(), floats.len()) }
}

/// Buffers of the direct kernel for a run of images (one per rayon job): one padded input image, and one image's output on
/// the grid (when the tiles store whole vectors of grid positions, [`Positions::Grid`]).
pub struct Scratch {
    padded: Vec<f32>,
    out_grid: Vec<f32>,
    /// Offsets of the taps ([`Layout::taps`]), worked out once.
    taps: Vec<usize>,
}

impl Scratch {
    pub fn new(isa: Isa, g: &ConvGeometry) -> Self {
        let l = Layout::forward(isa, g);
        Self {
            // Zeroed once: only the interiors are ever written.
            padded: vec![0.0; l.padded_len(g)],
            // Sized by `convolve` when the tiles need it (`Positions::Grid`).
            out_grid: Vec::new(),
            taps: l.taps(g),
        }
    }
}

/// Sizes of the padded-width layout of one geometry. At stride 1 an input channel is one
/// padded plane, `(h + k − 1) × (w + k − 1)`; split into phases ([`phase_split`]) it is four
/// phase planes of `(out_h + 1) × (out_w + 1)`, each with one zero row on top and one zero column
/// on the left (the taps reach one pixel up and left of a phase plane, never down or right);
/// [`Layout::paired`] has no padding columns at all (`row = w`).
struct Layout {
    /// Grid positions per output row, and floats per row of a plane: the padded width `w′`
    /// (the width itself in [`Layout::paired`]).
    row: usize,
    /// Floats from one input channel to the next: a padded plane, or four phase planes.
    plane: usize,
    /// Floats per phase plane (the whole `plane` at stride 1).
    phase: usize,
    /// Grid positions computed, `out_h · w′` rounded up to [`LANES`].
    grid: usize,
    /// Planes without padding columns, for [`Positions::Pairs`] (see [`Layout::paired`]).
    paired: bool,
}

impl Layout {
    /// The layout of the forward tiles of `isa`: [`Layout::paired`] where they take pairs of
    /// rows, else [`Layout::new`].
    fn forward(isa: Isa, g: &ConvGeometry) -> Self {
        if isa.0 == Kind::Avx512
            && g.stride == 1
            && g.kernel == 3
            && g.padding == 1
            && g.width == AVX512_WIDTH / 2
            && g.height.is_multiple_of(2)
        {
            Self::paired(g)
        } else {
            Self::new(g)
        }
    }

    /// Planes of a 3×3 stride-1 convolution on 8-wide images with zero rows above and below but
    /// no padding columns, `(h + 2) · 8` floats after one zero float (and the next plane's lead
    /// float after it): tap `(ki, kj)` of output position `p = r·8 + col` reads
    /// `p + ki·8 + kj`, which is the right pixel or, at `col + kj − 1` outside the row, the
    /// neighbouring row's, masked away by the tile ([`Positions::Pairs`]).
    fn paired(g: &ConvGeometry) -> Self {
        let row = g.width;
        let plane = (g.height + 2) * row + 1;
        Self {
            row,
            plane,
            phase: plane,
            grid: g.height * row,
            paired: true,
        }
    }

    fn new(g: &ConvGeometry) -> Self {
        let (row, phase, phases) = if phase_split(g) {
            let row = g.out_width() + 1;
            (row, (g.out_height() + 1) * row, 4)
        } else {
            let row = g.width + 2 * g.padding;
            (row, (g.height + 2 * g.padding) * row, 1)
        };
        Self {
            row,
            plane: phases * phase,
            phase,
            grid: (g.out_height() * row).div_ceil(LANES) * LANES,
            paired: false,
        }
    }

    /// Floats of one image's padded planes, with the slack the last channel's last vector reads
    /// past its plane (`farthest_tap + grid` floats from the plane's start).
    fn padded_len(&self, g: &ConvGeometry) -> usize {
        let farthest_tap = self.taps(g).into_iter().max().unwrap_or(0);
        (g.in_channels - 1) * self.plane + farthest_tap + self.grid
    }

    /// Floats from one output channel to the next in a laid-out output gradient
    /// ([`Layout::lay_gradient`]): `out_h + 2` grid rows, rounded up to whole cache lines.
    fn gradient_plane(&self, g: &ConvGeometry) -> usize {
        ((g.out_height() + 2) * self.row).next_multiple_of(LANES)
    }

    /// Floats before the first channel of a laid-out output gradient, so that each channel's
    /// grid (`row + 1` floats into its plane) starts a cache line: the weight-gradient tiles'
    /// loads of it are then whole lines (loads straddling two lines cost the tiles ~10 %,
    /// `examples/kernel_times` on the Intel Xeon).
    fn gradient_lead(&self) -> usize {
        (LANES - (self.row + 1) % LANES) % LANES
    }

    /// Floats per image of a laid-out output gradient: its output channels rounded up to two
    /// (the extra channel stays zero; the AVX2 weight-gradient tiles read it) and one more plane
    /// of slack, for the grid read at `lead + row + 1`.
    fn gradient_len(&self, g: &ConvGeometry) -> usize {
        (g.out_channels.next_multiple_of(2) + 1) * self.gradient_plane(g) + LANES
    }

    /// Copies an image `[in, h, w]` into the interiors of its padded planes in `dst` (whose
    /// borders and slack are zero and stay so), or of its phase planes ([`phase_split`]).
    fn pad(&self, isa: Isa, g: &ConvGeometry, x: &[f32], dst: &mut [f32]) {
        let (w, p) = (g.width, g.padding);
        let channels = x.chunks_exact(g.height * w).zip(dst.chunks_mut(self.plane));
        if self.paired {
            for (src, plane) in channels {
                copy_row(isa, src, as_slots(&mut plane[1 + self.row..][..src.len()]));
            }
            return;
        }
        if phase_split(g) {
            let ow = g.out_width();
            for (src, planes) in channels {
                // Input row 2i + qh goes to row i + 1 of phases (qh, 0) and (qh, 1), from col 1.
                for (r, src_row) in src.chunks_exact(w).enumerate() {
                    let at = (r % 2) * 2 * self.phase + (r / 2 + 1) * self.row + 1;
                    let (even, odd) = planes[at..].split_at_mut(self.phase);
                    deinterleave_row(isa, src_row, &mut even[..ow], &mut odd[..ow]);
                }
            }
            return;
        }
        for (src, plane) in channels {
            for (r, src_row) in src.chunks_exact(w).enumerate() {
                copy_row(
                    isa,
                    src_row,
                    as_slots(&mut plane[(r + p) * self.row + p..][..w]),
                );
            }
        }
    }

    /// Writes an output gradient `[out, out_h, out_w]` into `dst` (zero elsewhere, and staying
    /// so), channel `o`'s pixel `(r, c)` at `lead + o·gradient_plane + (r + 1)·row + c + 1`
    /// ([`Layout::gradient_lead`]). Read from `lead + row + 1` on, each channel is the gradient
    /// on the grid, zero in the dropped columns and the tail (what the lane-sum weight-gradient
    /// tiles take).
    fn lay_gradient(&self, isa: Isa, g: &ConvGeometry, dy: &[f32], dst: &mut [f32]) {
        let w = g.out_width();
        for (src, plane) in dy
            .chunks_exact(g.out_plane())
            .zip(dst[self.gradient_lead()..].chunks_mut(self.gradient_plane(g)))
        {
            for (r, src_row) in src.chunks_exact(w).enumerate() {
                copy_row(
                    isa,
                    src_row,
                    as_slots(&mut plane[(r + 1) * self.row + 1..][..w]),
                );
            }
        }
    }

    /// Offset of tap `(ki, kj)` from a grid position, in an input channel's padded plane (or
    /// phase planes). Split into phases, tap `(ki, kj)` reads input pixel `(2·oh + ki − 1,
    /// 2·ow + kj − 1)`: with `y = ki − 1`, phase row `qh = y mod 2`, and a shift of `⌊y/2⌋ ∈
    /// {−1, 0}` rows (the same for columns), which the phase plane's zero top row (left column)
    /// absorbs.
    fn taps(&self, g: &ConvGeometry) -> Vec<usize> {
        let k = g.kernel;
        (0..k * k)
            .map(|t| {
                let (ki, kj) = (t / k, t % k);
                if phase_split(g) {
                    let (y, x) = (ki as isize - 1, kj as isize - 1);
                    let phase = (y.rem_euclid(2) * 2 + x.rem_euclid(2)) as usize;
                    let (dy, dx) = (
                        (y.div_euclid(2) + 1) as usize,
                        (x.div_euclid(2) + 1) as usize,
                    );
                    phase * self.phase + dy * self.row + dx
                } else {
                    ki * self.row + kj
                }
            })
            .collect()
    }
}

/// What every register tile of one image shares.
struct Tile<'a> {
    /// Padded input planes, `plane` floats apart.
    input: *const f32,
    plane: usize,
    channels: usize,
    /// Offsets of the taps in a padded plane (or phase planes).
    taps: &'a [usize],
    /// Whether the taps are a 3×3 square on one padded plane, `ki·row + kj` (stride 1).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    square_3x3: bool,
    /// The packed weights ([`PackedWeights`]) and their padded output count.
    weights: *const f32,
    out_padded: usize,
    /// The image's output, `[out_channels, height, width]`, or (with [`Positions::Grid`]) the
    /// output grid, `[out_channels, grid]`.
    output: *mut f32,
    /// Floats from one output channel to the next in `output`.
    out_stride: usize,
    out_channels: usize,
    positions: Positions,
    height: usize,
    width: usize,
    /// Grid positions per output row (the padded width, or the width in [`Layout::paired`]).
    row: usize,
    /// Grid positions computed (a multiple of every instruction set's vector).
    grid: usize,
}

impl Tile<'_> {
    /// Vectors of `lanes` output positions per channel (`lanes` divides the grid, and in
    /// [`Positions::Rows`] the width).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn vectors(&self, lanes: usize) -> usize {
        match self.positions {
            Positions::Rows => {
                assert!(self.width.is_multiple_of(lanes), "direct convolution: rows");
                self.height * self.width / lanes
            }
            Positions::Grid | Positions::Masked | Positions::Pairs => self.grid / lanes,
        }
    }

    /// Where vector `k` of `lanes` output positions lies: `(input, output)`, the offsets of its
    /// first position in a padded input plane (before the tap's) and in an output channel.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn vector(&self, k: usize, lanes: usize) -> (usize, usize) {
        match self.positions {
            Positions::Rows => {
                let per_row = self.width / lanes;
                ((k / per_row) * self.row + (k % per_row) * lanes, k * lanes)
            }
            Positions::Grid | Positions::Masked | Positions::Pairs => (k * lanes, k * lanes),
        }
    }

    /// The output pixels of grid positions `start .. start + lanes`, one run per output row the
    /// positions touch: `(first lane, end lane, offset)`, lane `i` of the run going to output
    /// element `offset + i` of a channel's plane. Positions in dropped columns or past the last
    /// row belong to no run. `offset` may be negative (lane 0 lies in an earlier row).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn runs(&self, start: usize, lanes: usize) -> impl Iterator<Item = (usize, usize, isize)> {
        let dropped = self.row - self.width;
        let last = ((start + lanes - 1) / self.row).min(self.height.saturating_sub(1));
        (start / self.row..=last).filter_map(move |r| {
            let first_lane = (r * self.row).saturating_sub(start);
            let end_lane = (r * self.row + self.width).saturating_sub(start).min(lanes);
            // Lane `i` of row `r` is pixel `start + i − r·dropped`.
            (first_lane < end_lane).then(|| {
                (
                    first_lane,
                    end_lane,
                    start as isize - (r * dropped) as isize,
                )
            })
        })
    }
}

/// Convolves one image on instruction set `isa` (the kernel's sum order, see the module
/// documentation).
///
/// # Shapes
/// - `x`: `[in, h, w]`
/// - `y`: `[out, h, w]`, written in full
pub fn forward_image(
    isa: Isa,
    g: &ConvGeometry,
    x: &[f32],
    weights: &PackedWeights,
    scratch: &mut Scratch,
    y: &mut [MaybeUninit<f32>],
) {
    assert!(fits(g), "direct convolution: unsupported geometry {g:?}");
    let l = Layout::forward(isa, g);
    assert_eq!(x.len(), g.in_len(), "direct convolution: input length");
    l.pad(isa, g, x, &mut scratch.padded);
    // The taps follow from the geometry alone.
    assert!(
        scratch.taps == l.taps(g),
        "direct convolution: scratch made for another geometry"
    );
    let source = Source {
        input: &scratch.padded,
        plane: l.plane,
        channels: g.in_channels,
        taps: &scratch.taps,
        square_3x3: g.kernel == 3 && !phase_split(g),
        weights,
        row: l.row,
        grid: l.grid,
        paired: l.paired,
    };
    let out = Plane {
        channels: g.out_channels,
        height: g.out_height(),
        width: g.out_width(),
    };
    convolve(isa, &source, out, &mut scratch.out_grid, y);
}

/// What the tiles of one image read: prepared input planes, the taps' offsets in them, and
/// the packed weights.
struct Source<'a> {
    /// Input planes, `plane` floats apart, with slack for the last vector of the farthest tap.
    input: &'a [f32],
    plane: usize,
    channels: usize,
    taps: &'a [usize],
    /// See [`Tile::square_3x3`].
    square_3x3: bool,
    weights: &'a PackedWeights,
    /// Grid positions per output row, and output positions computed (see [`Layout`]).
    row: usize,
    grid: usize,
    /// Planes without padding columns ([`Layout::paired`]).
    paired: bool,
}

/// The shape of an output image, `[channels, height, width]`.
#[derive(Clone, Copy)]
struct Plane {
    channels: usize,
    height: usize,
    width: usize,
}

/// Runs the register tiles of one image: `y[o, ·] = Σ_{c, t} w[c, t, o] · input[c, · +
/// taps[t]]` in the module's sum order, written in full to `y` (`[channels, height, width]` of
/// `out`), straight or, with [`Positions::Grid`], through `out_grid`.
fn convolve(
    isa: Isa,
    src: &Source,
    out: Plane,
    out_grid: &mut Vec<f32>,
    y: &mut [MaybeUninit<f32>],
) {
    let Plane {
        channels,
        height,
        width,
    } = out;
    let farthest_tap = src.taps.iter().copied().max().unwrap_or(0);
    assert!(
        src.channels > 0
            && src.input.len() >= (src.channels - 1) * src.plane + farthest_tap + src.grid
            && src.grid >= height * src.row
            && src.grid.is_multiple_of(LANES)
            && src.row >= width,
        "direct convolution: input planes"
    );
    assert!(
        !src.square_3x3
            || src
                .taps
                .iter()
                .enumerate()
                .all(|(t, &at)| at == t / 3 * src.row + t % 3),
        "direct convolution: taps of a 3×3 square"
    );
    assert!(
        src.weights.out_padded == channels.div_ceil(OUT_BLOCK) * OUT_BLOCK
            && src.weights.data.len() == src.channels * src.taps.len() * src.weights.out_padded,
        "direct convolution: weights packed for another geometry"
    );
    assert_eq!(
        y.len(),
        channels * height * width,
        "direct convolution: output length"
    );
    let positions = if src.paired {
        assert!(
            isa.0 == Kind::Avx512
                && width == AVX512_WIDTH / 2
                && src.row == width
                && src.grid == height * width
                && src.taps.len() == 9
                && src.square_3x3,
            "direct convolution: pairs of rows are AVX-512's, 3×3 on planes 8 wide"
        );
        Positions::Pairs
    } else {
        isa.0.positions(width)
    };
    let on_grid = positions == Positions::Grid;
    if on_grid && out_grid.len() < channels * src.grid {
        out_grid.resize(channels * src.grid, 0.0);
    }
    let (output, out_stride) = if on_grid {
        (out_grid.as_mut_ptr(), src.grid)
    } else {
        (y.as_mut_ptr().cast(), height * width)
    };
    let tile = Tile {
        input: src.input.as_ptr(),
        plane: src.plane,
        channels: src.channels,
        taps: src.taps,
        square_3x3: src.square_3x3,
        weights: src.weights.data.as_ptr(),
        out_padded: src.weights.out_padded,
        output,
        out_stride,
        out_channels: channels,
        positions,
        height,
        width,
        row: src.row,
        grid: src.grid,
    };
    // SAFETY: the CPU has `isa` (see `copy_row`). The tiles read the input planes at most
    // `(channels − 1)·plane + farthest_tap + grid` floats in (asserted above) and the packed
    // weights within their asserted length. They write each of `y`'s elements once (asserted
    // length): through `Tile::runs`, as whole vectors in output rows (`Rows`: the width a
    // multiple of the vector), or to the output grid (at least `channels · grid` floats).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match isa.0 {
            Kind::Avx512 => avx512::run_tiles(&tile),
            Kind::Avx2 => avx2::run_tiles(&tile),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = tile;
        unreachable!("an Isa exists only on x86-64");
    }
    if on_grid {
        // Drop the columns past `width` and the tail.
        for (grid, plane) in out_grid
            .chunks(src.grid)
            .zip(y.chunks_exact_mut(height * width))
        {
            for (r, row) in plane.chunks_exact_mut(width).enumerate() {
                copy_row(isa, &grid[r * src.row..][..width], row);
            }
        }
    }
}

/// Whether this process computes the input gradient of `g` with [`input_gradient_image`]: a
/// [`phase_split`] convolution on a path with a direct kernel. (The input gradient of a
/// stride-1 convolution is a stride-1 convolution, run by [`forward_image`].)
pub fn handles_phase_input_gradient(g: &ConvGeometry) -> bool {
    phases::handles(g) && Isa::chosen().is_some()
}

/// One line on how the direct kernel blocks its work on this machine: the forward tile and the
/// stride-1 weight-gradient tile of the chosen instruction set, and the stride-2 weight-gradient
/// image groups (from the L2 size) of a CIFAR ResNet's first downsampling convolution, e.g.
/// `blocking: direct avx2, forward tiles 6 or 5 channels (4 or 2 at the end) × 2 vectors of 8
/// positions (…); stride-1 weight-gradient tiles 8 output channels × 1 input channel × 9 taps;
/// stride-2 weight-gradient groups of 3 images (16→32 channels at 32×32) in 256 KiB (half the
/// L2), lane sums kept over chunks of 16`. Groups change only when lane sums are parked, not
/// the sums.
pub fn describe_blocking(chunk: usize) -> String {
    let Some(isa) = Isa::chosen() else {
        return "blocking: no direct kernel (portable path: im2col + GEMM)".into();
    };
    #[cfg(target_arch = "x86_64")]
    let (tile, chain_tile) = match isa.0 {
        Kind::Avx512 => (avx512::FORWARD_TILE, avx512::CHAIN_TILE),
        Kind::Avx2 => (avx2::FORWARD_TILE, avx2::CHAIN_TILE),
    };
    // No `Isa` exists off x86-64 (`Isa::chosen` returned above).
    #[cfg(not(target_arch = "x86_64"))]
    let (tile, chain_tile) = ("", "");
    let downsampling = ConvGeometry {
        batch: chunk,
        in_channels: 16,
        out_channels: 32,
        height: 32,
        width: 32,
        kernel: 3,
        stride: 2,
        padding: 1,
    };
    format!(
        "blocking: direct {}, forward tiles {tile}; stride-1 weight-gradient tiles {chain_tile}; \
         stride-2 weight-gradient groups of {} images (16→32 channels at 32×32) in {} KiB (half \
         the L2), lane sums kept over chunks of {chunk}",
        cpu::kernel_path(),
        gradient_group(&downsampling, chunk),
        gradient_group_bytes() / 1024
    )
}

#[cfg(test)]
mod tests;
