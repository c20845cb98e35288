//! Measured figures against a device profile's `[expect]` floors: a check below
//! [`FLOOR_FRACTION`] of the expected figure fails and names the likely causes; without a figure
//! to judge by, a row is a measurement.

use super::FLOOR_FRACTION;
use super::report::Check;
use crate::profile::DeviceProfile;

/// Which `[expect]` figure of the profile a row is judged by.
#[derive(Clone, Copy, Debug)]
pub(super) enum Expect {
    Bandwidth,
    MatmulF32,
    MatmulQ4K,
    Pp,
    Tg,
    /// Never judged, for this reason.
    Never(&'static str),
}

/// Turns a measured figure into a row: a check against the profile's expected figure where it
/// states one, else a measurement that says why it is not judged.
pub(super) struct Judge<'a> {
    pub(super) profile: Option<&'a DeviceProfile>,
    pub(super) threads: usize,
    /// The bench figures in a profile are for the embedded model.
    pub(super) embedded_model: bool,
}

impl Judge<'_> {
    pub(super) fn row(
        &self,
        name: impl Into<String>,
        value: f64,
        unit: &str,
        msg: String,
        what: Expect,
    ) -> Check {
        let name = name.into();
        if !(value.is_finite() && value > 0.0) {
            return Check::new(
                name,
                false,
                Some(value),
                unit,
                format!("the measurement is broken ({value}): {msg}"),
            );
        }
        let exp = self.profile.and_then(|p| p.expect.as_ref());
        let (field, expected) = match what {
            Expect::Never(why) => {
                return Check::measure(
                    name,
                    Some(value),
                    unit,
                    format!("{msg}; not judged: {why}"),
                );
            }
            Expect::Bandwidth => (
                "memory_bandwidth_gbs",
                exp.and_then(|e| e.memory_bandwidth_gbs),
            ),
            Expect::MatmulF32 => ("matmul_f32_gflops", exp.and_then(|e| e.matmul_f32_gflops)),
            Expect::MatmulQ4K => ("matmul_q4_k_gflops", exp.and_then(|e| e.matmul_q4_k_gflops)),
            Expect::Pp => ("pp_tps", exp.and_then(|e| e.pp_tps)),
            Expect::Tg => ("tg_tps", exp.and_then(|e| e.tg_tps)),
        };
        let bench_row = matches!(what, Expect::Pp | Expect::Tg);
        let (Some(p), Some(expected)) = (self.profile, expected) else {
            let why = match self.profile {
                None => {
                    "no device profile (--target) states what a healthy device measures".to_string()
                }
                Some(p) => format!("profile {} states no expect.{field}", p.name),
            };
            return Check::measure(name, Some(value), unit, format!("{msg}; not judged: {why}"));
        };
        if bench_row && !self.embedded_model {
            return Check::measure(
                name,
                Some(value),
                unit,
                format!(
                    "{msg}; not judged: profile {}'s expect.{field} is for the embedded model, not --model",
                    p.name
                ),
            );
        }
        let floor = FLOOR_FRACTION * expected;
        if value >= floor {
            return Check::new(
                name,
                true,
                Some(value),
                unit,
                format!(
                    "{msg}; {:.0}% of the {expected} {unit} profile {} expects (floor {floor})",
                    100.0 * value / expected,
                    p.name
                ),
            );
        }
        Check::new(
            name,
            false,
            Some(value),
            unit,
            format!(
                "{value:.3} {unit} is below half of the {expected} {unit} profile {} expects: this device is not running as it should; likely causes: {}. ({msg})",
                p.name,
                likely_causes(p, self.threads).join("; ")
            ),
        )
    }
}

/// What may slow a device down, with what this machine shows of it (Linux sysfs/procfs, read
/// where present): thermal throttling, the CPU frequency governor, other processes, threads.
fn likely_causes(p: &DeviceProfile, threads: usize) -> Vec<String> {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let mut causes = vec![];
    let temps: Vec<f64> = (0..16)
        .filter_map(|i| read(&format!("/sys/class/thermal/thermal_zone{i}/temp")))
        .filter_map(|t| t.parse::<f64>().ok())
        .map(|m| m / 1000.0)
        .collect();
    let hottest = temps.iter().copied().fold(f64::NAN, f64::max);
    causes.push(if hottest.is_finite() {
        format!("thermal throttling (hottest thermal zone now {hottest:.0} °C; on a Raspberry Pi `vcgencmd get_throttled` says whether it throttled)")
    } else {
        "thermal throttling (no thermal zone readable here)".to_string()
    });
    let cpu = "/sys/devices/system/cpu/cpu0/cpufreq";
    match read(&format!("{cpu}/scaling_governor")) {
        Some(g) => {
            let cur = read(&format!("{cpu}/scaling_cur_freq")).and_then(|v| v.parse::<f64>().ok());
            let max = read(&format!("{cpu}/cpuinfo_max_freq")).and_then(|v| v.parse::<f64>().ok());
            let freq = match (cur, max) {
                (Some(c), Some(m)) => format!(", cpu0 at {:.2} of {:.2} GHz", c / 1e6, m / 1e6),
                _ => String::new(),
            };
            causes.push(format!(
                "the CPU frequency governor (now '{g}'{freq}{})",
                if g == "performance" {
                    ""
                } else {
                    "; try 'performance'"
                }
            ));
        }
        None => {
            causes.push("a power-saving CPU frequency governor (not readable here)".to_string())
        }
    }
    let cores = ember_runtime::sys::available_cores();
    match read("/proc/loadavg").and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok()) {
        Some(l) => causes.push(format!(
            "another process using the CPU or memory (1-minute load average {l:.1} on {cores} cores, this self-test included)"
        )),
        None => causes.push("another process using the CPU or memory".to_string()),
    }
    if threads < p.threads {
        causes.push(format!(
            "fewer threads ({threads}) than the profile's {}",
            p.threads
        ));
    }
    if cfg!(debug_assertions) {
        causes.push("a debug build (build with --release)".to_string());
    }
    causes
}
