//! `serve` and `client`: one party of a run per process, over gRPC. Tokens, certificates and
//! addresses are read and checked here; the library runs the parties.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use splitaux::config::{ExperimentConfig, Mode};
use splitaux::report::{self, RunStatus};
use splitaux::run::PreparedData;
use splitaux::run::remote::client::take_part;
use splitaux::run::remote::link_limits;
use splitaux::run::remote::server::{ServeOptions, serve as run_server};
use splitaux::transport::grpc::{
    ClientOptions, GrpcServer, LinkLimits, ServerOptions, TlsIdentity, TrustedServer, connect,
};

use super::train::default_out_dir;
use super::{ConfigSource, parse_name};

/// Settings every process of a network run takes.
#[derive(Debug, Args)]
pub struct PartyArgs {
    #[command(flatten)]
    pub source: ConfigSource,
    /// Override train.mode: coupled or decoupled.
    #[arg(long, value_parser = parse_name::<Mode>)]
    pub mode: Option<Mode>,
    /// A file holding the shared secret token (without one the server admits only loopback
    /// clients).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Allow plaintext (no TLS) to or from a non-loopback address.
    #[arg(long)]
    pub insecure: bool,
    /// Seconds to wait for any one message from the peer before giving up.
    #[arg(long, default_value_t = 21_600, value_name = "SECS")]
    pub timeout: u64,
    /// Folder for this process's JSON report [default: runs/<UTC time>-<role>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the JSON report to stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub party: PartyArgs,
    /// Address to listen on, e.g. 0.0.0.0:7070; port 0 picks a free port (printed on stderr as
    /// `listening on ADDR`).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Seconds to wait for every client to connect.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub wait_for_clients: u64,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub party: PartyArgs,
    /// The server: host:port, or http://host:port / https://host:port.
    #[arg(long, value_name = "URL")]
    pub connect: String,
    /// This client's id, 0 to clients.count − 1.
    #[arg(long)]
    pub client_id: usize,
    /// Speak TLS, trusting the server certificate signed by this CA (PEM).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// The name the server's certificate must carry [default: the host of --connect].
    #[arg(long)]
    pub tls_name: Option<String>,
    /// Seconds to keep retrying (with backoff) while the server cannot be reached.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub connect_for: u64,
}

impl PartyArgs {
    fn config(&self) -> Result<ExperimentConfig> {
        let mut config = self.source.load()?;
        if let Some(mode) = self.mode {
            config.train.mode = mode;
        }
        Ok(config)
    }

    fn token(&self) -> Result<Option<String>> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?;
        let token = text.trim();
        if token.is_empty() {
            bail!("the token file {} is empty", path.display());
        }
        Ok(Some(token.to_string()))
    }

    fn out(&self, role: &str) -> Result<PathBuf> {
        let out = self.out.clone().unwrap_or_else(|| default_out_dir(role));
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        Ok(out)
    }

    /// The data and the link limits the configuration implies.
    fn prepare(&self, config: &ExperimentConfig) -> Result<(PreparedData, LinkLimits)> {
        let interactive = !self.json && std::io::stdout().is_terminal();
        let data = self.source.prepare(config, interactive)?;
        let limits = link_limits(config, data.classes, Duration::from_secs(self.timeout))?;
        Ok((data, limits))
    }
}

fn read(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let party = &args.party;
    let config = party.config()?;
    let token = party.token()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsIdentity {
            cert_pem: read(cert, "certificate")?,
            key_pem: read(key, "private key")?,
        }),
        _ => None,
    };
    if tls.is_none() && !args.listen.ip().is_loopback() && !party.insecure {
        bail!(
            "--listen {}: plaintext on a non-loopback address; give --tls-cert/--tls-key, or \
             --insecure to allow it",
            args.listen
        );
    }
    let out = party.out("serve")?;
    let (data, limits) = party.prepare(&config)?;
    let mut listener = GrpcServer::start(ServerOptions {
        listen: args.listen,
        token: token.clone(),
        tls: tls.clone(),
        limits,
    })?;
    eprintln!("listening on {}", listener.local_addr());
    if token.is_none() {
        eprintln!("no --token-file: only clients on this machine (loopback) are admitted");
    }
    let report_path = out.join(format!("{}.json", config.train.mode.name()));
    let options = ServeOptions {
        progress: !party.json,
        report_path: Some(report_path.clone()),
        wait_for_clients: Duration::from_secs(args.wait_for_clients),
        hello_timeout: Duration::from_secs(10),
        timeout: Duration::from_secs(party.timeout),
        tls: tls.is_some(),
    };
    let report =
        run_server(&config, &data, &mut listener, &options).map_err(|e| {
            match report_path.exists() {
                true => anyhow::anyhow!("{e}; the report so far is in {}", report_path.display()),
                false => e.into(),
            }
        })?;
    if party.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::summary(&report));
        eprintln!("report written to {}", report_path.display());
    }
    if report.status == RunStatus::Diverged {
        bail!(
            "{} training diverged: {} (report kept in {})",
            report.mode.name(),
            report.error.as_deref().unwrap_or_default(),
            report_path.display()
        );
    }
    Ok(())
}

pub fn client(args: ClientArgs) -> Result<()> {
    let party = &args.party;
    let config = party.config()?;
    let token = party.token()?;
    let (scheme, address) = match args.connect.split_once("://") {
        Some((scheme, rest)) => (
            Some(scheme.to_ascii_lowercase()),
            rest.trim_end_matches('/'),
        ),
        None => (None, args.connect.as_str()),
    };
    let host = address
        .rsplit_once(':')
        .map_or(address, |(host, _)| host)
        .to_string();
    let tls = match (&args.ca, scheme.as_deref()) {
        (Some(ca), Some("https") | None) => Some(TrustedServer {
            ca_pem: read(ca, "CA certificate")?,
            domain: args
                .tls_name
                .clone()
                .unwrap_or_else(|| host.trim_matches(['[', ']']).to_string()),
        }),
        (None, Some("https")) => bail!("--connect {}: https needs --ca", args.connect),
        (Some(_), Some(other)) => {
            bail!("--connect {}: --ca needs https, not {other}", args.connect)
        }
        (None, Some("http") | None) => None,
        (None, Some(other)) => bail!("--connect {}: unknown scheme {other}", args.connect),
    };
    if tls.is_none() && !is_loopback_host(&host) && !party.insecure {
        bail!(
            "--connect {}: plaintext to a non-loopback address; give --ca for TLS, or --insecure \
             to allow it",
            args.connect
        );
    }
    let out = party.out(&format!("client{}", args.client_id))?;
    let (data, limits) = party.prepare(&config)?;
    let transport = connect(&ClientOptions {
        server: address.to_string(),
        name: format!("client {}", args.client_id),
        token,
        tls,
        limits,
        connect_for: Duration::from_secs(args.connect_for),
    })?;
    let report = take_part(&config, &data, args.client_id, Box::new(transport))?;
    let path = out.join(format!("client-{}.json", args.client_id));
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&path, text.clone() + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    if party.json {
        println!("{text}");
    } else {
        eprintln!(
            "client {}: {} after {} epochs; sent {}, received {}; report in {}",
            report.id,
            report.status.name(),
            report.epochs,
            report::human_bytes(report.bytes.up),
            report::human_bytes(report.bytes.down),
            path.display()
        );
    }
    match report.error {
        Some(error) => bail!("client {}: {error}", report.id),
        None => Ok(()),
    }
}
