//! `splitaux sweep`, `table` and `plot`: resume, interruption, failures, aggregation and figures.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{cifar10, splitaux};
use predicates::prelude::*;
use serde_json::{Value, json};

/// Tiny-run settings as a sweep base file.
fn base_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("base.toml");
    std::fs::write(
        &path,
        "[data]\ntrain_limit = 64\ntest_limit = 32\n[model]\ndepth = 8\n[train]\nepochs = 1\nbatch_size = 32\neval_batch_size = 32\nthreads = 2\n",
    )
    .unwrap();
    path
}

fn lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'), "no torn last line");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect()
}

fn sweep(dir: &Path, extra: &[&str]) -> assert_cmd::assert::Assert {
    splitaux()
        .args(["sweep", "--offline", "--config"])
        .arg(base_file(dir))
        .arg("--out")
        .arg(dir.join("out"))
        .arg("--data-dir")
        .arg(cifar10())
        .args(extra)
        .assert()
}

#[test]
fn sweep_records_each_run_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    sweep(dir.path(), &["--grid", "train.mode=coupled,decoupled"]).success();
    let log = dir.path().join("out/runs.jsonl");
    let records = lines(&log);
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["id"], "train.mode=coupled,seed=0");
    assert_eq!(records[1]["report"]["mode"], "decoupled");
    assert_eq!(records[1]["status"], "completed");
    assert!(records[0]["report"]["epochs"][0]["test_accuracy"].is_number());
    assert!(
        dir.path()
            .join("out/reports/train.mode=coupled_seed=0.json")
            .is_file()
    );
    // Same sweep again: nothing runs.
    sweep(
        dir.path(),
        &["--grid", "train.mode=coupled,decoupled", "--json"],
    )
    .success()
    .stdout(
        predicate::str::contains("\"skipped\":2").and(predicate::str::contains("\"completed\":0")),
    )
    .stderr(predicate::str::contains("2 of 2 runs already in"));
    assert_eq!(lines(&log).len(), 2);
    // A second seed adds only the new combinations.
    sweep(
        dir.path(),
        &[
            "--grid",
            "train.mode=coupled,decoupled",
            "--seeds",
            "2",
            "--quiet",
        ],
    )
    .success();
    let ids: Vec<String> = lines(&log)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 4);
    assert_eq!(ids[3], "train.mode=decoupled,seed=1");
}

#[test]
fn failing_run_is_recorded_and_the_sweep_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    sweep(dir.path(), &["--grid", "model.cut=40,0", "--quiet"])
        .failure()
        .code(3)
        .stderr(predicate::str::contains("1 of 2 runs failed"));
    let records = lines(&dir.path().join("out/runs.jsonl"));
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["status"], "failed");
    assert!(
        records[0]["error"]
            .as_str()
            .unwrap()
            .contains("residual blocks")
    );
    assert!(records[0]["report"].is_null());
    assert_eq!(records[1]["status"], "completed");
}

#[test]
fn killed_sweep_leaves_valid_log_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("out/runs.jsonl");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("splitaux"))
        .args([
            "sweep",
            "--offline",
            "--quiet",
            "--grid",
            "train.seed=0,1,2,3,4,5",
            "--config",
        ])
        .arg(base_file(dir.path()))
        .arg("--out")
        .arg(dir.path().join("out"))
        .arg("--data-dir")
        .arg(cifar10())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::fs::read_to_string(&log).map_or(0, |t| t.lines().count()) < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "first run never finished"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let survived = lines(&log).len();
    assert!((1..6).contains(&survived), "{survived}");
    sweep(dir.path(), &["--quiet", "--grid", "train.seed=0,1,2,3,4,5"]).success();
    let mut ids: Vec<String> = lines(&log)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 6);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "each combination exactly once");
}

/// A hand-written run record with the fields the table and plots read.
fn record(
    mode: &str,
    cut: &str,
    seed: u64,
    accuracy: [f64; 2],
    bytes_per_epoch: u64,
    peak: u64,
) -> String {
    let epoch = |e: usize| {
        json!({"epoch": e + 1, "lr": 0.1, "server_loss": 1.0, "test_accuracy": accuracy[e],
               "bytes": {"activations": bytes_per_epoch, "labels": 0, "gradients": 0, "up": bytes_per_epoch,
                         "down": 0, "total": bytes_per_epoch, "messages": 1},
               "train_seconds": 10.0, "data_seconds": 0.1, "eval_seconds": 1.0, "images_per_s": 100.0})
    };
    let bytes = |n: u64| json!({"activations": n, "labels": 0, "gradients": 0, "up": n, "down": 0, "total": n, "messages": 1});
    json!({
        "id": format!("model.cut={cut},train.mode={mode},seed={seed}"),
        "axes": [["model.cut", cut], ["train.mode", mode]],
        "seed": seed,
        "status": "completed",
        "error": null,
        "report": {
            "splitaux_version": "test", "mode": mode, "status": "completed", "dataset": "cifar10",
            "train_images": 10, "test_images": 10,
            "cut": {"blocks": 3, "total_blocks": 9, "activation_shape": [16, 32, 32]},
            "parameters": {"client": 1, "aux_head": 1, "server": 1},
            "test_accuracy": accuracy[1],
            "epochs": [epoch(0), epoch(1)],
            "bytes": bytes(2 * bytes_per_epoch), "bytes_per_epoch": bytes(bytes_per_epoch),
            "peak_memory_bytes": peak,
            "wall_seconds": 30.0,
            "config": {"model": {"cut": cut}, "train": {"mode": mode, "seed": seed}}
        }
    })
    .to_string()
}

fn hand_written(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("runs.jsonl");
    let mib = 1 << 20;
    let text = [
        record("coupled", "shallow", 0, [0.3, 0.50], 200 * mib, 300 * mib),
        record("coupled", "shallow", 1, [0.3, 0.60], 200 * mib, 300 * mib),
        record("decoupled", "shallow", 0, [0.2, 0.40], 100 * mib, 150 * mib),
        record("decoupled", "shallow", 1, [0.2, 0.50], 100 * mib, 150 * mib),
        record("decoupled", "shallow", 2, [0.2, 0.60], 100 * mib, 150 * mib),
        record("coupled", "middle", 0, [0.3, 0.70], 100 * mib, 200 * mib),
    ]
    .join("\n")
        + "\n";
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn table_aggregates_mean_std_n() {
    let dir = tempfile::tempdir().unwrap();
    let runs = hand_written(dir.path());
    let out = splitaux()
        .arg("table")
        .arg(&runs)
        .args(["--format", "json"])
        .assert()
        .success();
    let table: Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    let cell = |row: &str, col: &str, metric: &str| {
        table["cells"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["row"] == row && c["col"] == col && c["metric"] == metric)
            .cloned()
            .unwrap()
    };
    let c = cell("shallow", "coupled", "test_accuracy");
    assert!((c["mean"].as_f64().unwrap() - 0.55).abs() < 1e-12);
    assert!((c["std"].as_f64().unwrap() - 0.070_710_678).abs() < 1e-6);
    assert_eq!(c["n"], 2);
    let d = cell("shallow", "decoupled", "test_accuracy");
    assert!((d["mean"].as_f64().unwrap() - 0.5).abs() < 1e-12);
    assert!((d["std"].as_f64().unwrap() - 0.1).abs() < 1e-12);
    assert_eq!(d["n"], 3);
    assert_eq!(cell("middle", "coupled", "peak_memory")["n"], 1);
    let ratio = table["ratios"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["row"] == "shallow" && r["metric"] == "bytes_per_epoch")
        .unwrap()["decoupled_over_coupled"]
        .as_f64()
        .unwrap();
    assert!((ratio - 0.5).abs() < 1e-12);

    splitaux()
        .arg("table")
        .arg(&runs)
        .assert()
        .success()
        .stdout(
            predicate::str::contains("| model.cut | metric | train.mode = coupled | train.mode = decoupled | decoupled/coupled |")
                .and(predicate::str::contains("| shallow | test accuracy | 55.00 % ± 7.07 % (n=2) | 50.00 % ± 10.00 % (n=3) |  |"))
                .and(predicate::str::contains("| shallow | peak memory | 300.0 MiB ± 0 B (n=2) | 150.0 MiB ± 0 B (n=3) | 0.50 |")),
        );
    splitaux()
        .arg("table")
        .arg(&runs)
        .args(["--format", "csv", "--metric", "test-accuracy"])
        .assert()
        .success()
        .stdout(predicate::str::starts_with(
            "model.cut,train.mode,metric,mean,std,n\nshallow,coupled,test_accuracy,0.55",
        ));
}

#[test]
fn plot_writes_valid_svgs_with_the_series() {
    let dir = tempfile::tempdir().unwrap();
    let runs = hand_written(dir.path());
    let out = dir.path().join("plots");
    splitaux()
        .arg("plot")
        .arg(&runs)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    for name in [
        "accuracy_vs_epoch.svg",
        "accuracy_vs_bytes.svg",
        "peak_memory.svg",
        "seconds_per_epoch.svg",
    ] {
        let svg = std::fs::read_to_string(out.join(name)).unwrap();
        assert!(
            svg.trim_start().starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{name}"
        );
        assert_eq!(svg.matches("<svg").count(), svg.matches("</svg>").count());
        assert!(
            svg.contains("coupled") && svg.contains("decoupled"),
            "{name} legend"
        );
    }
    let epochs = std::fs::read_to_string(out.join("accuracy_vs_epoch.svg")).unwrap();
    assert!(epochs.contains("decoupled, cut shallow") && epochs.contains("coupled, cut middle"));
    assert!(epochs.contains("test accuracy (%)") && epochs.contains("\nepoch\n"));
    assert!(
        epochs.matches("<polyline").count() >= 3,
        "one line per series"
    );
    let memory = std::fs::read_to_string(out.join("peak_memory.svg")).unwrap();
    assert!(memory.contains("cut shallow") && memory.contains("peak memory above baseline (MiB)"));
    assert!(memory.matches("<rect").count() >= 4);
}

#[test]
fn clients_count_is_a_table_axis_with_weight_bytes() {
    let dir = tempfile::tempdir().unwrap();
    sweep(
        dir.path(),
        &[
            "--grid",
            "clients.count=1,2",
            "--grid",
            "train.mode=coupled,decoupled",
            "--quiet",
        ],
    )
    .success();
    let log = dir.path().join("out/runs.jsonl");
    let table = splitaux()
        .arg("table")
        .arg(&log)
        .args(["--rows", "clients.count", "--cols", "train.mode"])
        .args([
            "--metric",
            "weight-bytes",
            "--metric",
            "cut-bytes",
            "--format",
            "json",
        ])
        .assert()
        .success();
    let table: Value = serde_json::from_slice(&table.get_output().stdout).unwrap();
    let cells = table["cells"].as_array().unwrap();
    let weight = |row: &str, col: &str| {
        cells
            .iter()
            .find(|c| c["row"] == row && c["col"] == col && c["metric"] == "weight_bytes")
            .unwrap_or_else(|| panic!("cell {row} × {col} in {table}"))["mean"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(weight("1", "coupled"), 0.0);
    // Two clients, one epoch: one hand-off; decoupled also hands on the auxiliary head.
    assert!(weight("2", "coupled") > 0.0);
    assert!(weight("2", "decoupled") > weight("2", "coupled"));
    splitaux()
        .arg("plot")
        .arg(&log)
        .arg("--out")
        .arg(dir.path().join("plots"))
        .assert()
        .success();
}

/// `splitaux sweep` of the tiny base file into `dir/<out>`.
fn sweep_to(dir: &Path, out: &str, extra: &[&str]) -> assert_cmd::assert::Assert {
    splitaux()
        .args(["sweep", "--offline", "--config"])
        .arg(base_file(dir))
        .arg("--out")
        .arg(dir.join(out))
        .arg("--data-dir")
        .arg(cifar10())
        .args(extra)
        .assert()
}

fn ids(log: &Path) -> Vec<String> {
    lines(log)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// `splitaux table FILES… EXTRA…`: its standard output.
fn table_of<P: AsRef<std::ffi::OsStr>>(files: &[P], extra: &[&str]) -> String {
    let out = splitaux()
        .arg("table")
        .args(files)
        .args(extra)
        .assert()
        .success();
    String::from_utf8(out.get_output().stdout.clone()).unwrap()
}

/// Every metric that is the same in two runs of one seed (all but memory and time).
const DETERMINISTIC_METRICS: [&str; 16] = [
    "--metric",
    "test-accuracy",
    "--metric",
    "aux-accuracy",
    "--metric",
    "bytes-per-epoch",
    "--metric",
    "cut-bytes",
    "--metric",
    "bytes-total",
    "--metric",
    "bytes-up",
    "--metric",
    "bytes-down",
    "--metric",
    "weight-bytes",
];

#[test]
fn shards_run_every_run_once_and_merge_into_the_unsharded_table() {
    let dir = tempfile::tempdir().unwrap();
    let grid = [
        "--grid",
        "train.mode=coupled,decoupled",
        "--grid",
        "model.cut=0,1",
        "--quiet",
        "--json",
    ];
    let summary = |out: &str, shard: Option<&str>| -> Value {
        let mut args = grid.to_vec();
        if let Some(shard) = shard {
            args.extend(["--shard", shard]);
        }
        let assert = sweep_to(dir.path(), out, &args).success();
        serde_json::from_slice(&assert.get_output().stdout).unwrap()
    };
    let whole = summary("whole", None);
    assert_eq!(whole["shard"], json!({"index": 1, "count": 1}));
    assert_eq!(
        (whole["total"].clone(), whole["grid_runs"].clone()),
        (json!(4), json!(4))
    );
    for k in [1, 2] {
        let shard = summary(&format!("shard-{k}"), Some(&format!("{k}/2")));
        assert_eq!(shard["shard"], json!({"index": k, "count": 2}));
        assert_eq!(shard["total"], 2);
        assert_eq!(shard["grid_runs"], 4);
        assert_eq!(shard["completed"], 2);
    }

    // Shard K of 2 holds the runs at positions K−1, K+1 of the canonical order: together every
    // run exactly once.
    let all = ids(&dir.path().join("whole/runs.jsonl"));
    let first = ids(&dir.path().join("shard-1/runs.jsonl"));
    let second = ids(&dir.path().join("shard-2/runs.jsonl"));
    assert_eq!(all.len(), 4);
    assert_eq!(first, [all[0].clone(), all[2].clone()]);
    assert_eq!(second, [all[1].clone(), all[3].clone()]);
    let mut together: Vec<String> = first.iter().chain(&second).cloned().collect();
    together.sort();
    let mut expected = all.clone();
    expected.sort();
    assert_eq!(together, expected);

    // Resuming a shard skips its own finished runs and runs nothing else.
    let again = summary("shard-1", Some("1/2"));
    assert_eq!(
        (again["skipped"].clone(), again["completed"].clone()),
        (json!(2), json!(0))
    );
    assert_eq!(ids(&dir.path().join("shard-1/runs.jsonl")).len(), 2);

    // The merged table of the two shards is the unsharded sweep's table (this grid's rows and
    // columns first appear in the same order either way), in every format.
    let whole_log = dir.path().join("whole/runs.jsonl");
    let shard_logs = [
        dir.path().join("shard-1/runs.jsonl"),
        dir.path().join("shard-2/runs.jsonl"),
    ];
    for format in ["json", "md", "csv"] {
        let mut extra = DETERMINISTIC_METRICS.to_vec();
        extra.extend(["--format", format]);
        let unsharded = table_of(&[&whole_log], &extra);
        let merged = table_of(&[&shard_logs[0], &shard_logs[1]], &extra);
        assert_eq!(merged, unsharded, "--format {format}");
    }
    let table: Value = serde_json::from_str(&table_of(
        &[&shard_logs[0], &shard_logs[1]],
        &["--format", "json", "--metric", "test-accuracy"],
    ))
    .unwrap();
    assert_eq!(table["rows"], json!(["0", "1"]));
    assert_eq!(table["cols"], json!(["coupled", "decoupled"]));
    assert_eq!(table["cells"].as_array().unwrap().len(), 4);
    splitaux()
        .arg("plot")
        .args(&shard_logs)
        .arg("--out")
        .arg(dir.path().join("plots"))
        .assert()
        .success();
}

#[test]
fn bad_shard_values_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["0/3", "4/3", "1/0", "x", "2"] {
        sweep_to(dir.path(), "out", &["--shard", bad])
            .failure()
            .stderr(
                predicate::str::contains(format!("'{bad}'"))
                    .and(predicate::str::contains("--shard")),
            );
    }
    assert!(!dir.path().join("out").exists(), "nothing ran");
}

#[test]
fn merged_files_give_the_table_of_their_lines_and_a_run_in_two_files_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let whole = hand_written(dir.path());
    let text = std::fs::read_to_string(&whole).unwrap();
    let records: Vec<&str> = text.lines().collect();
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    std::fs::write(&a, records[..3].join("\n") + "\n").unwrap();
    std::fs::write(&b, records[3..].join("\n") + "\n").unwrap();
    for format in ["json", "md"] {
        assert_eq!(
            table_of(&[&a, &b], &["--format", format]),
            table_of(&[&whole], &["--format", format])
        );
    }

    // The same run in two files: named with both files, with or without --allow-mixed.
    let copy = dir.path().join("copy.jsonl");
    std::fs::copy(&whole, &copy).unwrap();
    for extra in [&[][..], &["--allow-mixed"][..]] {
        splitaux()
            .arg("table")
            .arg(&whole)
            .arg(&copy)
            .args(extra)
            .assert()
            .failure()
            .stderr(
                predicate::str::contains("run `model.cut=shallow,train.mode=coupled,seed=0`")
                    .and(predicate::str::contains(whole.display().to_string()))
                    .and(predicate::str::contains(copy.display().to_string())),
            );
    }
    splitaux()
        .arg("plot")
        .arg(&whole)
        .arg(&copy)
        .arg("--out")
        .arg(dir.path().join("plots"))
        .assert()
        .failure()
        .stderr(predicate::str::contains("is in both"));
    // A file with no runs is named.
    let missing = dir.path().join("missing.jsonl");
    splitaux()
        .arg("table")
        .arg(&whole)
        .arg(&missing)
        .assert()
        .failure()
        .stderr(predicate::str::contains(format!(
            "{}: no runs recorded",
            missing.display()
        )));
}

#[test]
fn runs_of_different_versions_merge_only_with_allow_mixed() {
    let dir = tempfile::tempdir().unwrap();
    let ours = hand_written(dir.path());
    let text = std::fs::read_to_string(&ours).unwrap();
    assert!(text.contains("\"splitaux_version\":\"test\""));
    let theirs = dir.path().join("theirs.jsonl");
    std::fs::write(
        &theirs,
        text.replace(
            "\"splitaux_version\":\"test\"",
            "\"splitaux_version\":\"0.0.1\"",
        ),
    )
    .unwrap();
    splitaux()
        .arg("table")
        .arg(&ours)
        .arg(&theirs)
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("different splitaux versions")
                .and(predicate::str::contains(ours.display().to_string()))
                .and(predicate::str::contains(theirs.display().to_string()))
                .and(predicate::str::contains("--allow-mixed")),
        );
    let table: Value = serde_json::from_str(&table_of(
        &[&ours, &theirs],
        &[
            "--allow-mixed",
            "--format",
            "json",
            "--metric",
            "test-accuracy",
        ],
    ))
    .unwrap();
    let cell = table["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["row"] == "shallow" && c["col"] == "coupled")
        .cloned()
        .unwrap();
    assert_eq!(cell["n"], 4, "both files' runs: {cell}");
}

#[test]
fn sweep_set_overrides_the_base_and_mixed_bases_merge_only_with_allow_mixed() {
    let dir = tempfile::tempdir().unwrap();
    let one = ["--grid", "train.mode=coupled", "--quiet"];
    // A --set of a grid axis is refused before anything runs.
    sweep_to(
        dir.path(),
        "axis",
        &[
            "--grid",
            "train.mode=coupled,decoupled",
            "--set",
            "train.mode=coupled",
        ],
    )
    .failure()
    .stderr(
        predicate::str::contains("--set train.mode=coupled")
            .and(predicate::str::contains("grid axis")),
    );
    assert!(!dir.path().join("axis").exists());

    sweep_to(dir.path(), "default-lr", &one).success();
    let mut small = one.to_vec();
    small.extend(["--set", "optim.lr=0.05"]);
    sweep_to(dir.path(), "small-lr", &small).success();
    let default_log = dir.path().join("default-lr/runs.jsonl");
    let small_log = dir.path().join("small-lr/runs.jsonl");
    let records = lines(&small_log);
    let record = &records[0];
    assert_eq!(record["id"], "train.mode=coupled,seed=0");
    assert_eq!(record["report"]["config"]["optim"]["lr"], 0.05);
    assert_eq!(
        record["report"]["config"]["model"]["depth"], 8,
        "the file still applies"
    );
    assert_eq!(record["base"]["optim"]["lr"], 0.05);
    assert_eq!(
        record["base"]["train"]["mode"], "decoupled",
        "the base, before the grid"
    );
    assert!(record["splitaux_version"].is_string());

    // Resuming a log with another base is refused (it would skip runs of the other base).
    sweep_to(dir.path(), "default-lr", &small).failure().stderr(
        predicate::str::contains("another base configuration")
            .and(predicate::str::contains("optim.lr")),
    );
    assert_eq!(lines(&default_log).len(), 1);

    // Merging them: refused, naming the key and both files; with --allow-mixed, one run each
    // (the same id under two bases is two runs), told apart by optim.lr.
    splitaux()
        .arg("table")
        .arg(&default_log)
        .arg(&small_log)
        .assert()
        .failure()
        .stderr(
            predicate::str::contains("different base configurations")
                .and(predicate::str::contains("`optim.lr` is 0.1"))
                .and(predicate::str::contains(default_log.display().to_string()))
                .and(predicate::str::contains(small_log.display().to_string()))
                .and(predicate::str::contains("--allow-mixed")),
        );
    let table: Value = serde_json::from_str(&table_of(
        &[&default_log, &small_log],
        &[
            "--allow-mixed",
            "--rows",
            "optim.lr",
            "--format",
            "json",
            "--metric",
            "test-accuracy",
        ],
    ))
    .unwrap();
    assert_eq!(table["rows"], json!(["0.1", "0.05"]));
    assert_eq!(table["cells"].as_array().unwrap().len(), 2);
}
