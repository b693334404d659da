//! Reading the official *binary version* of CIFAR-10 and CIFAR-100.
//!
//! Each file is a plain sequence of fixed-size records. CIFAR-10: 1 label byte, then 3,072 pixel
//! bytes. CIFAR-100: 1 coarse-label byte, 1 fine-label byte, then 3,072 pixel bytes. The pixels
//! are the 1,024 red values, then 1,024 green, then 1,024 blue, each plane row-major (32×32).
//! Everything is validated on load; every error names the file (and the record, where it applies).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Height and width of an image.
pub const IMAGE_SIDE: usize = 32;
/// Colour planes per image (R, G, B).
pub const CHANNELS: usize = 3;
/// Pixels of one plane.
pub const PLANE_BYTES: usize = IMAGE_SIDE * IMAGE_SIDE;
/// Pixel bytes of one image.
pub const IMAGE_BYTES: usize = CHANNELS * PLANE_BYTES;

/// CIFAR-10 record: `[label][R plane][G plane][B plane]`.
pub const CIFAR10_RECORD_BYTES: usize = 1 + IMAGE_BYTES;
/// CIFAR-100 record: `[coarse label][fine label][R plane][G plane][B plane]`.
pub const CIFAR100_RECORD_BYTES: usize = 2 + IMAGE_BYTES;

/// Folder the official CIFAR-10 tarball extracts to.
pub const CIFAR10_DIR: &str = "cifar-10-batches-bin";
/// Folder the official CIFAR-100 tarball extracts to.
pub const CIFAR100_DIR: &str = "cifar-100-binary";

pub const CIFAR10_TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
pub const CIFAR10_TEST_FILE: &str = "test_batch.bin";
pub const CIFAR10_META_FILE: &str = "batches.meta.txt";
/// Records in each CIFAR-10 file (five training batches and one test batch).
pub const CIFAR10_RECORDS_PER_FILE: usize = 10_000;

pub const CIFAR100_TRAIN_FILE: &str = "train.bin";
pub const CIFAR100_TEST_FILE: &str = "test.bin";
pub const CIFAR100_FINE_NAMES_FILE: &str = "fine_label_names.txt";
pub const CIFAR100_COARSE_NAMES_FILE: &str = "coarse_label_names.txt";
pub const CIFAR100_TRAIN_RECORDS: usize = 50_000;
pub const CIFAR100_TEST_RECORDS: usize = 10_000;
pub const CIFAR100_FINE_CLASSES: usize = 100;
pub const CIFAR100_COARSE_CLASSES: usize = 20;

/// Which dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    #[default]
    Cifar10,
    Cifar100,
}

/// Which CIFAR-100 label a record is classified by (CIFAR-10 has one label only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelSet {
    /// The 100 fine classes.
    #[default]
    Fine,
    /// The 20 superclasses.
    Coarse,
}

impl DatasetKind {
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
        }
    }

    /// The folder name the official tarball extracts to.
    pub fn folder(self) -> &'static str {
        match self {
            DatasetKind::Cifar10 => CIFAR10_DIR,
            DatasetKind::Cifar100 => CIFAR100_DIR,
        }
    }

    /// A file whose presence identifies a folder as holding this dataset.
    pub fn marker_file(self) -> &'static str {
        match self {
            DatasetKind::Cifar10 => CIFAR10_TEST_FILE,
            DatasetKind::Cifar100 => CIFAR100_TEST_FILE,
        }
    }

    pub fn num_classes(self, labels: LabelSet) -> usize {
        match (self, labels) {
            (DatasetKind::Cifar10, _) => 10,
            (DatasetKind::Cifar100, LabelSet::Fine) => CIFAR100_FINE_CLASSES,
            (DatasetKind::Cifar100, LabelSet::Coarse) => CIFAR100_COARSE_CLASSES,
        }
    }
}

/// Everything that can be wrong with a dataset on disk.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: file not found")]
    Missing { path: PathBuf },
    // The message carries the cause, so the cause is not also `source()` (a chain printed with
    // `{:#}` would repeat it).
    #[error("{path}: cannot read: {cause}")]
    Unreadable {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "{path}: {len} bytes is not a whole number of {record}-byte records (corrupt or truncated file)"
    )]
    PartialRecord {
        path: PathBuf,
        len: usize,
        record: usize,
    },
    #[error("{path}: holds {found} records, expected {expected}")]
    RecordCount {
        path: PathBuf,
        found: usize,
        expected: usize,
    },
    #[error("{path}: record {record}: {which} label {label} is out of range (0..{classes})")]
    LabelOutOfRange {
        path: PathBuf,
        record: usize,
        which: &'static str,
        label: u8,
        classes: usize,
    },
    #[error("{path}: lists {found} class names, expected {expected}")]
    ClassNames {
        path: PathBuf,
        found: usize,
        expected: usize,
    },
}

/// Images and labels of one split (train or test), decoded into memory.
#[derive(Debug, Clone, Default)]
pub struct Split {
    /// `len() * IMAGE_BYTES` bytes, images one after the other in the file layout (CHW).
    pub images: Vec<u8>,
    /// One label per image, in `0..num_classes`.
    pub labels: Vec<u8>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixel bytes of image `index` (CHW).
    pub fn image(&self, index: usize) -> &[u8] {
        &self.images[index * IMAGE_BYTES..(index + 1) * IMAGE_BYTES]
    }

    /// Images per class.
    pub fn class_counts(&self, num_classes: usize) -> Vec<usize> {
        let mut counts = vec![0; num_classes];
        for &label in &self.labels {
            counts[label as usize] += 1;
        }
        counts
    }

    /// A new split with the images at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Split {
        let mut images = Vec::with_capacity(indices.len() * IMAGE_BYTES);
        let mut labels = Vec::with_capacity(indices.len());
        for &index in indices {
            images.extend_from_slice(self.image(index));
            labels.push(self.labels[index]);
        }
        Split { images, labels }
    }
}

/// A whole dataset in memory.
#[derive(Debug, Clone)]
pub struct Cifar {
    pub kind: DatasetKind,
    pub labels: LabelSet,
    pub class_names: Vec<String>,
    pub train: Split,
    pub test: Split,
    /// The folder the files were read from.
    pub dir: PathBuf,
}

impl Cifar {
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }
}

/// Where one file's records go and how many there must be.
struct FileSpec<'a> {
    name: &'a str,
    records: usize,
}

/// The byte layout of a dataset's records.
#[derive(Clone, Copy)]
struct RecordLayout {
    /// Bytes per record.
    bytes: usize,
    /// Offset of the label used for classification.
    label_offset: usize,
    /// Offset of the first pixel byte.
    pixel_offset: usize,
    /// Label bytes checked for range: (offset, name, classes).
    checked: &'static [(usize, &'static str, usize)],
}

const CIFAR10_LAYOUT: RecordLayout = RecordLayout {
    bytes: CIFAR10_RECORD_BYTES,
    label_offset: 0,
    pixel_offset: 1,
    checked: &[(0, "class", 10)],
};

const CIFAR100_CHECKED: &[(usize, &str, usize)] = &[
    (0, "coarse", CIFAR100_COARSE_CLASSES),
    (1, "fine", CIFAR100_FINE_CLASSES),
];

/// Reads and validates a whole dataset from `dir` (the folder holding the files).
pub fn load(dir: &Path, kind: DatasetKind, labels: LabelSet) -> Result<Cifar, DataError> {
    let (layout, train_files, test_file, names_file) = match kind {
        DatasetKind::Cifar10 => (
            CIFAR10_LAYOUT,
            CIFAR10_TRAIN_FILES
                .iter()
                .map(|name| FileSpec {
                    name,
                    records: CIFAR10_RECORDS_PER_FILE,
                })
                .collect::<Vec<_>>(),
            FileSpec {
                name: CIFAR10_TEST_FILE,
                records: CIFAR10_RECORDS_PER_FILE,
            },
            CIFAR10_META_FILE,
        ),
        DatasetKind::Cifar100 => (
            RecordLayout {
                bytes: CIFAR100_RECORD_BYTES,
                label_offset: match labels {
                    LabelSet::Coarse => 0,
                    LabelSet::Fine => 1,
                },
                pixel_offset: 2,
                checked: CIFAR100_CHECKED,
            },
            vec![FileSpec {
                name: CIFAR100_TRAIN_FILE,
                records: CIFAR100_TRAIN_RECORDS,
            }],
            FileSpec {
                name: CIFAR100_TEST_FILE,
                records: CIFAR100_TEST_RECORDS,
            },
            match labels {
                LabelSet::Fine => CIFAR100_FINE_NAMES_FILE,
                LabelSet::Coarse => CIFAR100_COARSE_NAMES_FILE,
            },
        ),
    };
    let class_names = read_class_names(&dir.join(names_file), kind.num_classes(labels))?;
    let mut train = Split::default();
    for spec in &train_files {
        read_records(&dir.join(spec.name), spec.records, layout, &mut train)?;
    }
    let mut test = Split::default();
    read_records(
        &dir.join(test_file.name),
        test_file.records,
        layout,
        &mut test,
    )?;
    Ok(Cifar {
        kind,
        labels,
        class_names,
        train,
        test,
        dir: dir.to_path_buf(),
    })
}

fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    fs::read(path).map_err(|cause| match cause.kind() {
        std::io::ErrorKind::NotFound => DataError::Missing {
            path: path.to_path_buf(),
        },
        _ => DataError::Unreadable {
            path: path.to_path_buf(),
            cause,
        },
    })
}

fn read_class_names(path: &Path, expected: usize) -> Result<Vec<String>, DataError> {
    let bytes = read_file(path)?;
    let names: Vec<String> = String::from_utf8_lossy(&bytes)
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(String::from)
        .collect();
    if names.len() != expected {
        return Err(DataError::ClassNames {
            path: path.to_path_buf(),
            found: names.len(),
            expected,
        });
    }
    Ok(names)
}

fn read_records(
    path: &Path,
    expected: usize,
    layout: RecordLayout,
    into: &mut Split,
) -> Result<(), DataError> {
    let bytes = read_file(path)?;
    if bytes.len() % layout.bytes != 0 {
        return Err(DataError::PartialRecord {
            path: path.to_path_buf(),
            len: bytes.len(),
            record: layout.bytes,
        });
    }
    let found = bytes.len() / layout.bytes;
    if found != expected {
        return Err(DataError::RecordCount {
            path: path.to_path_buf(),
            found,
            expected,
        });
    }
    into.images.reserve(found * IMAGE_BYTES);
    into.labels.reserve(found);
    for (record, chunk) in bytes.chunks_exact(layout.bytes).enumerate() {
        for &(offset, which, classes) in layout.checked {
            let label = chunk[offset];
            if label as usize >= classes {
                return Err(DataError::LabelOutOfRange {
                    path: path.to_path_buf(),
                    record,
                    which,
                    label,
                    classes,
                });
            }
        }
        into.labels.push(chunk[layout.label_offset]);
        into.images.extend_from_slice(&chunk[layout.pixel_offset..]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record10(label: u8, fill: u8) -> Vec<u8> {
        let mut r = vec![label];
        r.extend(std::iter::repeat_n(fill, IMAGE_BYTES));
        r
    }

    #[test]
    fn reads_records_in_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        let mut bytes = record10(3, 7);
        bytes.extend(record10(9, 8));
        fs::write(&path, bytes).unwrap();
        let mut split = Split::default();
        read_records(&path, 2, CIFAR10_LAYOUT, &mut split).unwrap();
        assert_eq!(split.labels, vec![3, 9]);
        assert_eq!(split.image(1)[0], 8);
        assert_eq!(split.images.len(), 2 * IMAGE_BYTES);
    }

    #[test]
    fn rejects_bad_label_naming_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        let mut bytes = record10(3, 7);
        bytes.extend(record10(10, 8));
        fs::write(&path, bytes).unwrap();
        let err = read_records(&path, 2, CIFAR10_LAYOUT, &mut Split::default()).unwrap_err();
        assert!(
            err.to_string().contains("record 1: class label 10"),
            "{err}"
        );
    }

    #[test]
    fn select_and_counts() {
        let split = Split {
            images: (0..3).flat_map(|i| vec![i as u8; IMAGE_BYTES]).collect(),
            labels: vec![1, 0, 1],
        };
        assert_eq!(split.class_counts(2), vec![1, 2]);
        let picked = split.select(&[2, 0]);
        assert_eq!(picked.labels, vec![1, 1]);
        assert_eq!(picked.image(0)[0], 2);
    }
}
