//! `data fetch`, `data check` and `data partition`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use splitaux::data::partition::class_histograms;
use splitaux::data::{self, DatasetKind, LabelSet, fetch, locate};

use super::{ConfigSource, parse_name};

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Download an official binary tarball, verify its MD5 and extract it atomically.
    Fetch(FetchArgs),
    /// Validate a dataset and print per-split, per-class image counts.
    Check(CheckArgs),
    /// Print how the config's partition divides the training images among the clients
    /// (per client, per class).
    Partition(PartitionArgs),
}

#[derive(Debug, Args)]
pub struct PartitionArgs {
    #[command(flatten)]
    pub source: ConfigSource,
    /// Print the counts as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Which dataset: cifar10 or cifar100.
    #[arg(value_parser = parse_name::<DatasetKind>)]
    pub dataset: DatasetKind,
    /// Data root to extract into [default: $SPLITAUX_DATA, else data/].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Download from this address instead [env: SPLITAUX_FETCH_URL].
    #[arg(long)]
    pub url: Option<String>,
    /// Expect this MD5 (hex) instead of the official one [env: SPLITAUX_FETCH_MD5].
    #[arg(long)]
    pub md5: Option<String>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Which dataset: cifar10 or cifar100 [default: cifar10].
    #[arg(value_parser = parse_name::<DatasetKind>, conflicts_with = "dataset_flag")]
    pub dataset: Option<DatasetKind>,
    /// The same as the positional DATASET (the older spelling, still accepted).
    #[arg(long = "dataset", value_name = "DATASET", value_parser = parse_name::<DatasetKind>)]
    pub dataset_flag: Option<DatasetKind>,
    /// CIFAR-100 labels to count: fine (100 classes) or coarse (20).
    #[arg(long, default_value = "fine", value_parser = parse_name::<LabelSet>)]
    pub labels: LabelSet,
    /// The dataset folder or its parent [default: $SPLITAUX_DATA, else data/].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print the counts as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn fetch(args: FetchArgs) -> Result<()> {
    let root = locate::data_root(args.data_dir.as_deref(), None);
    let source = fetch::Source::resolve(args.dataset, args.url, args.md5);
    let interactive = std::io::stderr().is_terminal();
    eprintln!("fetching {} from {}", args.dataset.name(), source.url);
    let dir = fetch::fetch(args.dataset, &root, &source, interactive)?;
    println!("{} ready in {}", args.dataset.name(), dir.display());
    Ok(())
}

pub fn check(args: CheckArgs) -> Result<()> {
    let root = locate::data_root(args.data_dir.as_deref(), None);
    let dataset = args
        .dataset
        .or(args.dataset_flag)
        .unwrap_or(DatasetKind::Cifar10);
    let cifar = data::open(dataset, args.labels, &root, true, false)?;
    let classes = cifar.num_classes();
    let train = cifar.train.class_counts(classes);
    let test = cifar.test.class_counts(classes);
    if args.json {
        let per_class: Vec<_> = (0..classes)
            .map(|c| {
                serde_json::json!({"class": c, "name": cifar.class_names[c], "train": train[c], "test": test[c]})
            })
            .collect();
        let out = serde_json::json!({
            "dataset": cifar.kind.name(),
            "dir": cifar.dir,
            "train": cifar.train.len(),
            "test": cifar.test.len(),
            "classes": per_class,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} in {}: {} train and {} test images, {classes} classes, all records valid",
        cifar.kind.name(),
        cifar.dir.display(),
        cifar.train.len(),
        cifar.test.len()
    );
    let width = cifar
        .class_names
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:>5}  {:<width$}  {:>7}  {:>6}",
        "class", "name", "train", "test"
    );
    for c in 0..classes {
        println!(
            "{c:>5}  {:<width$}  {:>7}  {:>6}",
            cifar.class_names[c], train[c], test[c]
        );
    }
    Ok(())
}

pub fn partition(args: PartitionArgs) -> Result<()> {
    let config = args.source.load()?;
    let interactive = !args.json && std::io::stdout().is_terminal();
    let prepared = args.source.prepare(&config, interactive)?;
    let parts = prepared.partition(&config)?;
    let histograms = class_histograms(&prepared.train.labels, prepared.classes, &parts);
    let c = &config.clients;
    if args.json {
        let clients: Vec<_> = histograms
            .iter()
            .enumerate()
            .map(|(id, h)| {
                serde_json::json!({"id": id, "images": h.iter().sum::<usize>(), "class_histogram": h})
            })
            .collect();
        let out = serde_json::json!({
            "dataset": prepared.dataset,
            "train_images": prepared.train.len(),
            "classes": prepared.classes,
            "partition": c.partition.name(),
            "alpha": c.alpha,
            "seed": c.seed,
            "clients": clients,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} training images of {} divided among {} clients ({} partition, clients.seed = {})",
        prepared.train.len(),
        prepared.dataset,
        parts.len(),
        c.partition.name(),
        c.seed
    );
    let width = histograms
        .iter()
        .flatten()
        .map(|n| n.to_string().len())
        .max()
        .unwrap_or(1)
        .max(3);
    let mut header = format!("{:>6}  {:>6} ", "client", "images");
    for class in 0..prepared.classes {
        header.push_str(&format!(" {class:>width$}"));
    }
    println!("{header}");
    for (id, h) in histograms.iter().enumerate() {
        let mut line = format!("{id:>6}  {:>6} ", h.iter().sum::<usize>());
        for n in h {
            line.push_str(&format!(" {n:>width$}"));
        }
        println!("{line}");
    }
    Ok(())
}
