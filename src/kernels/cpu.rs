//! The CPU facts the kernels dispatch on, read once per process (at first use) rather than tuned
//! into constants: the L1d and L2 sizes per core, the instruction-set features, and from them the
//! [`KernelPath`] the hand-written kernels take.
//!
//! - **Caches** come from sysfs, `/sys/devices/system/cpu/cpu0/cache/index*/{level,type,size}`
//!   (the L1 data cache and the L2 of cpu0; `size` is one cache instance, which on the x86 server
//!   parts this project runs on is one core's). Where that cannot be read (not Linux, a
//!   container hiding `/sys`) the sizes fall back to [`FALLBACK_L1D_BYTES`] and
//!   [`FALLBACK_L2_BYTES`], the smallest of the machines measured so far (AMD Zen 3).
//! - **Features** come from `is_x86_feature_detected!` (CPUID): `avx2`, `fma`, `avx512f`,
//!   `avx512vl`.
//! - **The path** is the best one the features allow ([`KernelPath::Avx512`] needs F and VL,
//!   [`KernelPath::Avx2`] needs AVX2 and FMA, [`KernelPath::Portable`] nothing). The environment
//!   variable [`PATH_VARIABLE`] (`SPLITAUX_KERNEL_PATH=avx512|avx2|portable`, or `auto`) forces
//!   one, so that every branch can be run on any machine. A forced path this CPU lacks is never
//!   run: the best supported path *below* it runs instead, with a one-time warning on stderr;
//!   an unrecognized value is warned about and ignored.
//!
//! Invariant the kernels' `unsafe` code relies on: [`kernel_path`] returns a path whose
//! instructions this CPU has ([`KernelPath::supported`] by the detected [`Features`]).
//!
//! The `gemm` crate (the im2col path's product, see `gemm.rs`) chooses its own microkernel
//! (AVX-512F, else FMA, else scalar) and offers no way to force one, so the variable does not
//! reach it.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;

/// L1 data cache per core assumed when sysfs cannot be read: 32 KiB (AMD Zen 3/4; Intel server
/// cores since Ice Lake have 48 KiB, so this errs small).
pub const FALLBACK_L1D_BYTES: usize = 32 * 1024;

/// L2 cache per core assumed when sysfs cannot be read: 512 KiB (AMD Zen 3; Zen 4 has 1 MiB,
/// Intel Sapphire Rapids 2 MiB, so this errs small).
pub const FALLBACK_L2_BYTES: usize = 512 * 1024;

/// The environment variable that forces a [`KernelPath`]: `avx512`, `avx2`, `portable`, or
/// `auto` (the default: chosen by the CPU). Case and surrounding whitespace are ignored.
pub const PATH_VARIABLE: &str = "SPLITAUX_KERNEL_PATH";

/// Where sysfs lists cpu0's caches.
const SYSFS_CACHE_DIR: &str = "/sys/devices/system/cpu/cpu0/cache";

/// Which family of hand-written kernels runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// AVX-512 F + VL: the direct convolution's 512-bit tiles (`direct/avx512.rs`).
    Avx512,
    /// AVX2 + FMA (8 lanes, 16 ymm registers): the direct convolution's 256-bit tiles
    /// (`direct/avx2.rs`), which add in the same order as the 512-bit ones.
    Avx2,
    /// No SIMD of our own: every convolution through im2col + GEMM (BatchNorm is the same on
    /// every path).
    Portable,
}

impl KernelPath {
    /// The name [`PATH_VARIABLE`] takes and [`describe`] prints.
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Avx512 => "avx512",
            KernelPath::Avx2 => "avx2",
            KernelPath::Portable => "portable",
        }
    }

    /// Whether a CPU with `features` can run this path's instructions.
    pub fn supported(self, features: Features) -> bool {
        match self {
            KernelPath::Avx512 => features.avx512f && features.avx512vl,
            KernelPath::Avx2 => features.avx2 && features.fma,
            KernelPath::Portable => true,
        }
    }

    /// The best path a CPU with `features` supports.
    pub fn best(features: Features) -> Self {
        KernelPath::Avx512
            .fallbacks()
            .iter()
            .copied()
            .find(|p| p.supported(features))
            .unwrap_or(KernelPath::Portable)
    }

    /// This path and the ones below it, best first: what may run when this one is forced.
    fn fallbacks(self) -> &'static [KernelPath] {
        match self {
            KernelPath::Avx512 => &[KernelPath::Avx512, KernelPath::Avx2, KernelPath::Portable],
            KernelPath::Avx2 => &[KernelPath::Avx2, KernelPath::Portable],
            KernelPath::Portable => &[KernelPath::Portable],
        }
    }

    /// The features this path needs, for the warning when they are missing.
    fn requires(self) -> &'static str {
        match self {
            KernelPath::Avx512 => "avx512f and avx512vl",
            KernelPath::Avx2 => "avx2 and fma",
            KernelPath::Portable => "nothing",
        }
    }
}

impl fmt::Display for KernelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KernelPath {
    type Err = String;

    /// `avx512`, `avx2` or `portable`, in any case, surrounding whitespace ignored.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "avx512" => Ok(KernelPath::Avx512),
            "avx2" => Ok(KernelPath::Avx2),
            "portable" => Ok(KernelPath::Portable),
            _ => Err(format!(
                "{PATH_VARIABLE}={s:?} is not one of avx512, avx2, portable, auto"
            )),
        }
    }
}

/// The path a value of [`PATH_VARIABLE`] forces: `Ok(None)` for `auto` or an empty value
/// (choose by the CPU), `Err` for anything unrecognized.
pub fn parse_override(value: &str) -> Result<Option<KernelPath>, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "auto" => Ok(None),
        _ => value.parse::<KernelPath>().map(Some),
    }
}

/// The instruction-set features the kernels dispatch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    pub avx512vl: bool,
}

impl Features {
    /// This CPU's features (CPUID, through the standard library's cached detection).
    #[cfg(target_arch = "x86_64")]
    pub fn detect() -> Self {
        Self {
            avx2: std::arch::is_x86_feature_detected!("avx2"),
            fma: std::arch::is_x86_feature_detected!("fma"),
            avx512f: std::arch::is_x86_feature_detected!("avx512f"),
            avx512vl: std::arch::is_x86_feature_detected!("avx512vl"),
        }
    }

    /// None of them off x86-64 (the kernels' intrinsics are x86-64 only).
    #[cfg(not(target_arch = "x86_64"))]
    pub fn detect() -> Self {
        Self::default()
    }

    /// The names of the features present, in a fixed order.
    fn names(self) -> Vec<&'static str> {
        [
            (self.avx2, "avx2"),
            (self.fma, "fma"),
            (self.avx512f, "avx512f"),
            (self.avx512vl, "avx512vl"),
        ]
        .into_iter()
        .filter_map(|(present, name)| present.then_some(name))
        .collect()
    }
}

/// The path to run: the best `features` allow, or `forced` if they allow it, else the best
/// supported path below `forced` together with a warning. The result is always
/// [`KernelPath::supported`] by `features`.
fn resolve(features: Features, forced: Option<KernelPath>) -> (KernelPath, Option<String>) {
    let Some(wanted) = forced else {
        return (KernelPath::best(features), None);
    };
    let chosen = wanted
        .fallbacks()
        .iter()
        .copied()
        .find(|p| p.supported(features))
        .unwrap_or(KernelPath::Portable);
    let warning = (chosen != wanted).then(|| {
        format!(
            "{PATH_VARIABLE}={wanted}: this CPU lacks {}; running the {chosen} kernels instead",
            wanted.requires()
        )
    });
    (chosen, warning)
}

/// [`PATH_VARIABLE`] from the environment: the forced path, or a warning for a value that is
/// not one.
fn forced_from_env() -> (Option<KernelPath>, Option<String>) {
    match std::env::var(PATH_VARIABLE) {
        Ok(value) => match parse_override(&value) {
            Ok(forced) => (forced, None),
            Err(message) => (None, Some(format!("{message}; choosing by the CPU"))),
        },
        Err(std::env::VarError::NotPresent) => (None, None),
        Err(std::env::VarError::NotUnicode(value)) => (
            None,
            Some(format!(
                "{PATH_VARIABLE}={value:?} is not one of avx512, avx2, portable, auto; choosing \
                 by the CPU"
            )),
        ),
    }
}

/// Bytes of a sysfs cache `size` string: digits and an optional unit, `K` (KiB, what Linux
/// writes: "32K", "512K", "2048K", "32768K"), `M` or `G`; `None` if malformed or zero.
fn parse_cache_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let count: usize = digits.parse().ok()?;
    let scale: usize = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return None,
    };
    count.checked_mul(scale).filter(|&bytes| bytes > 0)
}

/// Sizes in bytes of the L1 data cache and the L2 cache listed in `dir` (sysfs's
/// `cpu0/cache`, one `index*` folder per cache with `level`, `type` and `size`); `None` for a
/// level that is not listed or cannot be read.
fn read_caches(dir: &Path) -> (Option<usize>, Option<usize>) {
    let (mut l1d, mut l2) = (None, None);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (l1d, l2);
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with("index") {
            continue;
        }
        let folder = entry.path();
        let read = |name: &str| std::fs::read_to_string(folder.join(name)).ok();
        let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size"))
        else {
            continue;
        };
        let Some(bytes) = parse_cache_size(&size) else {
            continue;
        };
        match (level.trim(), kind.trim()) {
            ("1", "Data" | "Unified") => l1d = Some(bytes),
            ("2", "Data" | "Unified") => l2 = Some(bytes),
            _ => {}
        }
    }
    (l1d, l2)
}

/// What `/proc/cpuinfo` says of the first processor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct CpuInfo {
    model_name: Option<String>,
    family: Option<u32>,
    model: Option<u32>,
    /// Which of [`NAMED_FLAGS`] the flags list (informational).
    named_flags: Vec<&'static str>,
}

/// `/proc/cpuinfo` flags that tell CPU kinds apart in a speed table (which AVX-512 extensions,
/// whether AMX), named by `bench --cpu` although no kernel uses them: lower precision changes
/// results and is left out.
const NAMED_FLAGS: [&str; 7] = [
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
];

/// The first processor's block of a `/proc/cpuinfo` text (`key : value` lines, blocks
/// separated by blank lines).
fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut info = CpuInfo::default();
    let mut in_block = false;
    for line in text.lines() {
        if line.trim().is_empty() {
            if in_block {
                break;
            }
            continue;
        }
        in_block = true;
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "model name" => info.model_name = Some(value.to_string()),
            "cpu family" => info.family = value.parse().ok(),
            "model" => info.model = value.parse().ok(),
            "flags" => {
                let flags: Vec<&str> = value.split_whitespace().collect();
                info.named_flags = NAMED_FLAGS
                    .into_iter()
                    .filter(|name| flags.contains(name))
                    .collect();
            }
            _ => {}
        }
    }
    info
}

/// `2 MiB`, `512 KiB`, `1000 B`.
fn format_size(bytes: usize) -> String {
    const KIB: usize = 1 << 10;
    const MIB: usize = 1 << 20;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes.is_multiple_of(KIB) {
        format!("{} KiB", bytes / KIB)
    } else {
        format!("{bytes} B")
    }
}

/// The CPU facts, as read once by [`cpu`].
#[derive(Debug, Clone)]
pub struct Cpu {
    /// `model name` from `/proc/cpuinfo`.
    pub model_name: Option<String>,
    /// `cpu family` and `model` from `/proc/cpuinfo` (decimal, as Linux prints them).
    pub family: Option<u32>,
    pub model: Option<u32>,
    /// Which of [`NAMED_FLAGS`] `/proc/cpuinfo` lists (informational).
    pub named_flags: Vec<&'static str>,
    /// L1 data cache per core, bytes (sysfs, else [`FALLBACK_L1D_BYTES`]).
    pub l1d_bytes: usize,
    /// L2 cache per core, bytes (sysfs, else [`FALLBACK_L2_BYTES`]).
    pub l2_bytes: usize,
    /// Whether `l1d_bytes` and `l2_bytes` were read (false: the fallback).
    pub l1d_read: bool,
    pub l2_read: bool,
    pub features: Features,
    /// What [`PATH_VARIABLE`] asked for, if anything.
    pub forced: Option<KernelPath>,
    /// The path the kernels take (always supported by `features`).
    pub path: KernelPath,
}

impl Cpu {
    /// Reads everything, printing the override's warnings (once: [`cpu`] calls this once).
    fn detect() -> Self {
        let features = Features::detect();
        let (forced, parse_warning) = forced_from_env();
        let (path, fallback_warning) = resolve(features, forced);
        for warning in [parse_warning, fallback_warning].into_iter().flatten() {
            eprintln!("warning: {warning}");
        }
        let (l1d, l2) = read_caches(Path::new(SYSFS_CACHE_DIR));
        let info = std::fs::read_to_string("/proc/cpuinfo")
            .map(|text| parse_cpuinfo(&text))
            .unwrap_or_default();
        Self {
            model_name: info.model_name,
            family: info.family,
            model: info.model,
            named_flags: info.named_flags,
            l1d_bytes: l1d.unwrap_or(FALLBACK_L1D_BYTES),
            l2_bytes: l2.unwrap_or(FALLBACK_L2_BYTES),
            l1d_read: l1d.is_some(),
            l2_read: l2.is_some(),
            features,
            forced,
            path,
        }
    }

    /// One line: `cpu: AMD EPYC 7B13 (family 25 model 1), L1d 32 KiB, L2 512 KiB, avx2 fma;
    /// kernels: avx2`. Sizes that fell back are marked `(assumed)`; a forced path is marked
    /// `(forced)`, or `(SPLITAUX_KERNEL_PATH=… unsupported)` when it fell back.
    pub fn describe(&self) -> String {
        let name = self.model_name.as_deref().unwrap_or("unknown CPU");
        let family = match (self.family, self.model) {
            (Some(family), Some(model)) => format!(" (family {family} model {model})"),
            _ => String::new(),
        };
        let assumed = |read: bool| if read { "" } else { " (assumed)" };
        let mut features = self.features.names();
        features.extend(&self.named_flags);
        let features = if features.is_empty() {
            "no avx2/fma/avx512".to_string()
        } else {
            features.join(" ")
        };
        let note = match self.forced {
            Some(wanted) if wanted == self.path => " (forced)".to_string(),
            Some(wanted) => format!(" ({PATH_VARIABLE}={wanted} unsupported)"),
            None => String::new(),
        };
        format!(
            "cpu: {name}{family}, L1d {}{}, L2 {}{}, {features}; kernels: {}{note}",
            format_size(self.l1d_bytes),
            assumed(self.l1d_read),
            format_size(self.l2_bytes),
            assumed(self.l2_read),
            self.path,
        )
    }
}

/// The CPU facts, read on the first call.
pub fn cpu() -> &'static Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    CPU.get_or_init(Cpu::detect)
}

/// The path the kernels take (see the module documentation).
pub fn kernel_path() -> KernelPath {
    cpu().path
}

/// Whether the kernels' element-wise passes (BatchNorm, see `vectorize.rs`) run compiled for
/// AVX2 + FMA: on the AVX2 and AVX-512 paths (so `SPLITAUX_KERNEL_PATH=portable` turns it off),
/// on a CPU with both (every AVX-512 CPU so far has them).
pub fn avx2_passes() -> bool {
    let c = cpu();
    c.path != KernelPath::Portable && KernelPath::Avx2.supported(c.features)
}

/// L1 data cache per core, bytes.
pub fn l1d_bytes() -> usize {
    cpu().l1d_bytes
}

/// L2 cache per core, bytes.
pub fn l2_bytes() -> usize {
    cpu().l2_bytes
}

/// One line naming the CPU, its caches and features, and the kernel path (see
/// [`Cpu::describe`]).
pub fn describe() -> String {
    cpu().describe()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_cache_sizes_parse() {
        assert_eq!(parse_cache_size("512K"), Some(512 * 1024));
        assert_eq!(parse_cache_size("32768K\n"), Some(32 * 1024 * 1024));
        assert_eq!(parse_cache_size("2048K"), Some(2 * 1024 * 1024));
        assert_eq!(parse_cache_size("1M"), Some(1024 * 1024));
        assert_eq!(parse_cache_size("48K"), Some(48 * 1024));
        assert_eq!(parse_cache_size(" 32K "), Some(32 * 1024));
        assert_eq!(parse_cache_size("65536"), Some(65536));
        assert_eq!(parse_cache_size(""), None);
        assert_eq!(parse_cache_size("K"), None);
        assert_eq!(parse_cache_size("0K"), None);
        assert_eq!(parse_cache_size("12Q"), None);
        assert_eq!(parse_cache_size("-1K"), None);
    }

    #[test]
    fn caches_are_read_from_a_sysfs_listing() {
        let dir = tempfile::tempdir().unwrap();
        for (index, level, kind, size) in [
            (0, "1", "Data", "48K"),
            (1, "1", "Instruction", "32K"),
            (2, "2", "Unified", "2048K"),
            (3, "3", "Unified", "107520K"),
        ] {
            let folder = dir.path().join(format!("index{index}"));
            std::fs::create_dir(&folder).unwrap();
            std::fs::write(folder.join("level"), format!("{level}\n")).unwrap();
            std::fs::write(folder.join("type"), format!("{kind}\n")).unwrap();
            std::fs::write(folder.join("size"), format!("{size}\n")).unwrap();
        }
        std::fs::write(dir.path().join("uevent"), "").unwrap();
        assert_eq!(
            read_caches(dir.path()),
            (Some(48 * 1024), Some(2 * 1024 * 1024))
        );
        assert_eq!(read_caches(&dir.path().join("missing")), (None, None));
    }

    #[test]
    fn the_override_parses() {
        assert_eq!(parse_override("avx512"), Ok(Some(KernelPath::Avx512)));
        assert_eq!(parse_override("AVX2"), Ok(Some(KernelPath::Avx2)));
        assert_eq!(
            parse_override(" portable\n"),
            Ok(Some(KernelPath::Portable))
        );
        assert_eq!(parse_override("auto"), Ok(None));
        assert_eq!(parse_override(""), Ok(None));
        assert!(parse_override("avx-512").is_err());
        assert!(parse_override("sse2").is_err());
        for path in [KernelPath::Avx512, KernelPath::Avx2, KernelPath::Portable] {
            assert_eq!(parse_override(path.name()), Ok(Some(path)));
        }
    }

    /// Every combination of features and override resolves to a path the features support,
    /// never above the forced one, and the forced one whenever it is supported.
    #[test]
    fn a_forced_path_falls_back_to_a_supported_one() {
        let all = [KernelPath::Avx512, KernelPath::Avx2, KernelPath::Portable];
        let rank = |p: KernelPath| all.iter().position(|&q| q == p).unwrap();
        for bits in 0..16u8 {
            let features = Features {
                avx2: bits & 1 != 0,
                fma: bits & 2 != 0,
                avx512f: bits & 4 != 0,
                avx512vl: bits & 8 != 0,
            };
            let (auto, warning) = resolve(features, None);
            assert!(auto.supported(features) && warning.is_none());
            assert_eq!(auto, KernelPath::best(features));
            for wanted in all {
                let (chosen, warning) = resolve(features, Some(wanted));
                assert!(chosen.supported(features), "{features:?} {wanted}");
                assert!(rank(chosen) >= rank(wanted), "{features:?} {wanted}");
                assert_eq!(chosen == wanted, wanted.supported(features));
                assert_eq!(warning.is_some(), chosen != wanted);
            }
        }
        let avx2_only = Features {
            avx2: true,
            fma: true,
            ..Features::default()
        };
        assert_eq!(
            resolve(avx2_only, Some(KernelPath::Avx512)).0,
            KernelPath::Avx2
        );
        assert_eq!(
            resolve(Features::default(), Some(KernelPath::Avx2)).0,
            KernelPath::Portable
        );
    }

    #[test]
    fn cpuinfo_parses_the_first_processor() {
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n\
                    model\t\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma avx512_bf16 amx_int8 avx512bw\n\n\
                    processor\t: 1\ncpu family\t: 6\nmodel\t\t: 167\nmodel name\t: Other\n\
                    flags\t\t: amx_tile\n";
        assert_eq!(
            parse_cpuinfo(text),
            CpuInfo {
                model_name: Some("AMD EPYC 7B13".to_string()),
                family: Some(25),
                model: Some(1),
                named_flags: vec!["avx512bw", "avx512_bf16", "amx_int8"],
            }
        );
        assert_eq!(parse_cpuinfo(""), CpuInfo::default());
    }

    #[test]
    fn the_description_is_one_line() {
        let cpu = Cpu {
            model_name: Some("AMD EPYC 7B13".to_string()),
            family: Some(25),
            model: Some(1),
            named_flags: vec![],
            l1d_bytes: 32 * 1024,
            l2_bytes: 512 * 1024,
            l1d_read: true,
            l2_read: true,
            features: Features {
                avx2: true,
                fma: true,
                ..Features::default()
            },
            forced: None,
            path: KernelPath::Avx2,
        };
        assert_eq!(
            cpu.describe(),
            "cpu: AMD EPYC 7B13 (family 25 model 1), L1d 32 KiB, L2 512 KiB, avx2 fma; \
             kernels: avx2"
        );
        let forced = Cpu {
            l2_bytes: 2 * 1024 * 1024,
            l2_read: false,
            forced: Some(KernelPath::Avx512),
            ..cpu.clone()
        };
        assert_eq!(
            forced.describe(),
            "cpu: AMD EPYC 7B13 (family 25 model 1), L1d 32 KiB, L2 2 MiB (assumed), avx2 fma; \
             kernels: avx2 (SPLITAUX_KERNEL_PATH=avx512 unsupported)"
        );
        let xeon = Cpu {
            model_name: Some("Intel(R) Xeon(R) Processor".to_string()),
            family: Some(6),
            model: Some(207),
            named_flags: vec!["avx512bw", "avx512_fp16", "amx_tile"],
            l1d_bytes: 48 * 1024,
            features: Features {
                avx2: true,
                fma: true,
                avx512f: true,
                avx512vl: true,
            },
            path: KernelPath::Avx512,
            ..forced.clone()
        };
        assert_eq!(
            xeon.describe(),
            "cpu: Intel(R) Xeon(R) Processor (family 6 model 207), L1d 48 KiB, L2 2 MiB \
             (assumed), avx2 fma avx512f avx512vl avx512bw avx512_fp16 amx_tile; kernels: avx512 \
             (forced)"
        );
        assert!(!describe().contains('\n'));
    }

    /// The path this process runs is one this CPU supports (whatever the environment forces).
    #[test]
    fn this_cpu_runs_a_supported_path() {
        let cpu = cpu();
        assert!(cpu.path.supported(Features::detect()));
        assert_eq!(kernel_path(), cpu.path);
        assert!(l1d_bytes() > 0 && l2_bytes() > 0);
    }
}
