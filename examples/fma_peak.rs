//! The ceiling for the convolution kernels on this CPU: fused multiply-adds per second on 256-bit
//! vectors (AVX2 + FMA) and, where the CPU has AVX-512 F, on 512-bit vectors, with twelve
//! independent accumulator chains per thread (enough to cover the FMA latency on every x86 core
//! measured so far), on 1 thread and on `threads` threads. Compare a kernel's GFLOP/s
//! (`examples/kernel_times`) against it.
//!
//! `cargo run --release --example fma_peak -- [threads]`

use std::time::Instant;

/// FMAs per accumulator per call.
const ROUNDS: u64 = 100_000_000;
const CHAINS: usize = 12;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn chains() -> f32 {
    use std::arch::x86_64::*;
    let mut acc: [__m256; CHAINS] = std::array::from_fn(|i| _mm256_set1_ps(i as f32 * 1e-3));
    let (b, c) = (_mm256_set1_ps(0.999), _mm256_set1_ps(1e-4));
    for _ in 0..ROUNDS {
        for a in acc.iter_mut() {
            *a = _mm256_fmadd_ps(*a, b, c);
        }
    }
    // Every lane of every chain is observed, so none of the work can be dropped.
    let acc = std::hint::black_box(acc);
    let mut lanes = [0.0f32; 8];
    acc.iter().fold(0.0, |sum, a| {
        // SAFETY: `lanes` holds one vector.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *a) };
        sum + lanes.iter().sum::<f32>()
    })
}

/// [`chains`] on 512-bit vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn chains512() -> f32 {
    use std::arch::x86_64::*;
    let mut acc: [__m512; CHAINS] = std::array::from_fn(|i| _mm512_set1_ps(i as f32 * 1e-3));
    let (b, c) = (_mm512_set1_ps(0.999), _mm512_set1_ps(1e-4));
    for _ in 0..ROUNDS {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, b, c);
        }
    }
    let acc = std::hint::black_box(acc);
    acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
}

/// GFLOP/s of `threads` threads each running the chains once (2 FLOPs per lane per FMA), on
/// `lanes`-wide vectors (8 or 16).
#[cfg(target_arch = "x86_64")]
fn measure(threads: usize, lanes: usize) -> f64 {
    let start = Instant::now();
    let sums: Vec<f32> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            // SAFETY: checked for AVX2 and FMA (and AVX-512 F before 16 lanes) in `main`.
            .map(|_| {
                scope.spawn(move || unsafe { if lanes == 16 { chains512() } else { chains() } })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("an FMA thread panicked"))
            .collect()
    });
    std::hint::black_box(sums);
    let flops = threads as f64 * ROUNDS as f64 * CHAINS as f64 * 2.0 * lanes as f64;
    flops / start.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let threads = std::env::args()
        .nth(1)
        .map(|a| a.parse::<usize>().expect("threads: a number"))
        .unwrap_or(2);
    #[cfg(target_arch = "x86_64")]
    {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"))
        {
            eprintln!("this CPU has no AVX2 + FMA");
            std::process::exit(1);
        }
        println!("{}", splitaux::kernels::cpu::describe());
        let mut counts = vec![1];
        if threads > 1 {
            counts.push(threads);
        }
        let mut widths = vec![8];
        if std::arch::is_x86_feature_detected!("avx512f") {
            widths.push(16);
        }
        for lanes in widths {
            for &n in &counts {
                // The fastest of three: on a shared VM the others are disturbed.
                let best = (0..3).map(|_| measure(n, lanes)).fold(0.0, f64::max);
                let bits = lanes * 32;
                println!("{n} thread(s): {best:.1} GFLOP/s ({bits}-bit FMA, fastest of 3)");
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        eprintln!("fma_peak measures x86-64 AVX2 + FMA only");
        std::process::exit(1);
    }
}
