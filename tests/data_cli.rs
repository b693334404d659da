//! `splitaux data check` on generated CIFAR-10 and CIFAR-100 files, and every bad-input case of
//! the data layer: each must fail with one clear line naming the file (and record).

mod common;

use common::{cifar10, cifar100, json_stdout, linked_copy, replace, splitaux};
use predicates::prelude::*;

#[test]
fn check_counts_cifar10_per_class() {
    let json = common::check_json(cifar10());
    assert_eq!(json["train"], 50_000);
    assert_eq!(json["test"], 10_000);
    let classes = json["classes"].as_array().unwrap();
    assert_eq!(classes.len(), 10);
    assert_eq!(classes[0]["name"], "airplane");
    let train: u64 = classes.iter().map(|c| c["train"].as_u64().unwrap()).sum();
    assert_eq!(train, 50_000);
}

/// `data check cifar10` names the dataset as `data fetch cifar10` does; `--dataset cifar10`, the
/// older spelling, gives the same counts, and the two together are refused.
#[test]
fn check_takes_the_dataset_as_an_argument_like_fetch() {
    fn check(dataset: &[&str], dir: &std::path::Path) -> serde_json::Value {
        json_stdout(
            splitaux()
                .args(["data", "check"])
                .args(dataset)
                .args(["--json", "--data-dir"])
                .arg(dir),
        )
    }
    let positional = check(&["cifar10"], cifar10());
    assert_eq!(positional["dataset"], "cifar10");
    assert_eq!(positional["train"], 50_000);
    assert_eq!(check(&["--dataset", "cifar10"], cifar10()), positional);
    assert_eq!(check(&[], cifar10()), positional, "cifar10 is the default");
    let cifar100_json = check(&["cifar100"], cifar100());
    assert_eq!(cifar100_json["dataset"], "cifar100");
    assert_eq!(cifar100_json["classes"].as_array().unwrap().len(), 100);
    splitaux()
        .args(["data", "check", "cifar10", "--dataset", "cifar100"])
        .assert()
        .failure()
        .code(2)
        .stderr(predicate::str::contains("cannot be used with"));
}

#[test]
fn check_finds_dataset_below_parent_folder_and_env() {
    let parent = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(cifar10(), parent.path().join("cifar-10-batches-bin")).unwrap();
    splitaux()
        .args(["data", "check", "--data-dir"])
        .arg(parent.path())
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "50000 train and 10000 test images",
        ));
    splitaux()
        .args(["data", "check"])
        .env("SPLITAUX_DATA", parent.path())
        .assert()
        .success()
        .stdout(predicate::str::contains("automobile"));
}

#[test]
fn check_cifar100_fine_and_coarse() {
    let fine = splitaux()
        .args([
            "data",
            "check",
            "--dataset",
            "cifar100",
            "--json",
            "--data-dir",
        ])
        .arg(cifar100())
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let fine: serde_json::Value = serde_json::from_slice(&fine).unwrap();
    assert_eq!(fine["classes"].as_array().unwrap().len(), 100);
    assert_eq!(fine["train"], 50_000);
    assert_eq!(fine["classes"][7]["name"], "fine_7");
    let coarse = splitaux()
        .args([
            "data",
            "check",
            "--dataset",
            "cifar100",
            "--labels",
            "coarse",
            "--json",
            "--data-dir",
        ])
        .arg(cifar100())
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let coarse: serde_json::Value = serde_json::from_slice(&coarse).unwrap();
    let classes = coarse["classes"].as_array().unwrap();
    assert_eq!(classes.len(), 20);
    // The generated files put fine classes 5k..5k+5 in superclass k.
    let fine_sum: u64 = (15..20)
        .map(|c| fine["classes"][c]["train"].as_u64().unwrap())
        .sum();
    assert_eq!(classes[3]["train"].as_u64().unwrap(), fine_sum);
    assert!(fine_sum > 0);
    assert_eq!(classes[3]["name"], "coarse_3");
}

/// Runs `data check` on a copy of CIFAR-10 with `name` replaced, expecting failure whose message
/// contains every piece of `expected`.
fn check_fails(name: &str, bytes: Option<&[u8]>, expected: &[&str]) {
    let dir = linked_copy(cifar10());
    match bytes {
        Some(bytes) => replace(dir.path(), name, bytes),
        None => std::fs::remove_file(dir.path().join(name)).unwrap(),
    }
    let assert = splitaux()
        .args(["data", "check", "--data-dir"])
        .arg(dir.path())
        .assert()
        .failure()
        .code(1);
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).to_string();
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for piece in expected {
        assert!(stderr.contains(piece), "missing `{piece}` in: {stderr}");
    }
}

#[test]
fn missing_file_is_named() {
    check_fails(
        "data_batch_3.bin",
        None,
        &["data_batch_3.bin", "file not found"],
    );
}

#[test]
fn partial_record_is_reported() {
    let bytes = std::fs::read(cifar10().join("data_batch_2.bin")).unwrap();
    check_fails(
        "data_batch_2.bin",
        Some(&bytes[..bytes.len() - 100]),
        &[
            "data_batch_2.bin",
            "not a whole number of 3073-byte records",
        ],
    );
}

#[test]
fn wrong_record_count_is_reported() {
    let bytes = std::fs::read(cifar10().join("test_batch.bin")).unwrap();
    check_fails(
        "test_batch.bin",
        Some(&bytes[..3073 * 9_999]),
        &["test_batch.bin", "holds 9999 records, expected 10000"],
    );
}

#[test]
fn label_out_of_range_names_record() {
    let mut bytes = std::fs::read(cifar10().join("data_batch_4.bin")).unwrap();
    bytes[3073 * 17] = 12;
    check_fails(
        "data_batch_4.bin",
        Some(&bytes),
        &["data_batch_4.bin", "record 17", "label 12 is out of range"],
    );
}

#[test]
fn unreadable_file_is_reported() {
    let dir = linked_copy(cifar10());
    std::fs::remove_file(dir.path().join("data_batch_1.bin")).unwrap();
    std::fs::create_dir(dir.path().join("data_batch_1.bin")).unwrap();
    let assert = splitaux()
        .args(["data", "check", "--data-dir"])
        .arg(dir.path())
        .assert()
        .failure()
        .stderr(predicate::str::contains("data_batch_1.bin: cannot read"));
    // The OS's reason, quoted once.
    let os = std::fs::read(dir.path().join("data_batch_1.bin"))
        .unwrap_err()
        .to_string();
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).to_string();
    assert_eq!(
        stderr.matches(os.as_str()).count(),
        1,
        "`{os}` once in: {stderr}"
    );
}

#[test]
fn wrong_class_names_are_reported() {
    check_fails(
        "batches.meta.txt",
        Some(b"cat\ndog\n"),
        &["batches.meta.txt", "lists 2 class names, expected 10"],
    );
}

#[test]
fn cifar100_fine_label_out_of_range() {
    let dir = linked_copy(cifar100());
    let mut bytes = std::fs::read(cifar100().join("test.bin")).unwrap();
    bytes[3074 * 5 + 1] = 100;
    replace(dir.path(), "test.bin", &bytes);
    splitaux()
        .args(["data", "check", "--dataset", "cifar100", "--data-dir"])
        .arg(dir.path())
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "test.bin: record 5: fine label 100",
        ));
}

#[test]
fn missing_dataset_says_how_to_fetch() {
    let empty = tempfile::tempdir().unwrap();
    splitaux()
        .args(["data", "check", "--data-dir"])
        .arg(empty.path())
        .assert()
        .failure()
        .stderr(predicate::str::contains("splitaux data fetch cifar10"));
}
