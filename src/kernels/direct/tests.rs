//! The direct kernel against scalar references that spell out its summation order (see the
//! module documentation): every instruction set this CPU has must give the same bits.

use super::*;

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

/// Padded-plane value at grid position `pos` plus tap offset `(ki, kj)`, zero past the last
/// row. The kernel reads the zero slack there (last channel) or the next plane's zero top row
/// (the overrun is less than a vector, within that row when the plane is at least 16 wide);
/// either way those reads meet a zero output gradient (grid tail), so only the zero matters.
fn padded_at(
    g: &ConvGeometry,
    l: &Layout,
    x: &[f32],
    c: usize,
    pos: usize,
    ki: usize,
    kj: usize,
) -> f32 {
    let at = pos + ki * l.row + kj;
    let (r, col) = (at / l.row, at % l.row);
    if r >= g.height + 2 * g.padding {
        0.0
    } else {
        padded_pixel(g, x, c, r, col)
    }
}

/// The forward order: per output, one fused multiply-add per term from zero, channels then taps.
fn reference_forward(g: &ConvGeometry, x: &[f32], w: &[f32]) -> Vec<f32> {
    let k = g.kernel;
    let mut y = vec![0.0; g.batch * g.out_len()];
    for n in 0..g.batch {
        let xn = &x[n * g.in_len()..][..g.in_len()];
        for o in 0..g.out_channels {
            for r in 0..g.height {
                for col in 0..g.width {
                    let mut acc = 0.0f32;
                    for c in 0..g.in_channels {
                        for t in 0..k * k {
                            let v = padded_pixel(g, xn, c, r + t / k, col + t % k);
                            acc = v.mul_add(w[(o * g.in_channels + c) * k * k + t], acc);
                        }
                    }
                    y[((n * g.out_channels + o) * g.height + r) * g.width + col] = acc;
                }
            }
        }
    }
    y
}

/// The weight-gradient order: per chunk, sixteen lane sums over (image, grid position) with
/// fused multiply-adds, folded in halves; chunks added in order.
fn reference_weight_gradient(g: &ConvGeometry, x: &[f32], dy: &[f32], chunk: usize) -> Vec<f32> {
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
                            let d = if r < g.height && col < g.width {
                                dy[((n * g.out_channels + o) * g.height + r) * g.width + col]
                            } else {
                                0.0
                            };
                            let v = padded_at(g, &l, xn, c, pos, t / 3, t % 3);
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
    ];
    // On each instruction set these take both ways of laying out the tile's vectors.
    let layouts: Vec<Positions> = geometries.iter().map(|g| Kind::Avx2.positions(g)).collect();
    assert!(layouts.contains(&Positions::Rows) && layouts.contains(&Positions::Grid));
    let layouts: Vec<Positions> = geometries
        .iter()
        .map(|g| Kind::Avx512.positions(g))
        .collect();
    assert!(layouts.contains(&Positions::Rows) && layouts.contains(&Positions::Masked));
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
        geometry(3, 2, 3, 16, 16, 3),  // AVX2: a pair of tiles reading the zero padding channel
        geometry(17, 2, 4, 16, 18, 3), // past a chunk of 16
        geometry(5, 16, 16, 32, 32, 3),
    ];
    for g in geometries {
        let x = values(g.batch * g.in_len(), 3);
        let dy = values(g.batch * g.out_len(), 4);
        let want = bits(&reference_weight_gradient(&g, &x, &dy, 16));
        for isa in tested_isas() {
            assert_eq!(
                bits(&weight_gradient(isa, &g, &x, &dy, 16)),
                want,
                "{isa:?} {g:?}"
            );
            // Whatever the L2 makes of the groups, lane sums parked between them keep the order.
            for group in [1, 2, 3, 16] {
                let got = weight_gradient_in_groups(isa, &g, &x, &dy, 16, group);
                assert_eq!(bits(&got), want, "{isa:?} {g:?}, groups of {group}");
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
