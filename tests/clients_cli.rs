//! Many clients from the command line: partitions, the sequential schedule's hand-offs and their
//! bytes, the per-client report, `data partition`, and the errors of impossible settings.

mod common;

use std::path::Path;

use common::{TINY, cifar10, deterministic_part, json_stdout, splitaux, train_json};
use predicates::prelude::*;
use serde_json::Value;

fn train(extra: &[&str], out: &Path) -> Value {
    train_json(extra, out)
}

/// The report without what differs from run to run (timing, memory) or names the clients'
/// settings.
fn comparable(r: Value) -> Value {
    let mut r = deterministic_part(r);
    r.as_object_mut().unwrap().remove("config");
    r
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap()
}

#[test]
fn one_client_is_the_single_run_whatever_the_partition() {
    let out = tempfile::tempdir().unwrap();
    for mode in ["coupled", "decoupled"] {
        let single = comparable(train(
            &["--mode", mode, "--set", "train.epochs=2"],
            out.path(),
        ));
        assert_eq!(single["clients"].as_array().unwrap().len(), 1);
        assert_eq!(u(&single["clients"][0]["images"]), 96);
        assert_eq!(u(&single["bytes"]["weights"]), 0);
        assert_eq!(u(&single["bytes"]["optimizer_state"]), 0);
        for partition in ["contiguous", "dirichlet", "shards"] {
            let set = format!("clients.partition={partition}");
            let other = comparable(train(
                &["--mode", mode, "--set", "train.epochs=2", "--set", &set],
                out.path(),
            ));
            assert_eq!(single, other, "{mode}, {partition}");
        }
    }
}

#[test]
fn sequential_clients_hand_the_model_on_and_count_it() {
    let out = tempfile::tempdir().unwrap();
    let (clients, epochs) = (3u64, 2u64);
    for mode in ["coupled", "decoupled"] {
        let r = train(
            &[
                "--mode",
                mode,
                "--set",
                "clients.count=3",
                "--set",
                "clients.partition=dirichlet",
                "--set",
                "clients.alpha=1.0",
                "--set",
                "train.epochs=2",
            ],
            out.path(),
        );
        assert_eq!(r["status"], "completed");
        let per_client = r["clients"].as_array().unwrap();
        assert_eq!(per_client.len(), 3);
        let images: u64 = per_client.iter().map(|c| u(&c["images"])).sum();
        assert_eq!(images, 96);
        for c in per_client {
            let hist: u64 = c["class_histogram"].as_array().unwrap().iter().map(u).sum();
            assert_eq!(hist, u(&c["images"]));
            assert!(u(&c["images"]) >= 10, "clients.min_images");
            assert!(u(&c["bytes"]["activations"]) > 0, "every client trained");
        }
        // N·epochs − 1 hand-offs, each the same weights frame and optimizer-state frame.
        let handoffs = clients * epochs - 1;
        let bytes = &r["bytes"];
        assert_eq!(u(&bytes["weights"]) % handoffs, 0);
        assert_eq!(u(&bytes["optimizer_state"]) % handoffs, 0);
        let weights_frame = u(&bytes["weights"]) / handoffs;
        // One rank-1 f32 frame: 6-byte header + one dimension + the values.
        assert_eq!((weights_frame - 10) % 4, 0);
        let values = (weights_frame - 10) / 4;
        let params = &r["parameters"];
        let expected = u(&params["client"])
            + if mode == "decoupled" {
                u(&params["aux_head"])
            } else {
                0
            };
        assert_eq!(values, expected, "{mode}: partition (+ aux head) travels");
        assert_eq!(
            u(&bytes["total"]),
            u(&bytes["activations"])
                + u(&bytes["labels"])
                + u(&bytes["gradients"])
                + u(&bytes["weights"])
                + u(&bytes["optimizer_state"])
        );
        // Each frame is counted once overall: by its sender. Per client, a hand-off is the
        // sender's `up` and the receiver's `down`.
        let sum = |key: &str| per_client.iter().map(|c| u(&c["bytes"][key])).sum::<u64>();
        assert_eq!(sum("activations"), u(&bytes["activations"]));
        assert_eq!(sum("weights"), 2 * u(&bytes["weights"]));
        assert_eq!(sum("up"), u(&bytes["up"]));
        assert_eq!(
            sum("down"),
            u(&bytes["down"]) + u(&bytes["weights"]) + u(&bytes["optimizer_state"])
        );
        if mode == "coupled" {
            assert_eq!(u(&bytes["gradients"]), u(&bytes["activations"]));
        } else {
            assert_eq!(u(&bytes["gradients"]), 0);
        }
        // The per-epoch bytes add up to the run's.
        let epoch_weights: u64 = r["epochs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| u(&e["bytes"]["weights"]))
            .sum();
        assert_eq!(epoch_weights, u(&bytes["weights"]));
    }
}

#[test]
fn several_clients_same_seed_same_report() {
    let out = tempfile::tempdir().unwrap();
    let args = [
        "--mode",
        "coupled",
        "--set",
        "clients.count=4",
        "--set",
        "clients.partition=shards",
        "--set",
        "train.epochs=2",
    ];
    let a = comparable(train(&args, out.path()));
    let b = comparable(train(&args, out.path()));
    assert_eq!(a, b);
    let mut other = args.to_vec();
    other.extend(["--set", "clients.seed=1"]);
    let c = comparable(train(&other, out.path()));
    assert_ne!(
        a["clients"], c["clients"],
        "clients.seed redraws the partition"
    );
}

#[test]
fn partition_command_prints_per_client_class_counts() {
    let json = json_stdout(
        splitaux()
            .args(["data", "partition", "--offline", "--json", "--data-dir"])
            .arg(cifar10())
            .args([
                "--set",
                "data.train_limit=200",
                "--set",
                "clients.count=4",
                "--set",
                "clients.partition=shards",
                "--set",
                "clients.shards_per_client=1",
            ]),
    );
    let clients = json["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 4);
    assert_eq!(json["partition"], "shards");
    let total: u64 = clients.iter().map(|c| u(&c["images"])).sum();
    assert_eq!(total, 200);
    for c in clients {
        // One label-sorted shard of 50 images spans at most two classes of 20.
        let classes = c["class_histogram"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| u(n) > 0)
            .count();
        assert!(classes <= 4, "{c}");
    }
    splitaux()
        .args(["data", "partition", "--offline", "--data-dir"])
        .arg(cifar10())
        .args(["--set", "data.train_limit=100", "--set", "clients.count=2"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "100 training images of cifar10 divided among 2 clients (iid partition",
        ));
}

#[test]
fn impossible_client_settings_name_the_key_and_value() {
    let out = tempfile::tempdir().unwrap();
    for (sets, message) in [
        (vec!["clients.count=0"], "clients.count = 0"),
        (
            vec!["clients.count=97"],
            "clients.count = 97: more clients than the 96 training images",
        ),
        (
            vec![
                "clients.count=2",
                "clients.partition=dirichlet",
                "clients.alpha=0",
            ],
            "clients.alpha = 0",
        ),
        (
            vec![
                "clients.count=2",
                "clients.partition=shards",
                "clients.shards_per_client=0",
            ],
            "clients.shards_per_client = 0",
        ),
        (
            vec![
                "clients.count=5",
                "clients.partition=shards",
                "clients.shards_per_client=20",
            ],
            "clients.shards_per_client = 20",
        ),
        (
            vec!["clients.count=4", "clients.min_images=30"],
            "clients.min_images = 30",
        ),
        (vec!["clients.partition=zipf"], "clients.partition"),
        (vec!["clients.schedule=ring"], "clients.schedule"),
        (
            vec![
                "clients.count=4",
                "clients.partition=dirichlet",
                "clients.alpha=0.001",
                "clients.min_images=24",
            ],
            "no draw in 10000",
        ),
    ] {
        let mut cmd = splitaux();
        cmd.args(["train", "--offline", "--data-dir"])
            .arg(cifar10())
            .arg("--out")
            .arg(out.path())
            .args(TINY);
        for set in &sets {
            cmd.args(["--set", set]);
        }
        cmd.assert()
            .failure()
            .stderr(predicate::str::starts_with("error: ").and(predicate::str::contains(message)))
            .stderr(predicate::str::contains("panicked").not());
    }
}

/// [`comparable`] without the bytes a schedule adds (SplitFed's model transfers).
fn without_model_bytes(mut r: Value) -> Value {
    let strip = |b: &mut Value| {
        for key in ["weights", "up", "down", "total", "messages"] {
            b.as_object_mut().unwrap().remove(key);
        }
    };
    strip(&mut r["bytes"]);
    strip(&mut r["bytes_per_epoch"]);
    for epoch in r["epochs"].as_array_mut().unwrap() {
        strip(&mut epoch["bytes"]);
    }
    for client in r["clients"].as_array_mut().unwrap() {
        strip(&mut client["bytes"]);
    }
    r
}

#[test]
fn splitfed_with_one_client_is_the_single_run_for_one_epoch() {
    let out = tempfile::tempdir().unwrap();
    for mode in ["coupled", "decoupled"] {
        let single = without_model_bytes(comparable(train(&["--mode", mode], out.path())));
        for schedule in ["splitfed-v1", "splitfed-v2"] {
            let set = format!("clients.schedule={schedule}");
            let r = comparable(train(&["--mode", mode, "--set", &set], out.path()));
            assert!(
                u(&r["bytes"]["weights"]) > 0,
                "{schedule}: the model is downloaded and uploaded"
            );
            assert_eq!(single, without_model_bytes(r), "{mode}, {schedule}");
        }
    }
}

#[test]
fn splitfed_moves_two_models_per_client_and_round() {
    let out = tempfile::tempdir().unwrap();
    let (clients, epochs) = (3u64, 2u64);
    for mode in ["coupled", "decoupled"] {
        for schedule in ["splitfed-v1", "splitfed-v2"] {
            let set = format!("clients.schedule={schedule}");
            let r = train(
                &[
                    "--mode",
                    mode,
                    "--set",
                    &set,
                    "--set",
                    "clients.count=3",
                    "--set",
                    "clients.partition=dirichlet",
                    "--set",
                    "train.epochs=2",
                ],
                out.path(),
            );
            assert_eq!(r["status"], "completed", "{mode}, {schedule}");
            let params = &r["parameters"];
            let values = u(&params["client"])
                + if mode == "decoupled" {
                    u(&params["aux_head"])
                } else {
                    0
                };
            // One rank-1 f32 frame: 6-byte header, one dimension, the values.
            let model_frame = 6 + 4 + 4 * values;
            assert_eq!(
                u(&r["bytes"]["weights"]),
                2 * clients * epochs * model_frame,
                "{mode}, {schedule}"
            );
            assert_eq!(
                u(&r["bytes"]["optimizer_state"]),
                0,
                "optimizers restart every round"
            );
            for epoch in r["epochs"].as_array().unwrap() {
                assert_eq!(u(&epoch["bytes"]["weights"]), 2 * clients * model_frame);
            }
            for c in r["clients"].as_array().unwrap() {
                assert_eq!(
                    u(&c["bytes"]["weights"]),
                    2 * epochs * model_frame,
                    "down and up"
                );
            }
            let copies = u(&r["peak_memory"]["server_copies"]);
            if schedule == "splitfed-v1" {
                assert!(
                    copies >= clients * 4 * u(&params["server"]),
                    "v1 holds a server copy per client: {copies}"
                );
            } else {
                assert_eq!(copies, 0);
            }
        }
    }
}
