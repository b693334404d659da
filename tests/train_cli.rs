//! `splitaux train` / `compare` / `bench` end to end on generated CIFAR-10: the JSON report, the
//! byte accounting, reproducibility, config errors and the divergence stop.

mod common;

use std::path::Path;

use common::{TINY, cifar10, deterministic_part, json_stdout, splitaux, train_json};
use predicates::prelude::*;
use serde_json::Value;

fn train(extra: &[&str], out: &Path) -> Value {
    train_json(extra, out)
}

/// Bytes of one encoded f32 activation/gradient message: 6-byte header, 4 dims × 4, payload.
fn tensor_message(batch: u64, shape: [u64; 3]) -> u64 {
    6 + 4 * 4 + batch * shape.iter().product::<u64>() * 4
}

#[test]
fn decoupled_report_fields_and_bytes() {
    let out = tempfile::tempdir().unwrap();
    let r = train(&["--mode", "decoupled"], out.path());
    assert_eq!(r["mode"], "decoupled");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["config"]["model"]["depth"], 8);
    assert_eq!(r["cut"]["blocks"], 1); // shallow of ResNet-8
    assert_eq!(
        r["cut"]["activation_shape"],
        serde_json::json!([16, 32, 32])
    );
    assert_eq!(r["epochs"].as_array().unwrap().len(), 1);
    let acc = r["test_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(r["aux_accuracy"].as_f64().is_some());
    // 96 images in batches of 32: three steps, each one activation and one label message.
    assert_eq!(r["bytes"]["gradients"], 0);
    assert_eq!(r["bytes"]["down"], 0);
    assert_eq!(r["bytes"]["messages"], 6);
    assert_eq!(
        r["bytes"]["activations"],
        3 * tensor_message(32, [16, 32, 32])
    );
    let labels = r["bytes"]["labels"].as_u64().unwrap();
    assert!(
        labels == 3 * (6 + 4 + 32 * 8) || labels == 3 * (6 + 4 + 32 * 4),
        "{labels}"
    );
    assert_eq!(
        r["bytes"]["total"].as_u64().unwrap(),
        r["bytes"]["activations"].as_u64().unwrap() + labels
    );
    assert!(r["peak_memory_bytes"].as_u64().unwrap() > 0);
    assert_eq!(r["peak_memory"]["source"], "host_allocator");
    assert!(r["wall_seconds"].as_f64().unwrap() > 0.0);
    assert!(r["splitaux_version"].is_string());
    // The report is also on disk.
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("decoupled.json")).unwrap())
            .unwrap();
    assert_eq!(on_disk["bytes"], r["bytes"]);
}

#[test]
fn coupled_sends_gradients_equal_to_activations() {
    let out = tempfile::tempdir().unwrap();
    let r = train(
        &["--mode", "coupled", "--set", "model.cut=middle"],
        out.path(),
    );
    assert_eq!(
        r["cut"]["activation_shape"],
        serde_json::json!([32, 16, 16])
    );
    let activations = r["bytes"]["activations"].as_u64().unwrap();
    assert_eq!(activations, 3 * tensor_message(32, [32, 16, 16]));
    assert_eq!(r["bytes"]["gradients"].as_u64().unwrap(), activations);
    assert_eq!(r["bytes"]["down"].as_u64().unwrap(), activations);
    assert!(r["aux_accuracy"].is_null());
    assert!(r["epochs"][0]["client_loss"].is_null());
}

/// Drops the fields that measure time or memory, which vary between runs.

#[test]
fn same_seed_same_report() {
    let out = tempfile::tempdir().unwrap();
    let args = [
        "--mode",
        "decoupled",
        "--set",
        "train.seed=7",
        "--set",
        "train.epochs=2",
    ];
    let a = deterministic_part(train(&args, out.path()));
    let b = deterministic_part(train(&args, out.path()));
    assert_eq!(a, b);
    let c = deterministic_part(train(
        &[
            "--mode",
            "decoupled",
            "--set",
            "train.seed=8",
            "--set",
            "train.epochs=2",
        ],
        out.path(),
    ));
    assert_ne!(a["epochs"][0]["server_loss"], c["epochs"][0]["server_loss"]);
}

#[test]
fn compare_prints_side_by_side_with_half_the_bytes() {
    let out = tempfile::tempdir().unwrap();
    splitaux()
        .args(["compare", "--offline", "--data-dir"])
        .arg(cifar10())
        .arg("--out")
        .arg(out.path())
        .args(TINY)
        .assert()
        .success()
        .stdout(
            predicate::str::contains("decoupled/coupled")
                .and(predicate::str::is_match(r"activation\+gradient bytes .* 0\.50").unwrap())
                .and(predicate::str::contains("peak memory"))
                .and(predicate::str::contains("client-phase peak")),
        );
    for name in ["coupled.json", "decoupled.json"] {
        assert!(out.path().join(name).is_file(), "{name}");
    }
}

#[test]
fn config_file_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[model]\ndepth = 20\nwidth = 3\n").unwrap();
    splitaux()
        .args(["train", "--offline", "--config"])
        .arg(&path)
        .assert()
        .failure()
        .stderr(predicate::str::contains("bad.toml").and(predicate::str::contains("model.width")));
    std::fs::write(&path, "[train]\nepochs = \"many\"\n").unwrap();
    splitaux()
        .args(["train", "--offline", "--config"])
        .arg(&path)
        .assert()
        .failure()
        .stderr(predicate::str::contains("train.epochs"));
    splitaux()
        .args(["train", "--offline", "--set", "model.cut=40"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("ResNet-20 has 9 residual blocks"));
    splitaux()
        .args(["train", "--offline", "--set", "model.depth=21"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("model.depth = 21"));
}

/// Every command that reads `--config` names the missing file and quotes the OS error once.
#[test]
fn missing_config_file_prints_the_os_error_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    // What the OS says, exactly as the binary quotes it.
    let os = std::fs::read_to_string(&path).unwrap_err().to_string();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let commands: [&[&str]; 4] = [
        &["train"],
        &["compare"],
        &["data", "partition"],
        &["sweep", "--out", out],
    ];
    for command in commands {
        let assert = splitaux()
            .args(command)
            .args(["--offline", "--config"])
            .arg(&path)
            .assert()
            .failure()
            .code(1);
        let stderr = String::from_utf8_lossy(&assert.get_output().stderr).to_string();
        assert!(stderr.starts_with("error: "), "{command:?}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{command:?}: {stderr}"
        );
        assert!(
            stderr.contains("absent.toml: cannot read: "),
            "{command:?}: {stderr}"
        );
        assert_eq!(
            stderr.matches(os.as_str()).count(),
            1,
            "{command:?}: `{os}` once in: {stderr}"
        );
    }
}

/// The auxiliary head's shape reaches the model: `mlp` 256 × 3 has the hand-counted parameters
/// at the shallow cut of ResNet-8 (16 channels), and a zero width is refused naming the key.
#[test]
fn aux_head_shape_keys_reach_the_model() {
    let out = tempfile::tempdir().unwrap();
    let r = train(
        &[
            "--mode",
            "decoupled",
            "--set",
            "model.aux=mlp",
            "--set",
            "model.aux_hidden=256",
            "--set",
            "model.aux_layers=3",
        ],
        out.path(),
    );
    // 64 → 256, 256 → 256 twice, 256 → 10, three BatchNorms of 256 (4 values a unit).
    let expected: u64 = (64 * 256 + 256) + 2 * (256 * 256 + 256) + (256 * 10 + 10) + 3 * 4 * 256;
    assert_eq!(r["parameters"]["aux_head"], expected);
    assert_eq!(r["config"]["model"]["aux_hidden"], 256);
    splitaux()
        .args(["train", "--offline", "--set", "model.aux_hidden=0"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("model.aux_hidden = 0"));
}

#[test]
fn presets_parse() {
    use splitaux::experiment::{Sweep, expand};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut checked = 0;
    for dir in [root.clone(), root.join("cpu"), root.join("paper")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with('#'),
                "{} needs a header comment",
                path.display()
            );
            // Every preset is a sweep file (a config with an optional [sweep] table).
            let sweep = Sweep::load(Some(&path), &[], None).unwrap();
            for combination in expand(&sweep.axes, sweep.seeds, 0) {
                sweep
                    .config_for(&combination)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            checked += 1;
        }
    }
    assert!(checked >= 4, "quick, cpu and two paper presets");
}

#[test]
fn diverging_run_stops_with_error_and_keeps_report() {
    let out = tempfile::tempdir().unwrap();
    splitaux()
        .args(["train", "--offline", "--data-dir"])
        .arg(cifar10())
        .arg("--out")
        .arg(out.path())
        .args(TINY)
        .args([
            "--set",
            "optim.lr=1e30",
            "--set",
            "optim.schedule=constant",
            "--set",
            "train.epochs=3",
        ])
        .assert()
        .failure()
        .stderr(
            predicate::str::is_match(
                r"error: decoupled training diverged: .* not finite at epoch \d+, step \d+",
            )
            .unwrap(),
        );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("decoupled.json")).unwrap())
            .unwrap();
    assert_eq!(report["status"], "diverged");
    assert!(report["error"].as_str().unwrap().contains("not finite"));
}

#[test]
fn bench_prints_json() {
    let r = json_stdout(splitaux().args([
        "bench", "--depth", "8", "--cut", "1", "--batch", "8", "--steps", "2", "--warmup", "1",
        "--json", "--mode", "coupled",
    ]));
    assert!(r["images_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["peak_memory_bytes"].as_u64().unwrap() > 0);
    // One activation message, one label message and one gradient message per step.
    assert!(r["bytes_per_step"].as_u64().unwrap() > 2 * tensor_message(8, [16, 32, 32]));
}

/// burn's own kernels and splitaux's run the same step: same traffic, both recorded in the JSON.
#[test]
fn bench_runs_with_either_kernel_set() {
    let run = |kernels: &str| {
        json_stdout(splitaux().args([
            "bench",
            "--depth",
            "8",
            "--cut",
            "2",
            "--batch",
            "4",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--json",
            "--kernels",
            kernels,
        ]))
    };
    let (fused, burn) = (run("fused"), run("burn"));
    assert_eq!(fused["config"]["kernels"], "fused");
    assert_eq!(burn["config"]["kernels"], "burn");
    assert_eq!(fused["bytes_per_step"], burn["bytes_per_step"]);
    splitaux()
        .args(["bench", "--kernels", "fast"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("fused").and(predicate::str::contains("burn")));
}

/// `bench --cpu` names the CPU, the kernel path and the blocking; a path forced with
/// `SPLITAUX_KERNEL_PATH` shows in both lines (portable: no direct kernel).
#[test]
fn bench_cpu_prints_the_path_and_the_blocking() {
    let output = splitaux()
        .args(["bench", "--cpu"])
        .env_remove("SPLITAUX_KERNEL_PATH")
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("cpu: ") && lines[0].contains("kernels: "),
        "{text}"
    );
    assert!(lines[1].starts_with("blocking: "), "{text}");
    let path = lines[0].rsplit("kernels: ").next().unwrap();
    if path.starts_with("portable") {
        assert!(lines[1].contains("no direct kernel"), "{text}");
    } else {
        assert!(lines[1].contains(&format!("direct {path}")), "{text}");
        assert!(lines[1].contains("weight-gradient groups"), "{text}");
    }

    splitaux()
        .args(["bench", "--cpu"])
        .env("SPLITAUX_KERNEL_PATH", "portable")
        .assert()
        .success()
        .stdout(
            predicate::str::contains("kernels: portable (forced)")
                .and(predicate::str::contains("blocking: no direct kernel")),
        );
}

#[test]
fn help_lists_commands() {
    splitaux()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("compare").and(predicate::str::contains("bench")));
    splitaux()
        .args(["train", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("--set <KEY=VALUE>"));
}
