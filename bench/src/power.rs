//! Measured power, where the machine exposes it: Linux powercap/RAPL energy counters, hwmon
//! power sensors (a Jetson's INA3221 rails among them), NVIDIA GPUs through NVML (loaded at
//! run time, never required), and a Raspberry Pi 5's PMIC through `vcgencmd pmic_read_adc`. [`discover`] finds what a machine has (under a configurable
//! sysfs root, so tests read recorded trees of real boards); a [`Meter`] turns readings into
//! watts, sampled by the harness with its memory samples.
//!
//! One source is used, the most complete first: a Jetson's `VDD_IN` (the whole module), NVIDIA
//! GPUs (every one NVML sees) plus the RAPL packages when there are some, RAPL `psys` (the
//! platform), RAPL packages (CPU sockets, summed), another hwmon power sensor
//! (e.g. a GPU's), a Pi 5's PMIC rails (summed). Others found are listed in the notes.
//!
//! A sensor that cannot be read any more mid-run leaves its samples without power from then
//! on; the run's energy is then not reported (a partial figure would be a wrong number), and
//! the summary says why.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

/// The sysfs root: `EMBER_SYSFS_ROOT` (tests, chroots), else `/`.
pub fn sysfs_root() -> PathBuf {
    std::env::var_os("EMBER_SYSFS_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// How one sensor is read.
#[derive(Clone, Debug, PartialEq)]
enum Probe {
    /// A cumulative energy counter in µJ that wraps at `max_uj` (RAPL).
    EnergyUj { path: PathBuf, max_uj: u64 },
    /// Instantaneous power in µW (hwmon `power*_input` / `power*_average`).
    PowerUw { path: PathBuf },
    /// Bus voltage in mV and current in mA (hwmon `in*_input` / `curr*_input`: INA3221).
    VoltCurr { volt: PathBuf, curr: PathBuf },
    /// `vcgencmd pmic_read_adc` (Raspberry Pi 5): every rail's V × I, summed.
    PiPmic { command: PathBuf },
    /// NVIDIA GPUs through NVML: energy counters, or power.
    Nvml(NvmlHandle),
}

/// A loaded NVML, shared by the meters that read it.
#[derive(Clone, Debug)]
struct NvmlHandle(std::sync::Arc<nvml::Nvml>);

impl PartialEq for NvmlHandle {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

/// A power source: one or more sensors summed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PowerSource {
    /// What is measured, for records: "rapl package-0+package-1", "ina3221 VDD_IN", …
    pub name: String,
    #[serde(skip)]
    probes: Vec<Probe>,
}

/// What [`discover`] found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Discovery {
    /// The source ember uses (None: no sensor).
    pub source: Option<PowerSource>,
    /// Other sources found, and sensors present but unreadable (with why).
    pub notes: Vec<String>,
}

fn read_trim(p: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(p)?.trim().to_string())
}

fn read_u64(p: &Path) -> Result<u64, String> {
    let s = read_trim(p).map_err(|e| format!("{}: {e}", p.display()))?;
    s.parse()
        .map_err(|_| format!("{}: '{s}' is not a number", p.display()))
}

fn sorted_dir(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(p)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// RAPL top-level zones (`intel-rapl:N`): (name, probe), and notes for unreadable ones.
fn rapl(root: &Path, notes: &mut Vec<String>) -> Vec<(String, Probe)> {
    let mut out = vec![];
    for z in sorted_dir(&root.join("sys/class/powercap")) {
        let n = file_name(&z);
        // Top-level zones only (subzones are parts of them); the MMIO interface repeats one.
        if !n.starts_with("intel-rapl:") || n.matches(':').count() != 1 {
            continue;
        }
        let Ok(name) = read_trim(&z.join("name")) else {
            continue;
        };
        let energy = z.join("energy_uj");
        match read_u64(&energy) {
            Ok(_) => {}
            Err(e) => {
                notes.push(format!(
                    "RAPL {name}: present but unreadable ({e}); energy_uj is often root-only: run as root or make it readable"
                ));
                continue;
            }
        }
        let max_uj = read_u64(&z.join("max_energy_range_uj")).unwrap_or(u64::MAX);
        out.push((
            name,
            Probe::EnergyUj {
                path: energy,
                max_uj,
            },
        ));
    }
    out
}

/// hwmon devices: (device name, label, probe) for power sensors and INA3221 rails.
fn hwmon(root: &Path) -> Vec<(String, String, Probe)> {
    let mut out = vec![];
    for h in sorted_dir(&root.join("sys/class/hwmon")) {
        let dev = read_trim(&h.join("name")).unwrap_or_else(|_| file_name(&h));
        for f in sorted_dir(&h) {
            let n = file_name(&f);
            // power1_input, power2_average, … in µW.
            if let Some(rest) = n.strip_prefix("power")
                && let Some(idx) = rest
                    .strip_suffix("_input")
                    .or_else(|| rest.strip_suffix("_average"))
                && idx.chars().all(|c| c.is_ascii_digit())
                && read_u64(&f).is_ok()
            {
                let label = read_trim(&h.join(format!("power{idx}_label")))
                    .unwrap_or_else(|_| format!("power{idx}"));
                // Both _input and _average may exist: keep the first (sorted: _average).
                if !out
                    .iter()
                    .any(|(d, l, _): &(String, String, Probe)| *d == dev && *l == label)
                {
                    out.push((dev.clone(), label, Probe::PowerUw { path: f.clone() }));
                }
            }
            // INA3221-style rails: in{k}_input (mV) with curr{k}_input (mA) and a label.
            if let Some(idx) = n
                .strip_prefix("curr")
                .and_then(|r| r.strip_suffix("_input"))
            {
                let volt = h.join(format!("in{idx}_input"));
                if volt.exists() && read_u64(&f).is_ok() {
                    let label = read_trim(&h.join(format!("in{idx}_label")))
                        .unwrap_or_else(|_| format!("rail{idx}"));
                    out.push((
                        dev.clone(),
                        label,
                        Probe::VoltCurr {
                            volt,
                            curr: f.clone(),
                        },
                    ));
                }
            }
        }
    }
    out
}

/// The `vcgencmd` that asks a Pi 5's PMIC: `EMBER_VCGENCMD` (tests), else the PATH's.
pub fn vcgencmd() -> PathBuf {
    std::env::var_os("EMBER_VCGENCMD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("vcgencmd"))
}

/// `cmd` if it answers `pmic_read_adc` with rail readings.
fn pi_pmic(cmd: &Path) -> Option<PathBuf> {
    let out = std::process::Command::new(cmd)
        .arg("pmic_read_adc")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    (out.status.success() && parse_pmic(&text).is_some()).then(|| cmd.to_path_buf())
}

/// Watts from `vcgencmd pmic_read_adc` output: Σ over rails of volt × current, pairing
/// `NAME_A current(i)=xA` with `NAME_V volt(j)=yV`.
pub fn parse_pmic(text: &str) -> Option<f64> {
    let mut amps = std::collections::BTreeMap::new();
    let mut volts = std::collections::BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some((name, rest)) = line.split_once(' ') else {
            continue;
        };
        let Some((_, value)) = rest.split_once('=') else {
            continue;
        };
        let num = |suffix: char| value.trim().strip_suffix(suffix)?.parse::<f64>().ok();
        if let Some(rail) = name.strip_suffix("_A")
            && let Some(a) = num('A')
        {
            amps.insert(rail.to_string(), a);
        } else if let Some(rail) = name.strip_suffix("_V")
            && let Some(v) = num('V')
        {
            volts.insert(rail.to_string(), v);
        }
    }
    let mut total = 0.0;
    let mut paired = 0;
    for (rail, a) in &amps {
        if let Some(v) = volts.get(rail) {
            total += a * v;
            paired += 1;
        }
    }
    (paired > 0).then_some(total)
}

/// Find the machine's power sensors under `root` (see the module doc for the order): NVML
/// from [`nvml::lib_path`], a Pi 5's PMIC through [`vcgencmd`] when sysfs has nothing.
pub fn discover(root: &Path) -> Discovery {
    discover_with(root, &vcgencmd(), &nvml::lib_path())
}

/// [`discover`] with the `vcgencmd` and NVML library to try.
pub fn discover_with(root: &Path, vcgencmd: &Path, nvml_lib: &Path) -> Discovery {
    let mut d = Discovery::default();
    let rapl = rapl(root, &mut d.notes);
    let hw = hwmon(root);
    let mut candidates: Vec<PowerSource> = vec![];
    // A Jetson's module input rail.
    for (dev, label, p) in &hw {
        if dev.starts_with("ina3221") && label == "VDD_IN" {
            candidates.push(PowerSource {
                name: format!("{dev} {label}"),
                probes: vec![p.clone()],
            });
        }
    }
    let packages: Vec<&(String, Probe)> = rapl
        .iter()
        .filter(|(n, _)| n.starts_with("package"))
        .collect();
    // NVIDIA GPUs, with the CPU packages when RAPL has them: the machine's compute.
    match nvml::Nvml::open(nvml_lib) {
        Ok(n) => {
            let mut name = format!("nvml {}", n.name);
            let mut probes = vec![Probe::Nvml(NvmlHandle(std::sync::Arc::new(n)))];
            if !packages.is_empty() {
                name.push_str(" + rapl ");
                name.push_str(
                    &packages
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join("+"),
                );
                probes.extend(packages.iter().map(|(_, p)| p.clone()));
            }
            candidates.push(PowerSource { name, probes });
        }
        // No library is the usual case, not worth a note; a library that fails is.
        Err(e) if !e.contains("cannot open shared object") => d.notes.push(format!("NVML: {e}")),
        Err(_) => {}
    }
    if let Some((_, p)) = rapl.iter().find(|(n, _)| n == "psys") {
        candidates.push(PowerSource {
            name: "rapl psys".into(),
            probes: vec![p.clone()],
        });
    }
    if !packages.is_empty() {
        candidates.push(PowerSource {
            name: format!(
                "rapl {}",
                packages
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join("+")
            ),
            probes: packages.iter().map(|(_, p)| p.clone()).collect(),
        });
    }
    for (dev, label, p) in &hw {
        if matches!(p, Probe::PowerUw { .. }) {
            candidates.push(PowerSource {
                name: format!("hwmon {dev} {label}"),
                probes: vec![p.clone()],
            });
        }
    }
    // INA3221 without VDD_IN: every rail summed.
    let rails: Vec<&(String, String, Probe)> = hw
        .iter()
        .filter(|(dev, _, p)| dev.starts_with("ina3221") && matches!(p, Probe::VoltCurr { .. }))
        .collect();
    if !rails.is_empty() && !rails.iter().any(|(_, l, _)| l == "VDD_IN") {
        candidates.push(PowerSource {
            name: format!(
                "{} rails {}",
                rails[0].0,
                rails
                    .iter()
                    .map(|(_, l, _)| l.as_str())
                    .collect::<Vec<_>>()
                    .join("+")
            ),
            probes: rails.iter().map(|(_, _, p)| p.clone()).collect(),
        });
    }
    if candidates.is_empty()
        && let Some(command) = pi_pmic(vcgencmd)
    {
        candidates.push(PowerSource {
            name: "pi5 pmic (all rails)".into(),
            probes: vec![Probe::PiPmic { command }],
        });
    }
    let mut it = candidates.into_iter();
    d.source = it.next();
    for other in it {
        d.notes
            .push(format!("also found: {} (not used)", other.name));
    }
    d
}

/// Reads a [`PowerSource`] into watts: the mean over the interval since the previous read for
/// energy counters, the instantaneous value for power sensors.
#[derive(Debug)]
pub struct Meter {
    pub source: PowerSource,
    last: Option<(Instant, Vec<u64>)>,
    /// Set at the first failed read; every later read fails with it.
    failed: Option<String>,
}

impl Meter {
    /// A meter over `source`, read once (so that a counter's first reading has an interval).
    pub fn new(source: PowerSource) -> Meter {
        let mut m = Meter {
            source,
            last: None,
            failed: None,
        };
        let _ = m.read(Instant::now());
        m
    }

    /// Watts now (None at the first read of a counter: no interval yet). Err once the
    /// source could not be read (and from then on).
    pub fn read(&mut self, now: Instant) -> Result<Option<f64>, String> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.read_inner(now) {
            Ok(w) => Ok(w),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    fn read_inner(&mut self, now: Instant) -> Result<Option<f64>, String> {
        let mut watts = 0.0;
        let mut counters = vec![];
        let mut maxes = vec![];
        for p in &self.source.probes {
            match p {
                Probe::EnergyUj { path, max_uj } => {
                    counters.push(read_u64(path)?);
                    maxes.push(*max_uj);
                }
                Probe::PowerUw { path } => watts += read_u64(path)? as f64 / 1e6,
                Probe::VoltCurr { volt, curr } => {
                    watts += read_u64(volt)? as f64 * read_u64(curr)? as f64 / 1e6
                }
                Probe::Nvml(h) => match h.0.read()? {
                    nvml::Reading::EnergyUj(uj) => {
                        counters.push(uj);
                        maxes.push(u64::MAX);
                    }
                    nvml::Reading::Watts(w) => watts += w,
                },
                Probe::PiPmic { command } => {
                    let out = std::process::Command::new(command)
                        .arg("pmic_read_adc")
                        .output()
                        .map_err(|e| format!("{}: {e}", command.display()))?;
                    watts +=
                        parse_pmic(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| {
                            format!("{} pmic_read_adc: no rail readings", command.display())
                        })?;
                }
            }
        }
        if counters.is_empty() {
            return Ok(Some(watts));
        }
        let prev = self.last.replace((now, counters.clone()));
        let Some((t, before)) = prev else {
            return Ok(None);
        };
        let dt = now.saturating_duration_since(t).as_secs_f64();
        if dt <= 0.0 {
            return Ok(None);
        }
        let mut uj = 0u64;
        for ((&a, &b), &max) in before.iter().zip(&counters).zip(&maxes) {
            // A counter wraps at max_energy_range_uj.
            uj += if b >= a {
                b - a
            } else {
                max.saturating_sub(a) + b
            };
        }
        Ok(Some(watts + uj as f64 / 1e6 / dt))
    }
}

/// Energy over a window from power readings `(t_ns, watts)` in time order, each the mean power
/// since the previous reading (exact for counters; a step rule for instantaneous sensors).
/// None when the readings do not span the window (the sensor was not read, or failed).
pub fn energy_j(readings: &[(u64, f64)], from_ns: u64, to_ns: u64) -> Option<f64> {
    if to_ns <= from_ns {
        return None;
    }
    let mut joules = 0.0;
    let mut covered = 0u64;
    for w in readings.windows(2) {
        let ((t0, _), (t1, watts)) = (w[0], w[1]);
        let (a, b) = (t0.max(from_ns), t1.min(to_ns));
        if b > a {
            joules += watts * (b - a) as f64 / 1e9;
            covered += b - a;
        }
    }
    // The readings must span the window (a sampling interval's slack at the ends is scaled).
    let span = to_ns - from_ns;
    (covered as f64 >= 0.9 * span as f64).then(|| joules * span as f64 / covered as f64)
}

/// Energy of a run, measured or estimated (never mixed: `kind` says which).
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Energy {
    /// "measured" (a sensor) or "estimate" (a profile's typical power × the window).
    pub kind: String,
    /// The sensor, or the profile whose `typical_power_w` was used.
    pub source: String,
    pub joules: f64,
    pub mean_w: f64,
    pub j_per_output_token: Option<f64>,
    pub output_tokens_per_j: Option<f64>,
}

impl Energy {
    pub fn new(kind: &str, source: &str, joules: f64, window_s: f64, output_tokens: u64) -> Energy {
        let tok = output_tokens as f64;
        Energy {
            kind: kind.into(),
            source: source.into(),
            joules,
            mean_w: if window_s > 0.0 {
                joules / window_s
            } else {
                0.0
            },
            j_per_output_token: (tok > 0.0).then(|| joules / tok),
            output_tokens_per_j: (joules > 0.0).then(|| tok / joules),
        }
    }

    /// "412.3 J measured (rapl package-0) · 7.9 W mean · 0.531 J/output token · 1.88 tokens/J".
    pub fn text(&self) -> String {
        let mut s = format!(
            "{:.1} J {} ({}) · {:.2} W mean",
            self.joules, self.kind, self.source, self.mean_w
        );
        if let (Some(j), Some(t)) = (self.j_per_output_token, self.output_tokens_per_j) {
            s.push_str(&format!(" · {j:.4} J/output token · {t:.2} tokens/J"));
        }
        s
    }
}

/// The measured energy of the measured window `[from_ns, to_ns]` from a run's memory samples,
/// or why there is none although a sensor was read.
pub fn measured_energy(
    memory: &[crate::record::MemorySample],
    from_ns: u64,
    to_ns: u64,
) -> Option<f64> {
    let readings: Vec<(u64, f64)> = memory
        .iter()
        .filter_map(|m| Some((m.t_ns, m.power_w?)))
        .collect();
    if readings.is_empty() {
        return None;
    }
    energy_j(&readings, from_ns, to_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pmic_output_pairs_volts_with_amps() {
        let text = "  VDD_CORE_A current(7)=2.00000000A\n  VDD_CORE_V volt(15)=0.80000000V\n  EXT5V_V volt(24)=5.10000000V\n  3V3_SYS_A current(1)=0.10000000A\n  3V3_SYS_V volt(9)=3.30000000V\n";
        let w = parse_pmic(text).unwrap();
        assert!((w - (1.6 + 0.33)).abs() < 1e-9, "{w}");
        assert_eq!(
            parse_pmic("error=1 error_msg=\"Command not registered\""),
            None
        );
    }

    #[test]
    fn energy_integrates_the_window_and_refuses_a_gap() {
        let s = [(0, 0.0), (1_000_000_000, 10.0), (2_000_000_000, 20.0)];
        // 10 W over 0–1 s, 20 W over 1–2 s.
        assert!((energy_j(&s, 0, 2_000_000_000).unwrap() - 30.0).abs() < 1e-9);
        assert!((energy_j(&s, 500_000_000, 1_500_000_000).unwrap() - 15.0).abs() < 1e-9);
        // Readings that stop early (a sensor gone) do not pass for the whole window.
        assert_eq!(energy_j(&s[..2], 0, 2_000_000_000), None);
    }
}

/// NVIDIA's management library, loaded at run time (`libnvidia-ml.so.1`, or
/// `EMBER_NVML_LIB`): every GPU's energy counter (Volta and later) or, failing that, its
/// power draw.
pub mod nvml {
    use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void};

    type Device = *mut c_void;
    type EnergyFn = unsafe extern "C" fn(Device, *mut c_ulonglong) -> c_int;
    type PowerFn = unsafe extern "C" fn(Device, *mut c_uint) -> c_int;

    /// An initialised NVML and the GPUs it sees.
    pub struct Nvml {
        // Kept loaded while the function pointers below are used.
        _lib: libloading::Library,
        devices: Vec<Device>,
        energy: EnergyFn,
        power: PowerFn,
        /// Whether every GPU answers the energy counter (else power is read).
        pub counts_energy: bool,
        /// "NVIDIA H100 80GB HBM3" (× n).
        pub name: String,
    }

    // SAFETY: NVML is thread-safe (its documentation); the handles are opaque pointers it
    // owns for the life of the process.
    unsafe impl Send for Nvml {}
    unsafe impl Sync for Nvml {}

    impl std::fmt::Debug for Nvml {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Nvml({}, {} GPUs)", self.name, self.devices.len())
        }
    }

    /// One reading: microjoules since an arbitrary origin, or watts now.
    pub enum Reading {
        EnergyUj(u64),
        Watts(f64),
    }

    /// The NVML to load: `EMBER_NVML_LIB` (tests), else the driver's `libnvidia-ml.so.1`.
    pub fn lib_path() -> std::path::PathBuf {
        std::env::var_os("EMBER_NVML_LIB")
            .map(Into::into)
            .unwrap_or_else(|| "libnvidia-ml.so.1".into())
    }

    impl Nvml {
        /// Load and initialise the NVML at `path`; Err says why not (no library is the usual
        /// case).
        pub fn open(path: &std::path::Path) -> Result<Nvml, String> {
            // SAFETY: loading NVML runs its initialisers, which have no preconditions.
            let lib = unsafe { libloading::Library::new(path) }
                .map_err(|e| format!("{}: {e}", path.display()))?;
            // SAFETY: the symbols have these C signatures in every NVML since 2015 (nvml.h).
            unsafe {
                let init: libloading::Symbol<unsafe extern "C" fn() -> c_int> = lib
                    .get(b"nvmlInit_v2\0")
                    .map_err(|e| format!("nvmlInit_v2: {e}"))?;
                let count: libloading::Symbol<unsafe extern "C" fn(*mut c_uint) -> c_int> = lib
                    .get(b"nvmlDeviceGetCount_v2\0")
                    .map_err(|e| format!("nvmlDeviceGetCount_v2: {e}"))?;
                let by_index: libloading::Symbol<
                    unsafe extern "C" fn(c_uint, *mut Device) -> c_int,
                > = lib
                    .get(b"nvmlDeviceGetHandleByIndex_v2\0")
                    .map_err(|e| format!("nvmlDeviceGetHandleByIndex_v2: {e}"))?;
                let name_fn: libloading::Symbol<
                    unsafe extern "C" fn(Device, *mut c_char, c_uint) -> c_int,
                > = lib
                    .get(b"nvmlDeviceGetName\0")
                    .map_err(|e| format!("nvmlDeviceGetName: {e}"))?;
                let energy: EnergyFn = *lib
                    .get::<EnergyFn>(b"nvmlDeviceGetTotalEnergyConsumption\0")
                    .map_err(|e| format!("nvmlDeviceGetTotalEnergyConsumption: {e}"))?;
                let power: PowerFn = *lib
                    .get::<PowerFn>(b"nvmlDeviceGetPowerUsage\0")
                    .map_err(|e| format!("nvmlDeviceGetPowerUsage: {e}"))?;
                let rc = init();
                if rc != 0 {
                    return Err(format!("nvmlInit_v2 failed (NVML error {rc})"));
                }
                let mut n: c_uint = 0;
                let rc = count(&mut n);
                if rc != 0 || n == 0 {
                    return Err(format!(
                        "no GPU (nvmlDeviceGetCount_v2: error {rc}, {n} devices)"
                    ));
                }
                let mut devices = vec![];
                for i in 0..n {
                    let mut d: Device = std::ptr::null_mut();
                    let rc = by_index(i, &mut d);
                    if rc != 0 {
                        return Err(format!("nvmlDeviceGetHandleByIndex_v2({i}): error {rc}"));
                    }
                    devices.push(d);
                }
                let mut buf = [0 as c_char; 96];
                let name = if name_fn(devices[0], buf.as_mut_ptr(), buf.len() as c_uint) == 0 {
                    std::ffi::CStr::from_ptr(buf.as_ptr())
                        .to_string_lossy()
                        .into_owned()
                } else {
                    "NVIDIA GPU".into()
                };
                let counts_energy = devices.iter().all(|&d| {
                    let mut mj: c_ulonglong = 0;
                    energy(d, &mut mj) == 0
                });
                let name = if n > 1 { format!("{name} ×{n}") } else { name };
                Ok(Nvml {
                    _lib: lib,
                    devices,
                    energy,
                    power,
                    counts_energy,
                    name,
                })
            }
        }

        /// Every GPU's energy (µJ) or power (W), summed.
        pub fn read(&self) -> Result<Reading, String> {
            if self.counts_energy {
                let mut total = 0u64;
                for &d in &self.devices {
                    let mut mj: c_ulonglong = 0;
                    // SAFETY: a handle NVML gave us, and a valid out-pointer.
                    let rc = unsafe { (self.energy)(d, &mut mj) };
                    if rc != 0 {
                        return Err(format!("nvmlDeviceGetTotalEnergyConsumption: error {rc}"));
                    }
                    total += mj * 1000;
                }
                Ok(Reading::EnergyUj(total))
            } else {
                let mut w = 0.0;
                for &d in &self.devices {
                    let mut mw: c_uint = 0;
                    // SAFETY: as above.
                    let rc = unsafe { (self.power)(d, &mut mw) };
                    if rc != 0 {
                        return Err(format!("nvmlDeviceGetPowerUsage: error {rc}"));
                    }
                    w += mw as f64 / 1000.0;
                }
                Ok(Reading::Watts(w))
            }
        }
    }
}
