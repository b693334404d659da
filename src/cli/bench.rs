//! `bench`: images/s and peak memory of the real training step on random inputs.

use anyhow::{Result, bail};
use clap::Args;

use splitaux::backend::BackendKind;
use splitaux::config::Mode;
use splitaux::kernels::Kernels;
use splitaux::model::{AUX_HIDDEN, AUX_LAYERS, AuxKind, CutSpec};
use splitaux::report::human_bytes;
use splitaux::run::bench::{BenchConfig, bench};

use super::parse_name;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// coupled or decoupled.
    #[arg(long, default_value = "decoupled", value_parser = parse_name::<Mode>)]
    pub mode: Mode,
    /// ResNet depth (6n+2).
    #[arg(long, default_value_t = 20)]
    pub depth: usize,
    /// Client blocks, or shallow, middle, deep.
    #[arg(long, default_value = "shallow")]
    pub cut: CutSpec,
    /// Auxiliary head: linear, mlp or cnn.
    #[arg(long, default_value = "linear", value_parser = parse_name::<AuxKind>)]
    pub aux: AuxKind,
    /// mlp head: units of each hidden layer (model.aux_hidden).
    #[arg(long, default_value_t = AUX_HIDDEN)]
    pub aux_hidden: usize,
    /// mlp head: number of hidden layers (model.aux_layers).
    #[arg(long, default_value_t = AUX_LAYERS)]
    pub aux_layers: usize,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// CPU threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// flex (CPU) or wgpu.
    #[arg(long, default_value = "flex", value_parser = parse_name::<BackendKind>)]
    pub backend: BackendKind,
    /// Convolution and BatchNorm implementation: fused or burn.
    #[arg(long, default_value = "fused", value_parser = parse_name::<Kernels>)]
    pub kernels: Kernels,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Only print the CPU the kernels see (caches, features) and the kernel path they take.
    #[arg(long)]
    pub cpu: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.cpu {
        println!("{}", splitaux::kernels::cpu::describe());
        println!("{}", splitaux::kernels::describe_blocking());
        return Ok(());
    }
    if args.batch < 2 {
        bail!(
            "--batch {}: BatchNorm needs at least 2 images per batch",
            args.batch
        );
    }
    let config = BenchConfig {
        mode: args.mode,
        depth: args.depth,
        cut: args.cut,
        aux: args.aux,
        aux_hidden: args.aux_hidden,
        aux_layers: args.aux_layers,
        batch: args.batch,
        steps: args.steps.max(1),
        warmup: args.warmup,
        threads: args.threads,
        classes: 10,
        backend: args.backend,
        kernels: args.kernels,
    };
    let result = bench(&config)?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        let mem = |b: Option<u64>| b.map_or("n/a".to_string(), human_bytes);
        println!(
            "{} ResNet-{} cut {} ({} blocks), batch {}, {} threads: {:.1} images/s ({:.3} s/step), peak step memory {} (client phase {}, server phase {}), {} across the cut per step",
            args.mode.name(),
            args.depth,
            args.cut,
            result.cut_blocks,
            args.batch,
            result.threads,
            result.images_per_s,
            result.seconds_per_step,
            mem(result.peak_memory_bytes),
            mem(result.peak_client_phase_bytes),
            mem(result.peak_server_phase_bytes),
            human_bytes(result.bytes_per_step),
        );
    }
    Ok(())
}
