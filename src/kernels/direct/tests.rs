//! The direct kernel against scalar references that spell out its summation order (see the
//! module documentation): every instruction set this CPU has must give the same bits.

use super::*;
use crate::kernels::output_gradient::OutputGradient;

/// Pixel `(c, r, col)` of the zero-padded input `x` (`[in, h, w]`), with `(r, col)` counted
/// from the padded plane's corner.
fn padded_pixel(g: &ConvGeometry, x: &[f32], c: usize, r: usize, col: usize) -> f32 {
    let p = g.padding;
    if r < p || col < p || r - p >= g.height || col - p >= g.width {
        0.0
    } else {
        x[(c * g.height + r - p) * g.width + col - p]
    }
}

/// The forward order: per output, one fused multiply-add per term from zero, channels then taps
/// (any stride).
fn reference_forward(g: &ConvGeometry, x: &[f32], w: &[f32]) -> Vec<f32> {
    let k = g.kernel;
    let mut y = vec![0.0; g.batch * g.out_len()];
    for n in 0..g.batch {
        let xn = &x[n * g.in_len()..][..g.in_len()];
        for o in 0..g.out_channels {
            for r in 0..g.out_height() {
                for col in 0..g.out_width() {
                    let mut acc = 0.0f32;
                    for c in 0..g.in_channels {
                        for t in 0..k * k {
                            let (pr, pc) = (r * g.stride + t / k, col * g.stride + t % k);
                            let v = padded_pixel(g, xn, c, pr, pc);
                            acc = v.mul_add(w[(o * g.in_channels + c) * k * k + t], acc);
                        }
                    }
                    y[((n * g.out_channels + o) * g.out_height() + r) * g.out_width() + col] = acc;
                }
            }
        }
    }
    y
}

/// The stride-1 weight-gradient order ([`chains`]): per image and band of rows, one fused
/// multiply-add chain per weight from zero over the band's positions in row-major order, added
/// to its chunk's sum; chunks added in order.
fn reference_chains(g: &ConvGeometry, x: &[f32], dy: &[f32], chunk: usize) -> Vec<f32> {
    let (out, cin, h, w) = (g.out_channels, g.in_channels, g.height, g.width);
    let mut total = vec![0.0f32; out * cin * 9];
    for first in (0..g.batch).step_by(chunk) {
        for o in 0..out {
            for c in 0..cin {
                for t in 0..9 {
                    let mut chunk_sum = 0.0f32;
                    for n in first..(first + chunk).min(g.batch) {
                        let xn = &x[n * g.in_len()..][..g.in_len()];
                        for band in (0..h).step_by(chains::band_rows(w)) {
                            let mut acc = 0.0f32;
                            for r in band..(band + chains::band_rows(w)).min(h) {
                                for col in 0..w {
                                    let d = dy[((n * out + o) * h + r) * w + col];
                                    let v = padded_pixel(g, xn, c, r + t / 3, col + t % 3);
                                    acc = d.mul_add(v, acc);
                                }
                            }
                            chunk_sum += acc;
                        }
                    }
                    total[(o * cin + c) * 9 + t] += chunk_sum;
                }
            }
        }
    }
    total
}

/// The stride-2 weight-gradient order: per chunk, sixteen lane sums over (image, grid position)
/// with fused multiply-adds, folded in halves; chunks added in order.
fn reference_lane_sums(g: &ConvGeometry, x: &[f32], dy: &[f32], chunk: usize) -> Vec<f32> {
    let l = Layout::new(g);
    let size = g.out_channels * g.in_channels * 9;
    let mut total = vec![0.0f32; size];
    for first in (0..g.batch).step_by(chunk) {
        let images = first..(first + chunk).min(g.batch);
        for o in 0..g.out_channels {
            for c in 0..g.in_channels {
                for t in 0..9 {
                    let mut lanes = [0.0f32; LANES];
                    for n in images.clone() {
                        let xn = &x[n * g.in_len()..][..g.in_len()];
                        for pos in 0..l.grid {
                            let (r, col) = (pos / l.row, pos % l.row);
                            // The kernel's other grid positions (dropped columns, the tail)
                            // multiply a zero output gradient with a finite input: adding that
                            // zero leaves a lane sum's bits as they are (a lane sum is never
                            // −0: it starts at +0, and a sum is −0 only of two −0s).
                            if r >= g.out_height() || col >= g.out_width() {
                                continue;
                            }
                            let d = dy[((n * g.out_channels + o) * g.out_height() + r)
                                * g.out_width()
                                + col];
                            let (pr, pc) = (r * g.stride + t / 3, col * g.stride + t % 3);
                            let v = padded_pixel(g, xn, c, pr, pc);
                            lanes[pos % LANES] = d.mul_add(v, lanes[pos % LANES]);
                        }
                    }
                    total[(o * g.in_channels + c) * 9 + t] += fold_lanes(&lanes);
                }
            }
        }
    }
    total
}

fn values(len: usize, salt: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            (((i * 7919 + salt * 104_729) % 1000) as f32 / 500.0) - 1.0 + 1e-3 * (i % 7) as f32
        })
        .collect()
}

fn geometry(
    batch: usize,
    cin: usize,
    out: usize,
    h: usize,
    w: usize,
    kernel: usize,
) -> ConvGeometry {
    ConvGeometry {
        batch,
        in_channels: cin,
        out_channels: out,
        height: h,
        width: w,
        kernel,
        stride: 1,
        padding: kernel / 2,
    }
}

/// A 3×3, padding-1, stride-2 geometry (the direct kernel's phase planes).
fn strided(batch: usize, cin: usize, out: usize, h: usize, w: usize) -> ConvGeometry {
    ConvGeometry {
        stride: 2,
        ..geometry(batch, cin, out, h, w, 3)
    }
}

/// The instruction sets this CPU has; a CPU with none is said so on stderr (the bit tests then
/// have nothing to compare, and the im2col path is what runs there).
fn tested_isas() -> Vec<Isa> {
    let isas = Isa::available();
    if isas.is_empty() {
        eprintln!("this CPU has neither AVX-512 (F, VL) nor AVX2 + FMA: no direct kernel to test");
    }
    isas
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn every_instruction_set_gives_the_reference_forward_bits() {
    let geometries = [
        geometry(2, 3, 16, 32, 32, 3),
        geometry(3, 5, 9, 6, 6, 3),  // a partial tile of channels
        geometry(2, 1, 3, 5, 19, 3), // non-square, one channel
        geometry(2, 2, 5, 7, 7, 5),  // 5×5
        geometry(1, 4, 4, 1, 1, 1),  // 1×1
        geometry(2, 64, 64, 8, 8, 3),
        // Rows of vectors: an odd count of them, odd channels.
        geometry(2, 3, 7, 3, 8, 3),
        geometry(2, 2, 5, 3, 24, 3), // three vectors a row: pairs straddle two rows
        geometry(2, 2, 3, 4, 8, 5),  // 5×5 in rows (the taps from the table)
        geometry(1, 1, 1, 1, 8, 1),  // 1×1, one channel, one vector
        // AVX-512 rows: runs of three vectors across rows, a partial block of channels.
        geometry(2, 3, 9, 5, 16, 3),
        geometry(2, 2, 5, 3, 48, 3), // three vectors a row
        // AVX-512 pairs of 8-wide rows: runs of 2 and 2, 3, 1 vectors; an odd height (not paired).
        geometry(3, 5, 9, 8, 8, 3),
        geometry(2, 3, 7, 6, 8, 3),
        geometry(2, 3, 7, 2, 8, 3),
        geometry(2, 3, 7, 5, 8, 3),
        // Stride 2 on phase planes: 16-wide output rows, 8-wide, and a masked/grid width.
        strided(2, 3, 9, 32, 32),
        strided(2, 5, 6, 16, 16),
        strided(3, 2, 3, 6, 10),
        strided(1, 1, 1, 2, 2),
    ];
    // On each instruction set these take both ways of laying out the tile's vectors.
    let layouts: Vec<Positions> = geometries
        .iter()
        .map(|g| Kind::Avx2.positions(g.out_width()))
        .collect();
    assert!(layouts.contains(&Positions::Rows) && layouts.contains(&Positions::Grid));
    let layouts: Vec<Positions> = geometries
        .iter()
        .map(|g| Kind::Avx512.positions(g.out_width()))
        .collect();
    assert!(layouts.contains(&Positions::Rows) && layouts.contains(&Positions::Masked));
    assert!(
        geometries
            .iter()
            .any(|g| Layout::forward(Isa(Kind::Avx512), g).paired)
    );
    for g in geometries {
        let x = values(g.batch * g.in_len(), 1);
        let w = values(g.out_channels * g.patch_len(), 2);
        let want = bits(&reference_forward(&g, &x, &w));
        for isa in tested_isas() {
            let packed = PackedWeights::new(&g, &w);
            let mut scratch = Scratch::new(isa, &g);
            let mut y = Vec::with_capacity(g.batch * g.out_len());
            for xi in x.chunks(g.in_len()) {
                // Each image in its own buffer with a guard past its end: a store beyond the
                // image shows there (in one shared buffer the next image would overwrite it).
                let guard = 64;
                let mut yi = vec![MaybeUninit::new(f32::NAN); g.out_len() + guard];
                forward_image(isa, &g, xi, &packed, &mut scratch, &mut yi[..g.out_len()]);
                // SAFETY: initialized above (and overwritten by the kernel).
                let yi: Vec<f32> = yi.iter().map(|v| unsafe { v.assume_init() }).collect();
                assert!(
                    yi[g.out_len()..].iter().all(|v| v.is_nan()),
                    "{isa:?} {g:?}: a store past the image"
                );
                y.extend_from_slice(&yi[..g.out_len()]);
            }
            assert_eq!(bits(&y), want, "{isa:?} {g:?}");
        }
    }
}

#[test]
fn every_instruction_set_gives_the_reference_weight_gradient_bits() {
    let geometries = [
        geometry(3, 3, 5, 16, 16, 3),  // odd output channels
        geometry(3, 2, 3, 16, 16, 3),  // a partial vector of output channels
        geometry(17, 2, 4, 16, 18, 3), // past a chunk of 16
        geometry(5, 16, 16, 32, 32, 3),
        geometry(17, 16, 32, 8, 8, 3), // 8×8, transposed in blocks, past a chunk
        geometry(2, 7, 20, 3, 5, 3),   // small and odd: the input channels in runs of 3, 2, 2
        strided(3, 16, 32, 32, 32),    // phase planes: a ResNet's first downsampling
        strided(17, 3, 5, 32, 34),     // odd output channels, past a chunk
    ];
    for g in geometries {
        assert!(
            handles_weight_gradient(&g) || Isa::chosen().is_none(),
            "{g:?}"
        );
        let x = values(g.batch * g.in_len(), 3);
        let dy = values(g.batch * g.out_len(), 4);
        let want = bits(&if g.stride == 1 {
            reference_chains(&g, &x, &dy, 16)
        } else {
            reference_lane_sums(&g, &x, &dy, 16)
        });
        for isa in tested_isas() {
            assert_eq!(
                bits(&weight_gradient(
                    isa,
                    &g,
                    &x,
                    &OutputGradient::Given(&dy),
                    16
                )),
                want,
                "{isa:?} {g:?}"
            );
            if g.stride == 2 {
                // Whatever the L2 makes of the groups, lane sums parked between them keep the
                // order.
                for group in [1, 2, 3, 16] {
                    let got = lane_sums_in_groups(isa, &g, &x, &dy, 16, group);
                    assert_eq!(bits(&got), want, "{isa:?} {g:?}, groups of {group}");
                }
            }
        }
    }
}

#[test]
fn lanes_fold_in_halves() {
    let lanes: [f32; LANES] = std::array::from_fn(|l| (l + 1) as f32);
    assert_eq!(fold_lanes(&lanes), 136.0);
    // 1 + 1e8 loses the 1 unless folded with its partner first: lanes 0 and 8 meet first.
    let mut lanes = [0.0f32; LANES];
    lanes[0] = 1.0;
    lanes[8] = 1.0;
    lanes[1] = 1e8;
    lanes[9] = -1e8;
    assert_eq!(fold_lanes(&lanes), 2.0);
}

#[test]
fn the_instruction_sets_tested_are_the_ones_the_cpu_has() {
    #[cfg(target_arch = "x86_64")]
    let (avx2, avx512) = (
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl"),
    );
    #[cfg(not(target_arch = "x86_64"))]
    let (avx2, avx512) = (false, false);
    let available = Isa::available();
    assert_eq!(available.contains(&Isa(Kind::Avx2)), avx2);
    assert_eq!(available.contains(&Isa(Kind::Avx512)), avx512);
    // The chosen one (if any) is among them.
    assert!(Isa::chosen().is_none_or(|isa| available.contains(&isa)));
}

/// The input gradient of a stride-2 convolution in the phase planes' order: per element, output
/// channels, then the taps of the element's phase in row-major order, one fused multiply-add
/// each from zero; then `plus` added.
fn reference_phase_input_gradient(
    g: &ConvGeometry,
    dy: &[f32],
    w: &[f32],
    plus: Option<&[f32]>,
) -> Vec<f32> {
    let (oh, ow, cin) = (g.out_height(), g.out_width(), g.in_channels);
    let mut dx = vec![0.0; g.batch * g.in_len()];
    for n in 0..g.batch {
        for c in 0..cin {
            for r in 0..g.height {
                for col in 0..g.width {
                    let mut acc = 0.0f32;
                    for o in 0..g.out_channels {
                        for t in 0..9 {
                            let (ki, kj) = (t / 3, t % 3);
                            // Tap (ki, kj) of output (a, b) reads pixel (2a + ki − 1, 2b + kj − 1).
                            let (a2, b2) = (r + 1, col + 1);
                            if a2 < ki || b2 < kj || (a2 - ki) % 2 != 0 || (b2 - kj) % 2 != 0 {
                                continue;
                            }
                            let (a, b) = ((a2 - ki) / 2, (b2 - kj) / 2);
                            let v = if a < oh && b < ow {
                                dy[((n * g.out_channels + o) * oh + a) * ow + b]
                            } else {
                                0.0
                            };
                            acc = v.mul_add(w[(o * cin + c) * 9 + t], acc);
                        }
                    }
                    let at = ((n * cin + c) * g.height + r) * g.width + col;
                    dx[at] = plus.map_or(acc, |p| acc + p[at]);
                }
            }
        }
    }
    dx
}

#[test]
fn every_instruction_set_gives_the_reference_phase_input_gradient_bits() {
    let geometries = [
        strided(2, 3, 9, 32, 32), // 16-wide rows
        strided(2, 16, 32, 32, 32),
        strided(2, 5, 6, 16, 16), // 8-wide rows: masked on AVX-512
        strided(3, 2, 3, 6, 10),  // the grid on AVX2
        strided(1, 1, 1, 2, 2),
    ];
    for g in geometries {
        assert!(phases::handles(&g));
        let dy = values(g.batch * g.out_len(), 5);
        let w = values(g.out_channels * g.in_channels * 9, 6);
        let other = values(g.batch * g.in_len(), 7);
        for plus in [None, Some(&other[..])] {
            let want = bits(&reference_phase_input_gradient(&g, &dy, &w, plus));
            for isa in tested_isas() {
                let weights = PhaseWeights::new(&g, &w);
                let mut scratch = PhaseScratch::new(&g);
                let mut dx = Vec::with_capacity(g.batch * g.in_len());
                for (n, dyi) in dy.chunks(g.out_len()).enumerate() {
                    let guard = 64;
                    let mut dxi = vec![MaybeUninit::new(f32::NAN); g.in_len() + guard];
                    let p = plus.map(|p| &p[n * g.in_len()..][..g.in_len()]);
                    let image = &mut dxi[..g.in_len()];
                    input_gradient_image(isa, &g, dyi, &weights, &mut scratch, p, image);
                    // SAFETY: initialized above (and overwritten by the kernel).
                    let dxi: Vec<f32> = dxi.iter().map(|v| unsafe { v.assume_init() }).collect();
                    assert!(
                        dxi[g.in_len()..].iter().all(|v| v.is_nan()),
                        "{isa:?} {g:?}: a store past the image"
                    );
                    dx.extend_from_slice(&dxi[..g.in_len()]);
                }
                assert_eq!(bits(&dx), want, "{isa:?} {g:?}, plus: {}", plus.is_some());
            }
        }
    }
}

/// The backward pass in one sweep gives the bits of its two halves computed apart: the input
/// gradient of the forward kernel on the flipped weights (plus the other gradient, added after),
/// and the weight gradient, whatever the groups.
#[test]
fn one_sweep_backward_gives_the_bits_of_its_halves() {
    let geometries = [
        geometry(3, 3, 5, 16, 16, 3),  // odd output channels
        geometry(17, 2, 4, 16, 18, 3), // past a chunk of 16
        geometry(5, 16, 16, 32, 32, 3),
        geometry(3, 16, 16, 8, 8, 3), // AVX-512: the input gradient on pairs of rows
    ];
    for g in geometries {
        assert!(handles_backward(&g) || Isa::chosen().is_none(), "{g:?}");
        let x = values(g.batch * g.in_len(), 3);
        let w = values(g.out_channels * g.in_channels * 9, 8);
        let dy = values(g.batch * g.out_len(), 4);
        let other = values(g.batch * g.in_len(), 9);
        let want_dw = bits(&reference_chains(&g, &x, &dy, 16));
        // The adjoint: in and out swapped, weights flipped in space.
        let adjoint = ConvGeometry {
            in_channels: g.out_channels,
            out_channels: g.in_channels,
            ..g
        };
        let mut flipped = vec![0.0; w.len()];
        for o in 0..g.out_channels {
            for c in 0..g.in_channels {
                for t in 0..9 {
                    flipped[(c * g.out_channels + o) * 9 + t] =
                        w[(o * g.in_channels + c) * 9 + 8 - t];
                }
            }
        }
        let dx = reference_forward(&adjoint, &dy, &flipped);
        for plus in [None, Some(&other[..])] {
            let want_dx: Vec<f32> = match plus {
                None => dx.clone(),
                Some(p) => dx.iter().zip(p).map(|(a, b)| a + b).collect(),
            };
            for isa in tested_isas() {
                let dy = OutputGradient::Given(&dy);
                let (dx, dw) = backward(isa, &g, &x, &w, &dy, plus, 16);
                let what = format!("{isa:?} {g:?}, plus {}", plus.is_some());
                assert_eq!(bits(&dx), bits(&want_dx), "dx, {what}");
                assert_eq!(bits(&dw), want_dw, "dW, {what}");
            }
        }
    }
}
