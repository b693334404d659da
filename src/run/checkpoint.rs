//! Checkpoints: everything a run needs to continue after its process dies, written at the end of
//! every `train.checkpoint_every` epochs, and read back by `train --resume` and by sweeps.
//!
//! What is saved: the resolved configuration and data folder; the epochs finished and the
//! learning-rate schedule's position (the run's step count); the report so far (per-epoch
//! history, clients); every endpoint's byte ledger; the memory peaks so far; the client-side
//! model with its optimizer state and which client holds it (sequential), or the global
//! client-side model (SplitFed); the server's model and optimizer state. Every tensor is saved at
//! full precision (f32 values, burn's optimizer record bytes). The data generators need no state:
//! each client's epoch order and augmentation stream are functions of (`train.seed`, epoch,
//! stream), and a checkpoint is taken between epochs.
//!
//! # File format (little-endian)
//! ```text
//! magic "SPLITAUXCKPT\0\0\0\x01"  (16 bytes; the last four are the format version)
//! meta length u64, meta (JSON: CheckpointMeta)
//! section count u32, then per section: name length u16, name, data length u64, data
//! MD5 of everything above (16 bytes)
//! ```
//! It is written to `<dir>/.checkpoint.partial`, synced, then renamed to `<dir>/checkpoint.bin`
//! (and the folder synced): a kill at any moment leaves the previous checkpoint whole, and no
//! file named `checkpoint*` exists before one is complete.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::config::ExperimentConfig;
use crate::memory::PeakMemory;
use crate::party::endpoint::Ledger;
use crate::party::state::ModelState;
use crate::report::Report;

/// The checkpoint's file name inside a run's folder.
pub const FILE: &str = "checkpoint.bin";
/// Where a checkpoint is written before it is renamed into place.
pub const PARTIAL: &str = ".checkpoint.partial";
/// The format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 12] = b"SPLITAUXCKPT";
const DIGEST: usize = 16;

/// A checkpoint that cannot be written or read; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a splitaux checkpoint")]
    NotACheckpoint { path: PathBuf },
    #[error("{path}: checkpoint format version {found}; this build reads version {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: truncated checkpoint ({what})")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: corrupt checkpoint ({what})")]
    Corrupt { path: PathBuf, what: String },
}

/// Everything but the tensors, stored as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub splitaux_version: String,
    /// The resolved configuration of the run (its mode included).
    pub config: ExperimentConfig,
    /// The dataset folder the run read.
    pub data_dir: Option<PathBuf>,
    /// Epochs finished.
    pub epochs_done: usize,
    /// Training steps taken so far (the learning-rate schedule's position).
    pub global_step: usize,
    /// Seconds the run has trained for in earlier processes.
    pub wall_seconds: f64,
    /// The report so far: per-epoch history, clients, accuracy.
    pub report: Report,
    /// Byte ledgers: every client's endpoints, then the server's, in a fixed order.
    pub client_ledgers: Vec<Vec<Ledger>>,
    pub server_ledgers: Vec<Ledger>,
    pub peaks: Option<PeakMemory>,
    /// Sequential: the client that holds the client-side model.
    pub holder: Option<usize>,
}

/// A run's state between two epochs.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    /// Sequential: the client-side model (with its auxiliary head when it travels) and its
    /// optimizer.
    pub client: Option<ModelState>,
    /// SplitFed: the global client-side model.
    pub global_client: Option<Vec<f32>>,
    /// The server's model and optimizer.
    pub server: ModelState,
}

/// Writes `bytes` to `path` so that a reader, or a crash at any moment, sees the old file or
/// the new one whole: into `partial` (same folder), synced, renamed over `path`, and the folder
/// synced. An error names the file it happened on.
pub fn write_atomically(
    partial: &Path,
    path: &Path,
    bytes: &[u8],
) -> Result<(), (PathBuf, std::io::Error)> {
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |e| (p, e)
    };
    let mut file = std::fs::File::create(partial).map_err(at(partial))?;
    file.write_all(bytes).map_err(at(partial))?;
    file.sync_all().map_err(at(partial))?;
    drop(file);
    std::fs::rename(partial, path).map_err(at(path))?;
    // The rename itself survives a crash once the folder is synced.
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Ok(folder) = std::fs::File::open(folder.unwrap_or(Path::new("."))) {
        folder.sync_all().map_err(at(path))?;
    }
    Ok(())
}

impl Checkpoint {
    /// Writes the checkpoint into `dir` atomically (see the module doc).
    pub fn save(&self, dir: &Path) -> Result<PathBuf, CheckpointError> {
        let partial = dir.join(PARTIAL);
        let path = dir.join(FILE);
        let bytes = self.encode(&path)?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CheckpointError::Io { path, source }
        };
        write_atomically(&partial, &path, &bytes).map_err(|(at, source)| io(&at)(source))?;
        Ok(path)
    }

    /// Reads `<dir>/checkpoint.bin`; `Ok(None)` when there is none.
    pub fn load_from(dir: &Path) -> Result<Option<Self>, CheckpointError> {
        let path = dir.join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => Self::decode(&bytes, &path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CheckpointError::Io { path, source }),
        }
    }

    fn sections(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut sections = vec![
            ("server.weights", f32_bytes(&self.server.weights)),
            ("server.optimizer", self.server.optimizer.clone()),
        ];
        if let Some(client) = &self.client {
            sections.push(("client.weights", f32_bytes(&client.weights)));
            sections.push(("client.optimizer", client.optimizer.clone()));
        }
        if let Some(global) = &self.global_client {
            sections.push(("global_client.weights", f32_bytes(global)));
        }
        sections
    }

    fn encode(&self, path: &Path) -> Result<Vec<u8>, CheckpointError> {
        let meta = serde_json::to_vec(&self.meta).map_err(|e| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            what: format!("cannot encode its metadata: {e}"),
        })?;
        let sections = self.sections();
        let mut out = Vec::with_capacity(
            64 + meta.len() + sections.iter().map(|(_, d)| d.len() + 32).sum::<usize>(),
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
        for (name, data) in &sections {
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(data.len() as u64).to_le_bytes());
            out.extend_from_slice(data);
        }
        let digest = Md5::digest(&out);
        out.extend_from_slice(&digest);
        Ok(out)
    }

    fn decode(bytes: &[u8], path: &Path) -> Result<Self, CheckpointError> {
        let truncated = |what: &str| CheckpointError::Truncated {
            path: path.to_path_buf(),
            what: what.to_string(),
        };
        let corrupt = |what: String| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(CheckpointError::NotACheckpoint {
                path: path.to_path_buf(),
            });
        }
        let mut reader = Reader {
            bytes,
            at: MAGIC.len(),
        };
        let version = u32::from_le_bytes(reader.take().ok_or_else(|| truncated("header"))?);
        if version != FORMAT_VERSION {
            return Err(CheckpointError::Version {
                path: path.to_path_buf(),
                found: version,
            });
        }
        let meta_len = u64::from_le_bytes(reader.take().ok_or_else(|| truncated("header"))?);
        let meta = reader
            .slice(meta_len)
            .ok_or_else(|| truncated("metadata"))?;
        let count = u32::from_le_bytes(reader.take().ok_or_else(|| truncated("section count"))?);
        let mut sections = BTreeMap::new();
        for _ in 0..count {
            let name_len =
                u16::from_le_bytes(reader.take().ok_or_else(|| truncated("section name"))?);
            let name = reader
                .slice(u64::from(name_len))
                .ok_or_else(|| truncated("section name"))?;
            let name = String::from_utf8_lossy(name).into_owned();
            let len = u64::from_le_bytes(reader.take().ok_or_else(|| truncated(&name))?);
            let data = reader.slice(len).ok_or_else(|| truncated(&name))?;
            sections.insert(name, data);
        }
        let body = reader.at;
        match bytes.len() - body {
            DIGEST => {}
            n if n < DIGEST => return Err(truncated("checksum")),
            n => return Err(corrupt(format!("{} bytes after the checksum", n - DIGEST))),
        }
        if Md5::digest(&bytes[..body]).as_slice() != &bytes[body..] {
            return Err(corrupt("checksum mismatch".into()));
        }
        let meta: CheckpointMeta =
            serde_json::from_slice(meta).map_err(|e| corrupt(format!("metadata: {e}")))?;
        let mut take = |name: &str| sections.remove(name);
        let floats = |name: &str, data: &[u8]| {
            f32_values(data).ok_or_else(|| corrupt(format!("{name}: not a whole number of f32")))
        };
        let server = ModelState {
            weights: floats(
                "server.weights",
                take("server.weights").ok_or_else(|| corrupt("no server.weights".into()))?,
            )?,
            optimizer: take("server.optimizer")
                .ok_or_else(|| corrupt("no server.optimizer".into()))?
                .to_vec(),
        };
        let client = match (take("client.weights"), take("client.optimizer")) {
            (Some(weights), Some(optimizer)) => Some(ModelState {
                weights: floats("client.weights", weights)?,
                optimizer: optimizer.to_vec(),
            }),
            (None, None) => None,
            _ => return Err(corrupt("client weights without optimizer state".into())),
        };
        let global_client = take("global_client.weights")
            .map(|d| floats("global_client.weights", d))
            .transpose()?;
        if let Some(extra) = sections.keys().next() {
            return Err(corrupt(format!("unknown section {extra}")));
        }
        Ok(Self {
            meta,
            client,
            global_client,
            server,
        })
    }
}

/// Reads fields off a byte slice, never past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn slice(&mut self, len: u64) -> Option<&'a [u8]> {
        let len = usize::try_from(len).ok()?;
        let end = self.at.checked_add(len)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.slice(N as u64)?.try_into().ok()
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32_values(bytes: &[u8]) -> Option<Vec<f32>> {
    bytes.len().is_multiple_of(4).then(|| {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;
    use crate::memory::PeakMemory;
    use crate::protocol::Bytes;
    use crate::report::{CutReport, Parameters, RunStatus};

    fn sample() -> Checkpoint {
        let config = ExperimentConfig::default();
        let report = Report {
            splitaux_version: crate::VERSION.into(),
            mode: Mode::Coupled,
            status: RunStatus::Completed,
            error: None,
            dataset: "cifar10".into(),
            train_images: 10,
            test_images: 10,
            cut: CutReport {
                blocks: 1,
                total_blocks: 3,
                activation_shape: [16, 32, 32],
            },
            parameters: Parameters {
                client: 1,
                aux_head: 2,
                server: 3,
            },
            test_accuracy: Some(0.5),
            aux_accuracy: None,
            epochs: Vec::new(),
            bytes: Bytes::default(),
            bytes_per_epoch: Bytes::default(),
            clients: Vec::new(),
            peak_memory_bytes: None,
            peak_memory: None,
            wall_seconds: 1.0,
            config: config.clone(),
            network: None,
        };
        Checkpoint {
            meta: CheckpointMeta {
                splitaux_version: crate::VERSION.into(),
                config,
                data_dir: Some("data".into()),
                epochs_done: 2,
                global_step: 17,
                wall_seconds: 3.5,
                report,
                client_ledgers: vec![vec![Ledger::default()]],
                server_ledgers: vec![Ledger::default()],
                peaks: Some(PeakMemory::default()),
                holder: Some(0),
            },
            client: Some(ModelState {
                weights: vec![1.0, -2.5, f32::MIN_POSITIVE, 1e-30],
                optimizer: vec![9, 8, 7],
            }),
            global_client: None,
            server: ModelState {
                weights: vec![0.1; 5],
                optimizer: vec![1, 2, 3, 4],
            },
        }
    }

    #[test]
    fn round_trips_bit_for_bit_and_leaves_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = sample();
        let path = checkpoint.save(dir.path()).unwrap();
        assert_eq!(path, dir.path().join(FILE));
        assert!(!dir.path().join(PARTIAL).exists());
        let back = Checkpoint::load_from(dir.path()).unwrap().unwrap();
        assert_eq!(back.client, checkpoint.client);
        assert_eq!(back.server, checkpoint.server);
        assert_eq!(back.global_client, None);
        assert_eq!(back.meta.global_step, 17);
        assert_eq!(back.meta.report, checkpoint.meta.report);
        assert!(
            Checkpoint::load_from(tempfile::tempdir().unwrap().path())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn damaged_files_give_named_errors_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample().save(dir.path()).unwrap();
        let good = std::fs::read(&path).unwrap();
        let read = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            Checkpoint::load_from(dir.path()).unwrap_err()
        };
        // Every truncation is named as one, and names the file.
        for len in [0, 5, 14, 20, 40, good.len() / 2, good.len() - 1] {
            let e = read(&good[..len]);
            let text = e.to_string();
            assert!(text.contains(FILE), "{text}");
            assert!(
                matches!(
                    e,
                    CheckpointError::Truncated { .. } | CheckpointError::NotACheckpoint { .. }
                ),
                "length {len}: {text}"
            );
        }
        // A flipped bit anywhere after the header fails the checksum (or the structure).
        for at in [20, good.len() / 2, good.len() - 20, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            let e = read(&bad);
            assert!(
                matches!(
                    e,
                    CheckpointError::Corrupt { .. } | CheckpointError::Truncated { .. }
                ),
                "byte {at}: {e}"
            );
        }
        let mut other = good.clone();
        other[12..16].copy_from_slice(&7u32.to_le_bytes());
        assert!(matches!(
            read(&other),
            CheckpointError::Version { found: 7, .. }
        ));
        assert!(matches!(
            read(b"not a checkpoint at all"),
            CheckpointError::NotACheckpoint { .. }
        ));
        // Random bytes behind a valid header: an error, whatever they are.
        let mut noise = good[..16].to_vec();
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            noise.push(x as u8);
            if noise.len().is_multiple_of(97) {
                let _ = read(&noise);
            }
        }
    }
}
