//! Shared helpers of the integration tests: generated CIFAR files in the official layouts and a
//! way to run the binary.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use assert_cmd::Command;

pub const IMAGE_BYTES: usize = 3072;

/// A small, fast pseudo-random generator (xorshift64*), so the generated files are the same on
/// every machine.
pub struct Noise(u64);

impl Noise {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// A learnable image of `class`: a per-class colour plus noise, and a bright square whose
/// position depends on the class.
pub fn image(class: usize, noise: &mut Noise) -> Vec<u8> {
    let mut pixels = vec![0u8; IMAGE_BYTES];
    let (sy, sx) = ((class * 5) % 24, (class * 11) % 24);
    for c in 0..3 {
        let base = ((class * 53 + c * 97) % 160) as u64;
        for y in 0..32 {
            for x in 0..32 {
                let inside = (sy..sy + 8).contains(&y) && (sx..sx + 8).contains(&x);
                let v = if inside {
                    250
                } else {
                    base + noise.next() % 64
                };
                pixels[c * 1024 + y * 32 + x] = v as u8;
            }
        }
    }
    pixels
}

/// Label of record `index` of a generated file (a fixed scramble, not sorted by class).
pub fn label(index: usize, classes: usize) -> usize {
    (index * 7 + index / 13) % classes
}

fn cifar10_file(records: usize, seed: u64) -> Vec<u8> {
    let mut noise = Noise::new(seed);
    let mut out = Vec::with_capacity(records * (1 + IMAGE_BYTES));
    for i in 0..records {
        let class = label(i, 10);
        out.push(class as u8);
        out.extend(image(class, &mut noise));
    }
    out
}

fn cifar100_file(records: usize, seed: u64) -> Vec<u8> {
    let mut noise = Noise::new(seed);
    let mut out = Vec::with_capacity(records * (2 + IMAGE_BYTES));
    for i in 0..records {
        let fine = label(i, 100);
        out.push((fine / 5) as u8); // coarse: 20 superclasses of 5 fine classes
        out.push(fine as u8);
        out.extend(image(fine, &mut noise));
    }
    out
}

pub const CIFAR10_TRAIN: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];

/// Writes a complete CIFAR-10 folder (official sizes: 5 × 10,000 train, 10,000 test).
pub fn write_cifar10(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    for (i, name) in CIFAR10_TRAIN.iter().enumerate() {
        fs::write(dir.join(name), cifar10_file(10_000, i as u64 + 1)).unwrap();
    }
    fs::write(dir.join("test_batch.bin"), cifar10_file(10_000, 99)).unwrap();
    let names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ];
    fs::write(dir.join("batches.meta.txt"), names.join("\n") + "\n\n").unwrap();
}

/// Writes a complete CIFAR-100 folder (50,000 train, 10,000 test, both name files).
pub fn write_cifar100(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("train.bin"), cifar100_file(50_000, 5)).unwrap();
    fs::write(dir.join("test.bin"), cifar100_file(10_000, 6)).unwrap();
    let fine: Vec<String> = (0..100).map(|i| format!("fine_{i}")).collect();
    let coarse: Vec<String> = (0..20).map(|i| format!("coarse_{i}")).collect();
    fs::write(dir.join("fine_label_names.txt"), fine.join("\n") + "\n").unwrap();
    fs::write(dir.join("coarse_label_names.txt"), coarse.join("\n") + "\n").unwrap();
}

/// A generated folder shared by all tests of one test binary, written once under cargo's
/// target tmp dir (reused across runs when complete).
fn shared(name: &str, write: fn(&Path)) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("generated-v1-{name}"));
    let done = dir.join(".complete");
    if !done.exists() {
        let staging = dir.with_extension(format!("tmp{}", std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        write(&staging);
        fs::write(staging.join(".complete"), b"").unwrap();
        let _ = fs::remove_dir_all(&dir);
        if fs::rename(&staging, &dir).is_err() {
            // Another test binary finished first; use its copy.
            let _ = fs::remove_dir_all(&staging);
        }
    }
    dir
}

pub fn cifar10() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| shared("cifar-10-batches-bin", write_cifar10))
}

pub fn cifar100() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| shared("cifar-100-binary", write_cifar100))
}

/// A fresh folder whose files link to `source`'s, so one file can be replaced cheaply.
pub fn linked_copy(source: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(source).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Replaces `name` in `dir` by `bytes`.
pub fn replace(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(name);
    let _ = fs::remove_file(&path);
    fs::write(path, bytes).unwrap();
}

/// The binary, with the environment variables it reads cleared.
pub fn splitaux() -> Command {
    let mut cmd = Command::cargo_bin("splitaux").unwrap();
    cmd.env_remove("SPLITAUX_DATA")
        .env_remove("SPLITAUX_FETCH_URL")
        .env_remove("SPLITAUX_FETCH_MD5");
    cmd
}

/// Settings for a seconds-long training run on generated data.
pub const TINY: [&str; 14] = [
    "--set",
    "model.depth=8",
    "--set",
    "data.train_limit=96",
    "--set",
    "data.test_limit=64",
    "--set",
    "train.epochs=1",
    "--set",
    "train.batch_size=32",
    "--set",
    "train.eval_batch_size=64",
    "--set",
    "train.threads=2",
];

/// Runs `command`, asserts success, and parses its standard output as JSON.
pub fn json_stdout(command: &mut Command) -> serde_json::Value {
    let assert = command.assert().success();
    serde_json::from_slice(&assert.get_output().stdout).expect("stdout is JSON")
}

/// `splitaux train --json` on the generated CIFAR-10 at the TINY scale plus `extra`, reports into
/// `out`; the parsed report.
pub fn train_json(extra: &[&str], out: &Path) -> serde_json::Value {
    json_stdout(
        splitaux()
            .args(["train", "--offline", "--json", "--data-dir"])
            .arg(cifar10())
            .arg("--out")
            .arg(out)
            .args(TINY)
            .args(extra)
            .timeout(std::time::Duration::from_secs(600)),
    )
}

/// A JSON report without what differs between two runs of the same seed: timing and memory.
pub fn deterministic_part(mut r: serde_json::Value) -> serde_json::Value {
    for key in ["wall_seconds", "peak_memory_bytes", "peak_memory"] {
        r.as_object_mut().unwrap().remove(key);
    }
    for epoch in r["epochs"].as_array_mut().unwrap() {
        for key in [
            "train_seconds",
            "data_seconds",
            "eval_seconds",
            "images_per_s",
        ] {
            epoch.as_object_mut().unwrap().remove(key);
        }
    }
    r
}

/// `splitaux data check --json` on `dir`, parsed.
pub fn check_json(dir: &Path) -> serde_json::Value {
    json_stdout(
        splitaux()
            .args(["data", "check", "--json", "--data-dir"])
            .arg(dir),
    )
}
