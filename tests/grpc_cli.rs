//! Runs whose server and clients are separate processes over gRPC on 127.0.0.1: they report
//! exactly what in-process runs report; tokens, TLS, configurations and client ids are checked
//! at hello; a client or server that dies ends the run with the dead party named.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TINY, cifar10, deterministic_part, splitaux, train_json};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::Value;

const KILL: &str = "SPLITAUX_KILL_AFTER_STEP";

/// Settings of a two-client, two-epoch tiny run, plus `extra`.
fn settings(extra: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = TINY.iter().map(|s| s.to_string()).collect();
    for s in ["train.epochs=2", "clients.count=2", "train.threads=1"] {
        all.extend(["--set".to_string(), s.to_string()]);
    }
    all.extend(extra.iter().map(|s| s.to_string()));
    all
}

/// A report without timing, memory and the network section (which only network runs have).
fn comparable(report: Value) -> Value {
    let mut report = deterministic_part(report);
    report.as_object_mut().unwrap().remove("network");
    report
}

/// A `serve` process on a free port of 127.0.0.1, and what it says on stderr.
struct Server {
    child: Child,
    addr: String,
    stderr: Arc<Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl Server {
    fn start(out: &Path, args: &[String], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_splitaux"));
        cmd.args([
            "serve",
            "--offline",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(cifar10())
        .arg("--out")
        .arg(out)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("SPLITAUX_DATA");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        let log = Arc::clone(&stderr);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                }
                log.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server prints its address");
        Server {
            child,
            addr,
            stderr,
            reader,
        }
    }

    /// Waits (at most a minute) for the server to exit; its success and its stderr.
    fn finish(mut self) -> (bool, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the server did not exit: {}", self.stderr.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The pipe is closed: the reader thread takes the last lines and ends.
        self.reader.join().unwrap();
        let stderr = self.stderr.lock().unwrap().clone();
        (status.success(), stderr)
    }
}

/// The arguments of `splitaux client` number `id` against `server`.
fn client_args(server: &Server, id: usize, out: &Path, args: &[String]) -> Vec<std::ffi::OsString> {
    let mut all: Vec<std::ffi::OsString> = [
        "client",
        "--offline",
        "--timeout",
        "120",
        "--connect",
        &server.addr,
    ]
    .iter()
    .map(Into::into)
    .collect();
    all.extend([
        "--data-dir".into(),
        cifar10().into(),
        "--out".into(),
        out.into(),
    ]);
    all.extend(["--client-id".into(), id.to_string().into()]);
    all.extend(args.iter().map(Into::into));
    all
}

/// `splitaux client` number `id` against `server`.
fn client(server: &Server, id: usize, out: &Path, args: &[String]) -> assert_cmd::Command {
    let mut cmd = splitaux();
    cmd.args(client_args(server, id, out, args))
        .timeout(Duration::from_secs(120));
    cmd
}

/// The same client as a background process.
fn spawn_client(server: &Server, id: usize, out: &Path, args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_splitaux"))
        .args(client_args(server, id, out, args))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs `command`, asserts that it fails, and returns its stderr.
fn failure_message(command: &mut assert_cmd::Command) -> String {
    let output = command.assert().failure().get_output().clone();
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stderr_of(child: Child) -> (bool, String) {
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn runs_over_grpc_equal_in_process_runs() {
    // (mode, clients, schedule, partition): hand-offs through the server, SplitFed's model
    // traffic, a random step order, and a Dirichlet partition with a near-empty client.
    let cases = [
        ("coupled", "2", "sequential", "iid"),
        ("decoupled", "2", "sequential", "iid"),
        ("coupled", "2", "splitfed-v1", "iid"),
        ("decoupled", "3", "splitfed-v2", "iid"),
        ("decoupled", "3", "sequential", "dirichlet"),
    ];
    for (mode, clients, schedule, partition) in cases {
        let case = format!("{mode}, {clients} clients, {schedule}, {partition}");
        let extra = [
            "--mode".to_string(),
            mode.into(),
            "--set".into(),
            format!("clients.count={clients}"),
            "--set".into(),
            format!("clients.schedule={schedule}"),
            "--set".into(),
            format!("clients.partition={partition}"),
            "--set".into(),
            "clients.alpha=0.1".into(),
        ];
        let args = settings(&extra.iter().map(String::as_str).collect::<Vec<_>>());
        let run = |transport: &str, out: &Path| {
            let mut with = args.clone();
            with.extend(["--transport".into(), transport.into()]);
            train_json(&with.iter().map(String::as_str).collect::<Vec<_>>(), out)
        };
        let (memory_out, grpc_out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let in_process = run("memory", memory_out.path());
        let over_grpc = run("grpc", grpc_out.path());
        assert!(in_process.get("network").is_none(), "{case}");
        let network = over_grpc["network"].clone();
        assert_eq!(
            comparable(over_grpc),
            comparable(in_process.clone()),
            "{case}"
        );
        // What the socket carried: at least every frame the clients sent to the server.
        let up = in_process["bytes"]["up"].as_u64().unwrap();
        assert!(
            network["wire_received"].as_u64().unwrap() > up,
            "{case}: {network}"
        );
        assert!(
            network["eval_bytes"]["activations"].as_u64().unwrap() > 0,
            "{case}"
        );
        assert!(network["control_bytes"].as_u64().unwrap() > 0, "{case}");
        let weights = in_process["bytes"]["weights"].as_u64().unwrap();
        let relayed = network["relayed_bytes"].as_u64().unwrap();
        assert_eq!(
            relayed > 0,
            schedule == "sequential" && weights > 0,
            "{case}"
        );
        for id in 0..clients.parse().unwrap() {
            let local = read_json(&grpc_out.path().join(format!("client-{id}.json")));
            assert_eq!(local["status"], "completed", "{case}");
            assert_eq!(
                local["bytes"], in_process["clients"][id]["bytes"],
                "{case}: client {id}'s own count"
            );
        }
    }
}

#[test]
fn a_wrong_token_is_refused_and_the_server_goes_on_serving() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    let wrong = dir.path().join("wrong");
    std::fs::write(&token, "s3cret\n").unwrap();
    std::fs::write(&wrong, "guess\n").unwrap();
    let one = settings(&["--set", "clients.count=1"]);
    let mut serve_args = one.clone();
    serve_args.extend(["--token-file".into(), token.display().to_string()]);
    let server = Server::start(dir.path(), &serve_args, &[]);

    let mut with_wrong = one.clone();
    with_wrong.extend(["--token-file".into(), wrong.display().to_string()]);
    let started = Instant::now();
    let message = failure_message(&mut client(&server, 0, dir.path(), &with_wrong));
    assert!(message.contains("wrong token"), "{message}");
    assert!(message.contains(&server.addr), "{message}");
    assert!(started.elapsed() < Duration::from_secs(30), "not retried");
    let missing = failure_message(&mut client(&server, 0, dir.path(), &one));
    assert!(missing.contains("no token presented"), "{missing}");

    let mut with_token = one.clone();
    with_token.extend(["--token-file".into(), token.display().to_string()]);
    client(&server, 0, dir.path(), &with_token)
        .assert()
        .success();
    let (ok, stderr) = server.finish();
    assert!(ok, "{stderr}");
    assert_eq!(stderr.matches("refused").count(), 2, "{stderr}");
    assert_eq!(
        read_json(&dir.path().join("decoupled.json"))["status"],
        "completed"
    );
}

/// A throwaway CA (PEM) and a certificate for localhost signed by it (PEM cert, PEM key).
fn pki() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn a_tls_run_works_and_a_client_trusting_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki();
    let (other_ca, _, _) = pki();
    let path = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (ca, cert, key, other_ca) = (
        path("ca.pem", &ca),
        path("cert.pem", &cert),
        path("key.pem", &key),
        path("other.pem", &other_ca),
    );
    let one = settings(&["--set", "clients.count=1"]);
    let mut serve_args = one.clone();
    serve_args.extend(["--tls-cert".into(), cert, "--tls-key".into(), key]);
    let server = Server::start(dir.path(), &serve_args, &[]);
    let trusting = |ca: &str| {
        let mut args = one.clone();
        args.extend([
            "--ca".into(),
            ca.to_string(),
            "--tls-name".into(),
            "localhost".into(),
        ]);
        args
    };
    let message = failure_message(&mut client(&server, 0, dir.path(), &trusting(&other_ca)));
    assert!(message.contains("certificate"), "{message}");
    assert!(message.contains(&server.addr), "{message}");
    client(&server, 0, dir.path(), &trusting(&ca))
        .assert()
        .success();
    let (ok, stderr) = server.finish();
    assert!(ok, "{stderr}");
    let report = read_json(&dir.path().join("decoupled.json"));
    assert_eq!(report["status"], "completed");
    assert_eq!(report["network"]["tls"], true);
}

#[test]
fn hello_refuses_other_settings_and_taken_or_unknown_ids_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let args = settings(&[]);
    let server = Server::start(dir.path(), &args, &[]);
    let mut other_lr = args.clone();
    other_lr.extend(["--set".into(), "optim.lr=0.5".into()]);
    let message = failure_message(&mut client(&server, 0, dir.path(), &other_lr));
    assert!(message.contains("refused this client"), "{message}");
    assert!(message.contains("optim.lr"), "{message}");

    let first = spawn_client(&server, 0, dir.path(), &args);
    // Wait until the server has admitted client 0 before presenting the same id again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !server.stderr.lock().unwrap().contains("client 0 joined") {
        assert!(Instant::now() < deadline, "client 0 never joined");
        std::thread::sleep(Duration::from_millis(50));
    }
    let message = failure_message(&mut client(&server, 0, dir.path(), &args));
    assert!(
        message.contains("client 0 is already connected"),
        "{message}"
    );
    // An id the client's own configuration allows but the server's does not.
    let mut six = args.clone();
    six.extend(["--set".into(), "clients.count=6".into()]);
    let message = failure_message(&mut client(&server, 5, dir.path(), &six));
    assert!(
        message.contains("refused this client: client id 5: this run has 2 clients"),
        "{message}"
    );

    client(&server, 1, dir.path(), &args).assert().success();
    let (ok, stderr) = stderr_of(first);
    assert!(ok, "{stderr}");
    let (ok, stderr) = server.finish();
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("optim.lr"),
        "the server logs the refusal: {stderr}"
    );
}

#[test]
fn plaintext_off_loopback_needs_insecure() {
    let args = settings(&[]);
    let out = tempfile::tempdir().unwrap();
    // Both refuse before touching the network.
    for party in [
        ["client", "--connect", "10.1.2.3:7070", "--client-id", "0"],
        ["serve", "--listen", "0.0.0.0:0", "--wait-for-clients", "1"],
    ] {
        let message = failure_message(
            splitaux()
                .args(party)
                .args(["--offline", "--data-dir"])
                .arg(cifar10())
                .arg("--out")
                .arg(out.path())
                .args(&args),
        );
        assert!(message.contains("--insecure"), "{}: {message}", party[0]);
    }
}

#[test]
fn a_client_killed_mid_run_fails_the_run_naming_it_and_keeps_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let args = settings(&["--mode", "decoupled", "--set", "train.batch_size=16"]);
    let server = Server::start(dir.path(), &args, &[]);
    let mut victim = Command::new(env!("CARGO_BIN_EXE_splitaux"));
    victim
        .args([
            "client",
            "--offline",
            "--connect",
            &server.addr,
            "--client-id",
            "1",
        ])
        .arg("--data-dir")
        .arg(cifar10())
        .arg("--out")
        .arg(dir.path())
        .args(&args)
        // Epoch 2 (each client takes 3 steps an epoch).
        .env(KILL, "4")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let victim = victim.spawn().unwrap();
    let survivor = spawn_client(&server, 0, dir.path(), &args);
    let (ok, stderr) = server.finish();
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("client 1"), "{stderr}");
    assert!(stderr.contains("epoch 2"), "{stderr}");
    let report = read_json(&dir.path().join("decoupled.json"));
    assert_eq!(report["status"], "failed");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("client 1") && error.contains("epoch 2"),
        "{error}"
    );
    assert_eq!(
        report["epochs"].as_array().unwrap().len(),
        1,
        "epoch 1 is kept"
    );
    let (ok, stderr) = stderr_of(survivor);
    assert!(!ok);
    assert!(
        stderr.contains("client 1"),
        "the survivor hears why: {stderr}"
    );
    let killed = victim.wait_with_output().unwrap();
    assert!(!killed.status.success());
}

#[test]
fn a_killed_server_makes_every_client_exit_naming_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let args = settings(&["--set", "train.batch_size=16"]);
    let server = Server::start(dir.path(), &args, &[(KILL, "4")]);
    let clients: Vec<Child> = (0..2)
        .map(|id| spawn_client(&server, id, dir.path(), &args))
        .collect();
    let addr = server.addr.clone();
    let (ok, _) = server.finish();
    assert!(!ok);
    for (id, child) in clients.into_iter().enumerate() {
        let (ok, stderr) = stderr_of(child);
        assert!(!ok, "client {id}");
        assert!(
            stderr.contains(&format!("the server at {addr}")),
            "client {id}: {stderr}"
        );
    }
}

#[test]
fn a_diverging_run_over_grpc_stops_where_the_in_process_run_stops() {
    let args = settings(&[
        "--mode",
        "decoupled",
        "--set",
        "optim.lr=1e30",
        "--set",
        "optim.schedule=constant",
        "--set",
        "train.epochs=3",
    ]);
    let run = |transport: &str, out: &Path| {
        let message = failure_message(
            splitaux()
                .args(["train", "--offline", "--json", "--data-dir"])
                .arg(cifar10())
                .arg("--out")
                .arg(out)
                .args(&args)
                .args(["--transport", transport])
                .timeout(Duration::from_secs(300)),
        );
        assert!(
            message.contains("training diverged"),
            "{transport}: {message}"
        );
        read_json(&out.join("decoupled.json"))
    };
    let (memory_out, grpc_out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let in_process = run("memory", memory_out.path());
    let over_grpc = run("grpc", grpc_out.path());
    assert_eq!(in_process["status"], "diverged");
    assert_eq!(comparable(over_grpc), comparable(in_process));
}
