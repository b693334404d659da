//! Where the dataset lives: `--data-dir`, else the config's `data.dir`, else `$SPLITAUX_DATA`,
//! else `data/`. The path may be the folder holding the files or its parent holding the folder
//! the official tarball extracts to (`cifar-10-batches-bin/`, `cifar-100-binary/`).

use std::path::{Path, PathBuf};

use super::cifar::DatasetKind;

/// Environment variable naming the data directory.
pub const DATA_ENV: &str = "SPLITAUX_DATA";
/// Data directory used when nothing else names one.
pub const DEFAULT_DATA_DIR: &str = "data";

/// The data root chosen from, in order: a command-line flag, the config, the environment, the
/// default. Empty strings count as unset.
pub fn data_root(flag: Option<&Path>, config: Option<&Path>) -> PathBuf {
    let non_empty = |p: &&Path| !p.as_os_str().is_empty();
    if let Some(path) = flag.filter(non_empty).or(config.filter(non_empty)) {
        return path.to_path_buf();
    }
    match std::env::var_os(DATA_ENV) {
        Some(value) if !value.is_empty() => PathBuf::from(value),
        _ => PathBuf::from(DEFAULT_DATA_DIR),
    }
}

/// The folder holding `kind`'s files below `root`, if it is there: `root` itself or
/// `root/<official folder>`.
pub fn find_dataset(root: &Path, kind: DatasetKind) -> Option<PathBuf> {
    [root.to_path_buf(), root.join(kind.folder())]
        .into_iter()
        .find(|dir| dir.join(kind.marker_file()).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_folder_or_parent() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(find_dataset(root.path(), DatasetKind::Cifar10), None);
        let inner = root.path().join("cifar-10-batches-bin");
        std::fs::create_dir(&inner).unwrap();
        std::fs::write(inner.join("test_batch.bin"), b"").unwrap();
        assert_eq!(
            find_dataset(root.path(), DatasetKind::Cifar10),
            Some(inner.clone())
        );
        assert_eq!(
            find_dataset(&inner, DatasetKind::Cifar10),
            Some(inner.clone())
        );
        assert_eq!(find_dataset(root.path(), DatasetKind::Cifar100), None);
    }

    #[test]
    fn flag_beats_config() {
        let got = data_root(Some(Path::new("a")), Some(Path::new("b")));
        assert_eq!(got, PathBuf::from("a"));
        let got = data_root(Some(Path::new("")), Some(Path::new("b")));
        assert_eq!(got, PathBuf::from("b"));
    }
}
