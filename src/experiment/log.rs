//! `runs.jsonl`: one JSON line per finished run, appended whole, flushed and synced, so killing a
//! sweep at any moment loses at most the run in progress and never leaves a torn line behind.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::ExperimentConfig;
use crate::report::{Report, RunStatus};

/// One line of `runs.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The combination's identity (`key=value,…,seed=N`), used to resume.
    pub id: String,
    /// The axis values of the combination, in axis order.
    pub axes: Vec<(String, String)>,
    pub seed: u64,
    /// `completed`, `diverged` (NaN/inf loss) or `failed` (the run could not start or crashed).
    pub status: RunStatus,
    pub error: Option<String>,
    /// The full report (absent when the run failed before training).
    pub report: Option<Report>,
    /// The splitaux version that ran it (absent in records of older versions, which carry it
    /// only in their report).
    #[serde(default)]
    pub splitaux_version: Option<String>,
    /// The sweep's base config: its file with the `--set` overrides, before the grid axes and
    /// seeds (absent in records of older versions, and when the base alone is not a valid
    /// config). `table` and `plot` compare it to refuse merging runs of different sweeps.
    #[serde(default)]
    pub base: Option<ExperimentConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    // The message carries the cause, so the cause is not also `source()` (a chain printed with
    // `{:#}` would repeat it).
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: line {line} is not a run record: {message}")]
    BadLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |cause| LogError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// Reads every complete record. A last line without its newline is the remains of an interrupted
/// append and is ignored (the next append removes it); any other bad line is an error.
pub fn read_records(path: &Path) -> Result<Vec<RunRecord>, LogError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    };
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| LogError::BadLine {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            })
        })
        .collect()
}

/// Appends one record as one line, then flushes and syncs it to disk.
pub fn append(path: &Path, record: &RunRecord) -> Result<(), LogError> {
    let mut line = serde_json::to_string(record).map_err(|e| io(path)(e.into()))?;
    line.push('\n');
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    drop_torn_tail(&mut file).map_err(io(path))?;
    file.write_all(line.as_bytes()).map_err(io(path))?;
    file.flush().map_err(io(path))?;
    file.sync_data().map_err(io(path))
}

/// Truncates an unterminated last line left by an interrupted append.
fn drop_torn_tail(file: &mut File) -> std::io::Result<()> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    // Find the last newline, scanning back in blocks.
    let mut end = len;
    let mut buf = vec![0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(pos) = chunk.iter().rposition(|&b| b == b'\n') {
            let keep = start + pos as u64 + 1;
            if keep != len {
                file.set_len(keep)?;
            }
            return Ok(());
        }
        end = start;
    }
    file.set_len(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> RunRecord {
        RunRecord {
            id: id.into(),
            axes: vec![("train.mode".into(), "coupled".into())],
            seed: 0,
            status: RunStatus::Failed,
            error: Some("boom".into()),
            report: None,
            splitaux_version: Some(crate::VERSION.into()),
            base: Some(ExperimentConfig::default()),
        }
    }

    #[test]
    fn append_read_and_heal_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs.jsonl");
        assert!(read_records(&path).unwrap().is_empty());
        append(&path, &record("a")).unwrap();
        append(&path, &record("b")).unwrap();
        // Simulate a kill in the middle of a third append.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\":\"c\",\"ax").unwrap();
        drop(f);
        let ids: Vec<String> = read_records(&path)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec!["a", "b"]);
        append(&path, &record("d")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.ends_with('\n'));
        let ids: Vec<String> = read_records(&path)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec!["a", "b", "d"]);
    }

    #[test]
    fn corrupt_middle_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs.jsonl");
        std::fs::write(&path, "garbage\n").unwrap();
        let err = read_records(&path).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn records_round_trip_and_older_records_read_without_version_and_base() {
        let r = record("a");
        let line = serde_json::to_string(&r).unwrap();
        assert!(
            line.contains("\"splitaux_version\"") && line.contains("\"base\""),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<RunRecord>(&line).unwrap(), r);
        let old = r#"{"id":"a","axes":[["train.mode","coupled"]],"seed":0,"status":"failed","error":"boom","report":null}"#;
        let old: RunRecord = serde_json::from_str(old).unwrap();
        assert_eq!((old.splitaux_version, old.base), (None, None));
        assert_eq!(old.id, "a");
    }
}
