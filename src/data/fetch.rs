//! Downloading the official binary tarballs: checksum-verified and extracted atomically.
//!
//! The tarball is streamed into a temporary folder inside the data root while its MD5 is
//! computed; only when the checksum matches is it extracted (into the same temporary folder) and
//! the dataset folder renamed into place. Any failure drops the temporary folder, so an
//! interrupted or corrupt download never leaves a half-written dataset behind. Archive entries
//! that would land outside the target (absolute paths, `..`, links) are refused.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;
use indicatif::{ProgressBar, ProgressStyle};
use md5::{Digest, Md5};

use super::cifar::DatasetKind;

/// Environment variable overriding the download address.
pub const URL_ENV: &str = "SPLITAUX_FETCH_URL";
/// Environment variable overriding the expected MD5 (hex).
pub const MD5_ENV: &str = "SPLITAUX_FETCH_MD5";

/// Where a tarball comes from and what its MD5 must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub url: String,
    pub md5: String,
}

impl Source {
    /// The official tarball of `kind`.
    pub fn official(kind: DatasetKind) -> Self {
        let (url, md5) = match kind {
            DatasetKind::Cifar10 => (
                "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                "c32a1d4ab5d03f1284b67883e8d87530",
            ),
            DatasetKind::Cifar100 => (
                "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                "03b5dce01913d631647c71ecec9e9cb8",
            ),
        };
        Self {
            url: url.into(),
            md5: md5.into(),
        }
    }

    /// The official source, overridden by explicit values, then by the environment.
    pub fn resolve(kind: DatasetKind, url: Option<String>, md5: Option<String>) -> Self {
        let official = Self::official(kind);
        let env = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        Self {
            url: url.or_else(|| env(URL_ENV)).unwrap_or(official.url),
            md5: md5.or_else(|| env(MD5_ENV)).unwrap_or(official.md5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("download of {url} failed: {message}")]
    Download { url: String, message: String },
    #[error("checksum mismatch for {url}: MD5 is {actual}, expected {expected}; nothing was kept")]
    Checksum {
        url: String,
        actual: String,
        expected: String,
    },
    #[error("archive entry `{entry}` would be written outside the target folder; refused")]
    UnsafeEntry { entry: String },
    #[error("archive from {url} has no `{folder}/` folder with `{marker}`")]
    WrongContent {
        url: String,
        folder: String,
        marker: String,
    },
    #[error("{path} already exists; remove it first to fetch again")]
    AlreadyExists { path: PathBuf },
    // The message carries the cause, so the cause is not also `source()` (a chain printed with
    // `{:#}` would repeat it).
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> FetchError + '_ {
    move |cause| FetchError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// Downloads `kind` from `source` into `root/<official folder>` and returns that folder.
pub fn fetch(
    kind: DatasetKind,
    root: &Path,
    source: &Source,
    show_progress: bool,
) -> Result<PathBuf, FetchError> {
    let target = root.join(kind.folder());
    if target.exists() {
        return Err(FetchError::AlreadyExists { path: target });
    }
    fs::create_dir_all(root).map_err(io_at(root))?;
    let staging = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(root)
        .map_err(io_at(root))?;
    let archive = staging.path().join("archive.tar.gz");
    let actual = download(&source.url, &archive, show_progress)?;
    if !actual.eq_ignore_ascii_case(source.md5.trim()) {
        return Err(FetchError::Checksum {
            url: source.url.clone(),
            actual,
            expected: source.md5.clone(),
        });
    }
    let extracted = staging.path().join("extracted");
    extract(&archive, &extracted)?;
    let folder = extracted.join(kind.folder());
    if !folder.join(kind.marker_file()).is_file() {
        return Err(FetchError::WrongContent {
            url: source.url.clone(),
            folder: kind.folder().into(),
            marker: kind.marker_file().into(),
        });
    }
    fs::rename(&folder, &target).map_err(io_at(&target))?;
    Ok(target)
}

/// Streams `url` into `dest`, returning the hex MD5 of what was received.
fn download(url: &str, dest: &Path, show_progress: bool) -> Result<String, FetchError> {
    let failed = |message: String| FetchError::Download {
        url: url.into(),
        message,
    };
    let response = ureq::get(url).call().map_err(|e| failed(e.to_string()))?;
    let body = response.into_body();
    let length = body.content_length();
    let mut reader = body.into_with_config().limit(u64::MAX).reader();
    let bar = if show_progress {
        let bar = ProgressBar::new(length.unwrap_or(0));
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid progress template")
            .progress_chars("=> "),
        );
        bar.set_message("download");
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut out = BufWriter::new(File::create(dest).map_err(io_at(dest))?);
    let mut hasher = Md5::new();
    let mut buffer = vec![0u8; 1 << 16];
    let mut received = 0u64;
    loop {
        let n = reader
            .read(&mut buffer)
            .map_err(|e| failed(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        out.write_all(&buffer[..n]).map_err(io_at(dest))?;
        received += n as u64;
        bar.set_position(received);
    }
    out.flush().map_err(io_at(dest))?;
    bar.finish_and_clear();
    if let Some(expected) = length
        && received != expected
    {
        return Err(failed(format!(
            "connection closed after {received} of {expected} bytes"
        )));
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Unpacks a `.tar.gz` into `dest`, refusing any entry that is not a plain file or folder
/// strictly below `dest`.
fn extract(archive: &Path, dest: &Path) -> Result<(), FetchError> {
    fs::create_dir_all(dest).map_err(io_at(dest))?;
    let file = File::open(archive).map_err(io_at(archive))?;
    let mut tar = tar::Archive::new(GzDecoder::new(file));
    for entry in tar.entries().map_err(io_at(archive))? {
        let mut entry = entry.map_err(io_at(archive))?;
        let path = entry.path().map_err(io_at(archive))?.into_owned();
        let kind = entry.header().entry_type();
        let safe = path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
            && (kind.is_file() || kind.is_dir());
        if !safe {
            return Err(FetchError::UnsafeEntry {
                entry: path.display().to_string(),
            });
        }
        let out = dest.join(&path);
        if kind.is_dir() {
            fs::create_dir_all(&out).map_err(io_at(&out))?;
        } else {
            if let Some(parent) = out.parent() {
                fs::create_dir_all(parent).map_err(io_at(parent))?;
            }
            let mut file = File::create(&out).map_err(io_at(&out))?;
            io::copy(&mut entry, &mut file).map_err(io_at(&out))?;
        }
    }
    Ok(())
}
