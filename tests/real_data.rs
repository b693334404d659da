//! Tests on the real CIFAR-10. They need `SPLITAUX_DATA` pointing at it, so they are ignored by a
//! plain `cargo test`; `.ci/run` runs them with `cargo test -- --ignored` and the variable set.
//! Without the variable they fail loudly rather than pass.

mod common;

use std::path::PathBuf;

use common::splitaux;
use predicates::prelude::*;

fn real_cifar10() -> PathBuf {
    let dir = std::env::var_os("SPLITAUX_DATA")
        .expect("set SPLITAUX_DATA to the CIFAR-10 folder to run the real-data tests");
    PathBuf::from(dir)
}

#[test]
#[ignore = "needs SPLITAUX_DATA pointing at the real CIFAR-10"]
fn real_cifar10_has_5000_train_and_1000_test_images_per_class() {
    let json = common::check_json(&real_cifar10());
    assert_eq!(json["train"], 50_000);
    assert_eq!(json["test"], 10_000);
    for class in json["classes"].as_array().unwrap() {
        assert_eq!(class["train"], 5_000, "{class}");
        assert_eq!(class["test"], 1_000, "{class}");
    }
    assert_eq!(json["classes"][3]["name"], "cat");
}

#[test]
#[ignore = "needs SPLITAUX_DATA pointing at the real CIFAR-10"]
fn short_real_run_learns_in_both_modes() {
    let out = tempfile::tempdir().unwrap();
    splitaux()
        .args(["compare", "--offline", "--json", "--data-dir"])
        .arg(real_cifar10())
        .arg("--out")
        .arg(out.path())
        .args([
            "--set",
            "model.depth=8",
            "--set",
            "data.train_limit=2000",
            "--set",
            "data.subset=balanced",
            "--set",
            "data.test_limit=1000",
            "--set",
            "train.epochs=2",
            "--set",
            "train.batch_size=64",
            "--set",
            "optim.schedule=onecycle",
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("\"coupled\""));
    for mode in ["coupled", "decoupled"] {
        let text = std::fs::read_to_string(out.path().join(format!("{mode}.json"))).unwrap();
        let report: serde_json::Value = serde_json::from_str(&text).unwrap();
        let accuracy = report["test_accuracy"].as_f64().unwrap();
        assert!(
            accuracy > 0.2,
            "{mode}: test accuracy {accuracy} is not far above chance"
        );
    }
}
