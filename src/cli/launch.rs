//! `train --transport grpc`: the server and every client as separate processes of this binary
//! on 127.0.0.1, started and watched here; the server's report is printed as `train` prints an
//! in-process one.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use splitaux::config::ExperimentConfig;
use splitaux::data::locate;
use splitaux::report::{self, RunStatus};

use super::train::{TrainArgs, read_report};

/// How long the server may take to load its data and listen, and how long the processes may
/// take to end once one of them has ended.
const START_LIMIT: Duration = Duration::from_secs(300);
const WIND_DOWN: Duration = Duration::from_secs(60);

/// Trains `config` with the server and its clients in separate processes; reports into `out`.
pub fn train_over_grpc(args: &TrainArgs, config: &ExperimentConfig, out: &Path) -> Result<()> {
    let config_path = out.join("config.toml");
    std::fs::write(&config_path, config.to_toml())
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let data_root = locate::data_root(
        args.source.data_dir.as_deref(),
        Some(config.data.dir.as_path()),
    );
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let common = |role: &str| {
        let mut cmd = Command::new(&exe);
        cmd.arg(role)
            .arg("--config")
            .arg(&config_path)
            .arg("--data-dir")
            .arg(&data_root)
            .arg("--out")
            .arg(out);
        // Machine-readable output keeps the server and clients quiet (no epoch lines).
        if args.json || role == "client" {
            cmd.arg("--json");
        }
        if args.source.offline {
            cmd.arg("--offline");
        }
        cmd
    };
    let mut server = common("serve")
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the server process")?;
    let addr = listening_address(&mut server)?;
    if !args.json {
        eprintln!("server listening on {addr}");
    }
    let mut clients: Vec<Child> = Vec::new();
    for id in 0..config.clients.count {
        let client = common("client")
            .args(["--connect", &addr, "--client-id", &id.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn();
        match client {
            Ok(child) => clients.push(child),
            Err(e) => {
                let _ = server.kill();
                for child in &mut clients {
                    let _ = child.kill();
                }
                return Err(e).context(format!("cannot start client {id}"));
            }
        }
    }
    let server_ok = wait_all(&mut server, &mut clients)?;
    let report_path = out.join(format!("{}.json", config.train.mode.name()));
    if !report_path.exists() {
        bail!(
            "the server wrote no report at {} (see its message above)",
            report_path.display()
        );
    }
    let report = read_report(&report_path)?;
    if report.status != RunStatus::Running {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report::summary(&report));
            eprintln!("reports written to {}", out.display());
        }
    }
    let error = report.error.as_deref().unwrap_or_default();
    match report.status {
        RunStatus::Completed if server_ok => {}
        RunStatus::Diverged => bail!(
            "{} training diverged: {error} (report kept in {})",
            report.mode.name(),
            out.display()
        ),
        RunStatus::Failed => bail!("the run failed: {error} (report kept in {})", out.display()),
        _ => bail!(
            "the server failed (its report so far is in {})",
            report_path.display()
        ),
    }
    if let Some(failed) = clients.iter_mut().position(|c| !exited_ok(c)) {
        bail!("client {failed} failed (see its message above)");
    }
    Ok(())
}

/// Reads the server's stderr until it says where it listens; the rest of its stderr is passed
/// on to ours.
fn listening_address(server: &mut Child) -> Result<String> {
    let pipe = server.stderr.take().context("the server's stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            match line.strip_prefix("listening on ") {
                Some(addr) if !sent => {
                    let _ = tx.send(addr.trim().to_string());
                    sent = true;
                }
                _ => eprintln!("{line}"),
            }
        }
    });
    match rx.recv_timeout(START_LIMIT) {
        Ok(addr) => Ok(addr),
        Err(_) => {
            let _ = server.kill();
            let _ = server.wait();
            bail!("the server did not start listening (see its message above)")
        }
    }
}

/// Waits for every process; once one fails, the others get [`WIND_DOWN`] to notice and end
/// before they are killed. Whether the server succeeded.
fn wait_all(server: &mut Child, clients: &mut [Child]) -> Result<bool> {
    let mut deadline: Option<Instant> = None;
    loop {
        let server_done = server.try_wait()?;
        let mut clients_done = true;
        for client in clients.iter_mut() {
            match client.try_wait()? {
                Some(status) if !status.success() => {
                    deadline.get_or_insert_with(|| Instant::now() + WIND_DOWN);
                }
                Some(_) => {}
                None => clients_done = false,
            }
        }
        match server_done {
            Some(status) if clients_done => return Ok(status.success()),
            Some(_) => {
                deadline.get_or_insert_with(|| Instant::now() + WIND_DOWN);
            }
            None => {}
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            let _ = server.kill();
            for client in clients.iter_mut() {
                let _ = client.kill();
            }
            let status = server.wait()?;
            for client in clients.iter_mut() {
                let _ = client.wait();
            }
            return Ok(status.success());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn exited_ok(child: &mut Child) -> bool {
    matches!(child.try_wait(), Ok(Some(status)) if status.success())
}
