//! Checkpoints and `--resume` from the command line: a run killed mid-epoch (by the
//! deterministic kill switch, or by a real SIGKILL) and resumed reports exactly what the
//! uninterrupted run reports; settings that differ from the checkpoint, and damaged checkpoints,
//! give named errors; an interrupted sweep resumes its unfinished run.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{TINY, cifar10, deterministic_part, json_stdout, splitaux};
use predicates::prelude::*;
use serde_json::Value;

const KILL: &str = "SPLITAUX_KILL_AFTER_STEP";

/// `train` on the tiny generated data with `extra` settings, reports into `out`.
fn train(out: &Path, extra: &[&str]) -> assert_cmd::Command {
    let mut cmd = splitaux();
    cmd.args(["train", "--offline", "--json", "--data-dir"])
        .arg(cifar10())
        .arg("--out")
        .arg(out)
        .args(TINY)
        .args(extra);
    cmd
}

fn resume(dir: &Path, extra: &[&str]) -> assert_cmd::Command {
    let mut cmd = splitaux();
    cmd.args(["train", "--offline", "--json", "--resume"])
        .arg(dir)
        .args(extra);
    cmd
}

fn report(dir: &Path, mode: &str) -> Value {
    let text = std::fs::read_to_string(dir.join(format!("{mode}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn killed_and_resumed_runs_equal_uninterrupted_ones() {
    // (mode, clients, schedule, the step to die after: early in epoch 2)
    let cases = [
        ("coupled", "1", "sequential", "4"),
        ("decoupled", "3", "sequential", "4"),
        ("coupled", "2", "splitfed-v1", "5"),
        ("decoupled", "2", "splitfed-v2", "5"),
    ];
    for (mode, clients, schedule, kill_after) in cases {
        let settings = [
            "--mode".to_string(),
            mode.to_string(),
            "--set".into(),
            "train.epochs=3".into(),
            "--set".into(),
            format!("clients.count={clients}"),
            "--set".into(),
            format!("clients.schedule={schedule}"),
        ];
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        let case = format!("{mode}, {clients} clients, {schedule}");

        let whole = tempfile::tempdir().unwrap();
        let uninterrupted = json_stdout(&mut train(whole.path(), &settings));
        assert_eq!(uninterrupted["epochs"].as_array().unwrap().len(), 3);
        // Writing checkpoints does not change what a run computes.
        let unsaved = tempfile::tempdir().unwrap();
        let mut plain = settings.clone();
        plain.extend(["--set", "train.checkpoint_every=0"]);
        let without = json_stdout(&mut train(unsaved.path(), &plain));
        assert!(!unsaved.path().join("checkpoint.bin").exists(), "{case}");
        let mut without = deterministic_part(without);
        without["config"]["train"]["checkpoint_every"] = 1.into();
        assert_eq!(
            without,
            deterministic_part(uninterrupted.clone()),
            "{case}: checkpoints change nothing"
        );

        let cut = tempfile::tempdir().unwrap();
        let killed = train(cut.path(), &settings)
            .env(KILL, kill_after)
            .assert()
            .failure()
            .get_output()
            .clone();
        assert!(killed.stdout.is_empty(), "{case}: killed before reporting");
        assert!(cut.path().join("checkpoint.bin").exists(), "{case}");
        assert!(!cut.path().join(".checkpoint.partial").exists(), "{case}");
        assert!(!cut.path().join(format!("{mode}.json")).exists(), "{case}");

        let resumed = json_stdout(&mut resume(cut.path(), &[]));
        assert_eq!(
            deterministic_part(resumed),
            deterministic_part(uninterrupted.clone()),
            "{case}"
        );
        assert_eq!(
            deterministic_part(report(cut.path(), mode)),
            deterministic_part(uninterrupted),
            "{case}: the report file"
        );
    }
}

#[test]
fn a_real_sigkill_mid_run_loses_nothing() {
    let settings = ["--mode", "coupled", "--set", "train.epochs=6"];
    let whole = tempfile::tempdir().unwrap();
    let uninterrupted = json_stdout(&mut train(whole.path(), &settings));

    let cut = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("splitaux"))
        .args(["train", "--offline", "--json", "--data-dir"])
        .arg(cifar10())
        .arg("--out")
        .arg(cut.path())
        .args(TINY)
        .args(settings)
        .env_remove("SPLITAUX_DATA")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it as soon as its first checkpoint is on disk (within a minute).
    let checkpoint = cut.path().join("checkpoint.bin");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !checkpoint.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(checkpoint.exists(), "no checkpoint within a minute");
    assert!(
        !status.success(),
        "the run finished before it could be killed"
    );
    assert!(!cut.path().join("coupled.json").exists());

    let resumed = json_stdout(&mut resume(cut.path(), &[]));
    assert_eq!(
        deterministic_part(resumed),
        deterministic_part(uninterrupted)
    );
}

#[test]
fn resume_refuses_other_settings_and_damaged_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    train(dir.path(), &["--set", "train.epochs=2"])
        .env(KILL, "4")
        .assert()
        .failure();
    let path = dir.path().join("checkpoint.bin");
    assert!(path.exists());

    // Other settings are named; restating the recorded ones (or the thread count) is fine.
    resume(dir.path(), &["--set", "train.epochs=5"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("train.epochs"));
    resume(
        dir.path(),
        &["--set", "optim.lr=0.5", "--set", "model.depth=14"],
    )
    .assert()
    .failure()
    .stderr(predicate::str::contains("model.depth, optim.lr"));
    resume(dir.path(), &["--mode", "coupled"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("train.mode"));

    // Damaged checkpoints: one line naming the file, exit 1, never a panic.
    let good = std::fs::read(&path).unwrap();
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 1;
    for (bytes, what) in [
        (&good[..good.len() - 100], "truncated"),
        (&flipped[..], "corrupt"),
        (&b"garbage"[..], "not a splitaux checkpoint"),
    ] {
        std::fs::write(&path, bytes).unwrap();
        resume(dir.path(), &[])
            .assert()
            .code(1)
            .stderr(predicate::str::contains(what))
            .stderr(predicate::str::contains("checkpoint.bin"))
            .stderr(predicate::str::contains("panicked").not());
    }
    let mut other_version = good.clone();
    other_version[12..16].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&path, &other_version).unwrap();
    resume(dir.path(), &[])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("format version 99"));

    // The whole checkpoint again: the run finishes, and resuming it again just reports.
    std::fs::write(&path, &good).unwrap();
    let finished = json_stdout(&mut resume(dir.path(), &["--set", "train.threads=1"]));
    assert_eq!(finished["epochs"].as_array().unwrap().len(), 2);
    let again = json_stdout(&mut resume(dir.path(), &[]));
    assert_eq!(again, finished);

    resume(&dir.path().join("nothing-here"), &[])
        .assert()
        .failure()
        .stderr(predicate::str::contains("nothing-here"));
    let empty = tempfile::tempdir().unwrap();
    resume(empty.path(), &[])
        .assert()
        .failure()
        .stderr(predicate::str::contains("nothing to resume"));
}

#[test]
fn compare_resumes_the_mode_it_was_killed_in() {
    let whole = tempfile::tempdir().unwrap();
    let compare = |out: &Path| {
        let mut cmd = splitaux();
        cmd.args(["compare", "--offline", "--json", "--data-dir"])
            .arg(cifar10())
            .arg("--out")
            .arg(out)
            .args(TINY)
            .args(["--set", "train.epochs=2"]);
        cmd
    };
    let uninterrupted = json_stdout(&mut compare(whole.path()));

    // 2 epochs of 3 steps: coupled (run first) dies in its second epoch; decoupled never starts.
    let cut = tempfile::tempdir().unwrap();
    compare(cut.path()).env(KILL, "4").assert().failure();
    assert!(!cut.path().join("coupled.json").exists());
    assert!(cut.path().join("coupled/checkpoint.bin").exists());
    let mut resumed = splitaux();
    resumed
        .args(["compare", "--offline", "--json", "--resume"])
        .arg(cut.path());
    let resumed = json_stdout(&mut resumed);
    for mode in ["coupled", "decoupled"] {
        assert_eq!(
            deterministic_part(resumed[mode].clone()),
            deterministic_part(uninterrupted[mode].clone()),
            "{mode}"
        );
    }
}

#[test]
fn an_interrupted_sweep_resumes_its_unfinished_run_from_its_checkpoint() {
    let sweep = |out: &Path| {
        let mut cmd = splitaux();
        cmd.args(["sweep", "--offline", "--data-dir"])
            .arg(cifar10())
            .arg("--out")
            .arg(out)
            .args(["--grid", "train.mode=coupled,decoupled"])
            .args(TINY)
            .args(["--set", "train.epochs=2"]);
        cmd
    };
    let whole = tempfile::tempdir().unwrap();
    sweep(whole.path()).assert().success();

    // The first run dies in its second epoch: its checkpoint stays, nothing is recorded.
    let cut = tempfile::tempdir().unwrap();
    sweep(cut.path()).env(KILL, "4").assert().failure();
    let checkpoints: Vec<_> = std::fs::read_dir(cut.path().join("checkpoints"))
        .unwrap()
        .collect();
    assert_eq!(checkpoints.len(), 1);
    sweep(cut.path())
        .assert()
        .success()
        .stderr(predicate::str::contains("resuming coupled after epoch 1"));
    // Finished runs leave no checkpoints behind.
    assert_eq!(
        std::fs::read_dir(cut.path().join("checkpoints"))
            .unwrap()
            .count(),
        0
    );

    let runs = |dir: &Path| -> Vec<Value> {
        let text = std::fs::read_to_string(dir.join("runs.jsonl")).unwrap();
        let mut runs: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .map(|mut r| {
                r["report"] = deterministic_part(r["report"].take());
                r
            })
            .collect();
        runs.sort_by_key(|r| r["id"].to_string());
        runs
    };
    assert_eq!(runs(cut.path()), runs(whole.path()));
}
