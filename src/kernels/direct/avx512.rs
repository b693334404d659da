//! The direct kernel's AVX-512 tiles (F + VL; 16 lanes, 32 registers). A forward tile holds 8
//! output channels × up to 3 vectors of 16 output positions (24 accumulators; in output rows
//! when the width is a multiple of 16, in pairs of rows when it is 8, else on the grid with
//! masked stores); a stride-1 weight-gradient tile 16 output channels × 3 input channels × 9
//! taps (27 chains, [`chain_tile`]); a stride-2 weight-gradient tile 3 output channels × 9 taps
//! (27 accumulators, one vector of lane sums each; 1 or 2 for the last channels). The sum order
//! is the one [`super`] defines.
//!
//! VL as well as F: without it LLVM keeps loop-carried accumulators in zmm0–15 only and spills
//! the rest, since the 128-bit zeroing idiom it uses needs VL to reach zmm16–31.

use std::arch::x86_64::*;

use super::chains::Chains;
use super::{GradientGroup, LANES, Layout, OUT_BLOCK, Positions, Tile};

/// Output channels per forward tile.
const CHANNELS: usize = OUT_BLOCK;
/// Vectors of output positions per forward tile, at most.
const MAX_VECTORS: usize = 3;
/// The forward tile, as `bench --cpu` names it.
pub(super) const FORWARD_TILE: &str = "8 channels × 3 vectors of 16 positions (in output rows \
     when the width is a multiple of 16, in pairs of rows when it is 8, else on the grid, masked)";

/// `dst[..src.len()] = src` with masked vector moves.
///
/// # Safety
/// AVX-512 F and VL; `dst` valid for `src.len()` writes.
#[target_feature(enable = "avx512f,avx512vl")]
pub(super) unsafe fn copy_row(src: &[f32], dst: *mut f32) {
    for (i, s) in src.chunks(LANES).enumerate() {
        let mask = ((1u32 << s.len()) - 1) as __mmask16;
        // SAFETY: the masked lanes cover `s.len()` floats of the chunk, in both buffers.
        unsafe {
            let v = _mm512_maskz_loadu_ps(mask, s.as_ptr());
            _mm512_mask_storeu_ps(dst.add(i * LANES), mask, v);
        }
    }
}

/// `even[j] = src[2j]`, `odd[j] = src[2j + 1]` for `j < even.len()`: 32 input floats at a time,
/// split by two two-register permutes, stored masked.
///
/// # Safety
/// AVX-512 F and VL; `src.len() == 2·even.len() == 2·odd.len()`.
#[target_feature(enable = "avx512f,avx512vl")]
pub(super) unsafe fn deinterleave_row(src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let mask = |n: usize| ((1u32 << n.min(LANES)) - 1) as __mmask16;
    for (k, chunk) in src.chunks(2 * LANES).enumerate() {
        let n = chunk.len();
        let at = k * LANES;
        // SAFETY: the masks cover the chunk's `n` floats of `src` and its `n / 2` outputs (the
        // second half's address may lie past the row when its mask is empty, hence the
        // wrapping arithmetic: nothing is read there).
        unsafe {
            let lo = _mm512_maskz_loadu_ps(mask(n), chunk.as_ptr());
            let hi = _mm512_maskz_loadu_ps(
                mask(n.saturating_sub(LANES)),
                chunk.as_ptr().wrapping_add(LANES),
            );
            let out = mask(n / 2);
            _mm512_mask_storeu_ps(
                even.as_mut_ptr().add(at),
                out,
                _mm512_permutex2var_ps(lo, evens, hi),
            );
            _mm512_mask_storeu_ps(
                odd.as_mut_ptr().add(at),
                out,
                _mm512_permutex2var_ps(lo, odds, hi),
            );
        }
    }
}

/// `dst[2j] = even[j]`, `dst[2j + 1] = odd[j]` (+ `plus`, when given), 16 pairs at a time by
/// two two-register permutes, stored masked.
///
/// # Safety
/// AVX-512 F and VL; `dst.len() == 2·even.len() == 2·odd.len()`, `plus` as long as `dst`.
#[target_feature(enable = "avx512f,avx512vl")]
pub(super) unsafe fn interleave_row(
    even: &[f32],
    odd: &[f32],
    plus: Option<&[f32]>,
    dst: &mut [std::mem::MaybeUninit<f32>],
) {
    let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let mask = |n: usize| ((1u32 << n.min(LANES)) - 1) as __mmask16;
    let dst = dst.as_mut_ptr().cast::<f32>();
    for (k, (e, o)) in even.chunks(LANES).zip(odd.chunks(LANES)).enumerate() {
        let n = e.len();
        let at = 2 * k * LANES;
        // SAFETY: the masks cover the chunk's `n` inputs and its `2n` outputs (the second
        // half's addresses may lie past the row when its mask is empty, hence the wrapping
        // arithmetic: nothing is read or written there).
        unsafe {
            let ev = _mm512_maskz_loadu_ps(mask(n), e.as_ptr());
            let ov = _mm512_maskz_loadu_ps(mask(n), o.as_ptr());
            let (m0, m1) = (mask(2 * n), mask((2 * n).saturating_sub(LANES)));
            let mut lo = _mm512_permutex2var_ps(ev, low, ov);
            let mut hi = _mm512_permutex2var_ps(ev, high, ov);
            if let Some(p) = plus {
                lo = _mm512_add_ps(lo, _mm512_maskz_loadu_ps(m0, p.as_ptr().add(at)));
                let high_half = p.as_ptr().wrapping_add(at + LANES);
                hi = _mm512_add_ps(hi, _mm512_maskz_loadu_ps(m1, high_half));
            }
            _mm512_mask_storeu_ps(dst.add(at), m0, lo);
            _mm512_mask_storeu_ps(dst.wrapping_add(at + LANES), m1, hi);
        }
    }
}

/// All register tiles of one image: for each run of up to [`MAX_VECTORS`] vectors of output
/// positions ([`Tile::vector`]), every block of [`CHANNELS`] output channels (the input strip
/// stays in L1 across the blocks).
///
/// # Safety
/// AVX-512 F and VL; `tile`'s buffers as [`super::forward_image`] asserts them.
#[target_feature(enable = "avx512f,avx512vl")]
pub(super) unsafe fn run_tiles(tile: &Tile) {
    let vectors = tile.vectors(LANES);
    // Runs as even as they can be (16 vectors: 3, 3, 3, 3, 2, 2, not 3 × 5 + 1): a run of one
    // vector has 8 accumulators, too few chains to hide the FMA latency.
    let runs = vectors.div_ceil(MAX_VECTORS);
    let mut v = 0;
    for run in 0..runs {
        let nv = (vectors - v).div_ceil(runs - run);
        // (input, output) offsets of the run's vectors (the unused ones repeat the last).
        let at: [(usize, usize); MAX_VECTORS] =
            std::array::from_fn(|i| tile.vector((v + i).min(vectors - 1), LANES));
        for o in (0..tile.out_channels).step_by(CHANNELS) {
            // SAFETY: `o + CHANNELS ≤ out_padded`; the vectors lie in the image.
            unsafe {
                match (nv, tile.positions) {
                    (3, Positions::Rows) => forward_tile::<3, true, false>(tile, &at, o),
                    (2, Positions::Rows) => forward_tile::<2, true, false>(tile, &at, o),
                    (_, Positions::Rows) => forward_tile::<1, true, false>(tile, &at, o),
                    (3, Positions::Pairs) => forward_tile::<3, true, true>(tile, &at, o),
                    (2, Positions::Pairs) => forward_tile::<2, true, true>(tile, &at, o),
                    (_, Positions::Pairs) => forward_tile::<1, true, true>(tile, &at, o),
                    (3, _) => forward_tile::<3, false, false>(tile, &at, o),
                    (2, _) => forward_tile::<2, false, false>(tile, &at, o),
                    (_, _) => forward_tile::<1, false, false>(tile, &at, o),
                }
            }
        }
        v += nv;
    }
}

/// Output channels `o + j`, `j <` [`CHANNELS`], at the 16 positions of each of `NV` vectors,
/// vector `v` starting at `at[v].0` in the padded input planes (its grid position) and at
/// `at[v].1` in an output channel: `Σ_{c, t} w[c, t, o + j] · input[c, at[v].0 + taps[t] ..]`,
/// one FMA per term in `(c, t)` order. `ROWS` ([`Positions::Rows`], [`Positions::Pairs`]):
/// each vector is stored whole; otherwise its lanes in the image, masked ([`Tile::runs`]).
/// `PAIRS` ([`Positions::Pairs`]): each vector holds two rows of 8, and the taps left and
/// right of the centre load with the lanes that would wrap around a row masked to zero. (Both
/// constants, not tests of `tile.positions`: with a test LLVM stored every accumulator to the
/// stack after each FMA, halving the tile's speed.)
///
/// # Safety
/// As [`run_tiles`]; `at[..NV]` are `tile.vector(k, 16)` of vectors `k < tile.vectors(16)`,
/// `ROWS` is whether `tile.positions` is `Rows` or `Pairs` and `PAIRS` whether it is `Pairs`
/// (then with the nine taps of a 3×3 kernel).
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn forward_tile<const NV: usize, const ROWS: bool, const PAIRS: bool>(
    tile: &Tile,
    at: &[(usize, usize); MAX_VECTORS],
    o: usize,
) {
    // Column 0 of each row (lanes 0, 8) has no left neighbour, column 7 (lanes 7, 15) no right.
    const PAIR_MASKS: [__mmask16; 3] = [0xFEFE, 0xFFFF, 0x7F7F];
    let mut acc = [[_mm512_setzero_ps(); NV]; CHANNELS];
    for c in 0..tile.channels {
        // SAFETY (all pointer arithmetic below): within the buffers, per the contract.
        let base = unsafe { tile.input.add(c * tile.plane) };
        let wc = unsafe { tile.weights.add(c * tile.taps.len() * tile.out_padded + o) };
        for (t, &offset) in tile.taps.iter().enumerate() {
            let xs: [__m512; NV] = std::array::from_fn(|v| unsafe {
                let at = base.add(at[v].0 + offset);
                if PAIRS {
                    _mm512_maskz_loadu_ps(PAIR_MASKS[t % 3], at)
                } else {
                    _mm512_loadu_ps(at)
                }
            });
            let wt = unsafe { wc.add(t * tile.out_padded) };
            for (j, row) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(unsafe { *wt.add(j) });
                for (a, xv) in row.iter_mut().zip(&xs) {
                    *a = _mm512_fmadd_ps(*xv, b, *a);
                }
            }
        }
    }
    let plane = tile.height * tile.width;
    let live = acc.iter().enumerate().take(tile.out_channels - o);
    // SAFETY (both branches): channel `o + j < out_channels` of the output.
    if ROWS {
        for (j, row) in live {
            let channel = unsafe { tile.output.add((o + j) * plane) };
            for (a, &(_, out)) in row.iter().zip(at) {
                // SAFETY: the vector's 16 outputs lie in one row of the channel.
                unsafe { _mm512_storeu_ps(channel.add(out), *a) };
            }
        }
    } else {
        for (j, row) in live {
            let channel = unsafe { tile.output.add((o + j) * plane) };
            for (a, &(grid, _)) in row.iter().zip(at) {
                for (first, end, offset) in tile.runs(grid, LANES) {
                    let mask = ((1u32 << end) - (1u32 << first)) as __mmask16;
                    // Only the masked lanes, inside the plane, are written (the base may lie
                    // before the plane, hence the wrapping arithmetic).
                    unsafe { _mm512_mask_storeu_ps(channel.wrapping_offset(offset), mask, *a) };
                }
            }
        }
    }
}

/// Lane sums of one output channel × one input channel: nine taps × 16 lanes (one half of a
/// [`super::TILE_SUMS`] tile).
pub(super) const CHANNEL_SUMS: usize = 9 * LANES;

/// Adds one group's terms to the lane sums of output channels `o + j`, `j < N`, × input channel
/// `c` (`lanes[j]`): lane `l` of `lanes[j][t·16 ..]` gains `dY[o + j, g] · X′[c, g + taps[t]]`
/// for every image and grid position `g ≡ l (mod 16)`, in image-then-position order. Three
/// channels make 27 accumulators, 3 output-gradient vectors and 1 input vector in the 32
/// registers: 12 loads per 27 FMAs, where two channels took 11 per 18 (nine of the input loads
/// straddle cache lines, which made the two-channel tile load-bound).
///
/// # Safety
/// AVX-512 F and VL; the reads stay inside the buffers (see [`GradientGroup::accumulate`]),
/// output channels `o .. o + N` inside the gridded gradients.
#[target_feature(enable = "avx512f,avx512vl")]
pub(super) unsafe fn gradient_tile<const N: usize>(
    group: &GradientGroup,
    c: usize,
    o: usize,
    l: &Layout,
    taps: &[usize; 9],
    lanes: [&mut [f32; CHANNEL_SUMS]; N],
) {
    // One flat array indexed by constants once the loops are unrolled: LLVM keeps it in
    // registers (a nested array was spilled to the stack).
    let mut acc: [[__m512; 9]; N] = std::array::from_fn(|j| {
        std::array::from_fn(|t| unsafe { _mm512_loadu_ps(lanes[j].as_ptr().add(t * LANES)) })
    });
    for i in 0..group.images {
        // SAFETY (all pointer arithmetic below): within the buffers, per the contract.
        let xc = unsafe { group.padded.as_ptr().add(i * group.x_len + c * l.plane) };
        let dyo = unsafe {
            group
                .gridded
                .as_ptr()
                .add(i * group.dy_len + o * group.dy_plane)
        };
        for v in (0..l.grid).step_by(LANES) {
            let d: [__m512; N] = std::array::from_fn(|j| unsafe {
                _mm512_loadu_ps(dyo.add(j * group.dy_plane + v))
            });
            for t in 0..9 {
                let xv = unsafe { _mm512_loadu_ps(xc.add(taps[t] + v)) };
                for j in 0..N {
                    acc[j][t] = _mm512_fmadd_ps(d[j], xv, acc[j][t]);
                }
            }
        }
    }
    for (sums, a) in lanes.into_iter().zip(&acc) {
        for (t, a) in a.iter().enumerate() {
            // SAFETY: `t·16 + 16 ≤ CHANNEL_SUMS`.
            unsafe { _mm512_storeu_ps(sums.as_mut_ptr().add(t * LANES), *a) };
        }
    }
}

/// The stride-1 weight-gradient tile, as `bench --cpu` names it.
pub(super) const CHAIN_TILE: &str = "16 output channels × 3 input channels × 9 taps";

/// All chain tiles of one image ([`super::chains`]): for each vector of 16 output channels,
/// the input channels in runs of up to three (as even as they can be), each run one tile of
/// 3 × 9 chains (27 accumulators) swept over every position.
///
/// # Safety
/// AVX-512 F and VL; `chains`' buffers as [`super::chains`] asserts them.
#[target_feature(enable = "avx512f,avx512vl")]
pub(super) unsafe fn chain_tiles(chains: &mut Chains) {
    let cin = chains.in_channels;
    let runs = cin.div_ceil(3);
    for o in (0..chains.out_padded).step_by(LANES) {
        let mut c = 0;
        for run in 0..runs {
            // SAFETY: channels `c .. c + n ≤ in`, outputs `o .. o + 16 ≤ out_padded`.
            unsafe {
                match (cin - c).div_ceil(runs - run) {
                    1 => chain_tile::<1>(chains, o, c),
                    2 => chain_tile::<2>(chains, o, c),
                    _ => chain_tile::<3>(chains, o, c),
                }
            }
            c += (cin - c).div_ceil(runs - run);
        }
    }
}

/// The chains of output channels `o .. o + 16` × input channels `c .. c + C` × the nine taps
/// over one image, one per band of rows, each from zero: per position `(r, col)` of the band in
/// row-major order, one fused multiply-add of `dY[r·w + col, o ..] · X′[c′, (r + ki)·row + col
/// + kj]`; then added to `sums[(c′·9 + t)·out_padded + o ..]`.
///
/// # Safety
/// As [`chain_tiles`]; `c + C ≤ in`, `o + 16 ≤ out_padded`.
#[target_feature(enable = "avx512f,avx512vl")]
unsafe fn chain_tile<const C: usize>(chains: &mut Chains, o: usize, c: usize) {
    let (plane, row, width, ld) = (chains.plane, chains.row, chains.width, chains.out_padded);
    // SAFETY (all pointer arithmetic below): within the buffers, per the contract.
    let sums = unsafe { chains.sums.as_mut_ptr().add(c * 9 * ld + o) };
    for band in (0..chains.height).step_by(chains.band_rows) {
        let mut acc = [[_mm512_setzero_ps(); 9]; C];
        for r in band..(band + chains.band_rows).min(chains.height) {
            let x0 = unsafe { chains.padded.as_ptr().add(c * plane + r * row) };
            let d0 = unsafe { chains.transposed.as_ptr().add(r * width * ld + o) };
            for col in 0..width {
                let d = unsafe { _mm512_loadu_ps(d0.add(col * ld)) };
                for (cc, chains) in acc.iter_mut().enumerate() {
                    let xc = unsafe { x0.add(cc * plane + col) };
                    for ki in 0..3 {
                        let xr = unsafe { xc.add(ki * row) };
                        for kj in 0..3 {
                            let b = _mm512_set1_ps(unsafe { *xr.add(kj) });
                            chains[ki * 3 + kj] = _mm512_fmadd_ps(d, b, chains[ki * 3 + kj]);
                        }
                    }
                }
            }
        }
        for (cc, chains) in acc.iter().enumerate() {
            for (t, a) in chains.iter().enumerate() {
                let at = unsafe { sums.add((cc * 9 + t) * ld) };
                unsafe { _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), *a)) };
            }
        }
    }
}

/// `dst[j·dst_stride + i] = src[i·src_stride + j]` for `i, j < 16`: a 16 × 16 block transposed
/// in registers (unpacks of 32- and 64-bit pairs, then two rounds of 128-bit lane shuffles).
///
/// # Safety
/// AVX-512 F; both pointers valid for 16 rows of 16 floats at their strides.
#[target_feature(enable = "avx512f,avx512vl")]
pub(super) unsafe fn transpose_16x16(
    src: *const f32,
    src_stride: usize,
    dst: *mut f32,
    dst_stride: usize,
) {
    // SAFETY: 16 rows of 16 floats, per the contract.
    let r: [__m512; 16] =
        std::array::from_fn(|i| unsafe { _mm512_loadu_ps(src.add(i * src_stride)) });
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // Within each group of four: (t0, t2) and (t1, t3) as 64-bit pairs.
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let base = i / 4 * 4;
        let (a, b) = (t[base + (i % 4) / 2], t[base + (i % 4) / 2 + 2]);
        let (a, b) = (_mm512_castps_pd(a), _mm512_castps_pd(b));
        _mm512_castpd_ps(if i % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    // 128-bit lanes: within each half of eight, row k with row k + 4.
    let v: [__m512; 16] = std::array::from_fn(|i| {
        let base = i / 8 * 8;
        let k = base + i % 4;
        if i % 8 < 4 {
            _mm512_shuffle_f32x4::<0x88>(u[k], u[k + 4])
        } else {
            _mm512_shuffle_f32x4::<0xdd>(u[k], u[k + 4])
        }
    });
    let w: [__m512; 16] = std::array::from_fn(|i| {
        let k = i % 8;
        if i < 8 {
            _mm512_shuffle_f32x4::<0x88>(v[k], v[k + 8])
        } else {
            _mm512_shuffle_f32x4::<0xdd>(v[k], v[k + 8])
        }
    });
    for (j, row) in w.iter().enumerate() {
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(dst.add(j * dst_stride), *row) };
    }
}
