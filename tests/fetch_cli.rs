//! `splitaux data fetch` against tarballs served from 127.0.0.1 (no test touches the internet):
//! success, checksum mismatch and a path-traversal entry, each leaving nothing half-written.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::OnceLock;

use common::{cifar10, splitaux};
use flate2::Compression;
use flate2::write::GzEncoder;
use md5::{Digest, Md5};
use predicates::prelude::*;

/// Serves `body` to every request on a fresh loopback port, for the life of the test process.
fn serve(body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/cifar.tar.gz", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    url
}

fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The generated CIFAR-10 packed as the official tarball is (`cifar-10-batches-bin/…`).
fn cifar10_tarball() -> &'static [u8] {
    static TARBALL: OnceLock<Vec<u8>> = OnceLock::new();
    TARBALL.get_or_init(|| {
        let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        tar.append_dir_all("cifar-10-batches-bin", cifar10())
            .unwrap();
        tar.into_inner().unwrap().finish().unwrap()
    })
}

/// A tarball whose one entry is `name`, written raw so that no safety check of the `tar`
/// crate rewrites it.
fn tarball_with_entry(name: &str) -> Vec<u8> {
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_size(4);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut raw = header.as_bytes().to_vec();
    raw.extend_from_slice(b"evil");
    raw.resize(512 * 2, 0);
    raw.extend_from_slice(&[0u8; 1024]);
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(&raw).unwrap();
    gz.finish().unwrap()
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|it| {
            it.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `splitaux data fetch cifar10` from `url` expecting `md5`, into `root`.
fn fetch_cifar10(url: &str, md5: &str, root: &Path) -> assert_cmd::assert::Assert {
    splitaux()
        .args([
            "data",
            "fetch",
            "cifar10",
            "--url",
            url,
            "--md5",
            md5,
            "--data-dir",
        ])
        .arg(root)
        .assert()
}

#[test]
fn fetch_verifies_and_extracts() {
    let tarball = cifar10_tarball();
    let url = serve(tarball.to_vec());
    let root = tempfile::tempdir().unwrap();
    fetch_cifar10(&url, &md5_hex(tarball), root.path())
        .success()
        .stdout(predicate::str::contains("cifar10 ready in"));
    assert_eq!(
        listing(root.path()),
        vec!["cifar-10-batches-bin"],
        "no staging left"
    );
    splitaux()
        .args(["data", "check", "--data-dir"])
        .arg(root.path())
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "50000 train and 10000 test images",
        ));
    // A second fetch refuses to overwrite.
    fetch_cifar10(&url, &md5_hex(tarball), root.path())
        .failure()
        .stderr(predicate::str::contains("already exists"));
}

#[test]
fn checksum_mismatch_leaves_nothing() {
    let url = serve(tarball_with_entry("cifar-10-batches-bin/test_batch.bin"));
    let root = tempfile::tempdir().unwrap();
    splitaux()
        .args(["data", "fetch", "cifar10", "--data-dir"])
        .arg(root.path())
        .env("SPLITAUX_FETCH_URL", &url)
        .env("SPLITAUX_FETCH_MD5", "00000000000000000000000000000000")
        .assert()
        .failure()
        .code(1)
        .stderr(predicate::str::contains("checksum mismatch").and(predicate::str::contains(&url)));
    assert!(
        listing(root.path()).is_empty(),
        "{:?}",
        listing(root.path())
    );
}

#[test]
fn path_traversal_entry_is_refused() {
    let tarball = tarball_with_entry("../escaped.txt");
    let url = serve(tarball.clone());
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("data");
    fetch_cifar10(&url, &md5_hex(&tarball), &root)
        .failure()
        .stderr(predicate::str::contains(
            "`../escaped.txt` would be written outside",
        ));
    assert_eq!(listing(outer.path()), vec!["data"]);
    assert!(listing(&root).is_empty(), "{:?}", listing(&root));
}

#[test]
fn unreachable_server_is_a_clear_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let root = tempfile::tempdir().unwrap();
    splitaux()
        .args([
            "data",
            "fetch",
            "cifar100",
            "--url",
            &format!("http://127.0.0.1:{port}/x.tar.gz"),
            "--data-dir",
        ])
        .arg(root.path())
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "error: download of http://127.0.0.1",
        ));
    assert!(listing(root.path()).is_empty());
}

#[test]
fn training_fetches_a_missing_dataset_unless_offline() {
    let tarball = cifar10_tarball();
    let url = serve(tarball.to_vec());
    let root = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    splitaux()
        .args(["train", "--offline", "--json", "--data-dir"])
        .arg(root.path())
        .args(common::TINY)
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "fetch it with `splitaux data fetch cifar10",
        ));
    splitaux()
        .args(["train", "--json", "--data-dir"])
        .arg(root.path())
        .arg("--out")
        .arg(out.path())
        .args(common::TINY)
        .env("SPLITAUX_FETCH_URL", &url)
        .env("SPLITAUX_FETCH_MD5", md5_hex(tarball))
        .assert()
        .success();
    assert!(
        root.path()
            .join("cifar-10-batches-bin/test_batch.bin")
            .is_file()
    );
}
