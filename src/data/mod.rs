//! The CIFAR data layer: reading the binary files, finding and fetching them, taking subsets and
//! building augmented tensor batches.

pub mod batch;
pub mod cifar;
pub mod fetch;
pub mod locate;
pub mod partition;
pub mod subset;

use std::path::{Path, PathBuf};

pub use batch::{Batcher, HostBatch, Normalization};
pub use cifar::{Cifar, DataError, DatasetKind, LabelSet, Split};
pub use subset::SubsetRule;

/// Failure to obtain a dataset.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "no {name} dataset under {root} (looked for {marker} there and in {root}/{folder}/); fetch it with `splitaux data fetch {name} --data-dir {root}`"
    )]
    NotFound {
        name: &'static str,
        root: PathBuf,
        marker: &'static str,
        folder: &'static str,
    },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
}

/// Loads `kind` from under `root`; when it is missing and `offline` is false, fetches it first
/// from the official source (or the one the environment names).
pub fn open(
    kind: DatasetKind,
    labels: LabelSet,
    root: &Path,
    offline: bool,
    show_progress: bool,
) -> Result<Cifar, OpenError> {
    let dir = match locate::find_dataset(root, kind) {
        Some(dir) => dir,
        None if offline => {
            return Err(OpenError::NotFound {
                name: kind.name(),
                root: root.to_path_buf(),
                marker: kind.marker_file(),
                folder: kind.folder(),
            });
        }
        None => {
            let source = fetch::Source::resolve(kind, None, None);
            if show_progress {
                eprintln!(
                    "{} not found under {}: fetching {}",
                    kind.name(),
                    root.display(),
                    source.url
                );
            }
            fetch::fetch(kind, root, &source, show_progress)?
        }
    };
    Ok(cifar::load(&dir, kind, labels)?)
}
