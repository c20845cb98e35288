//! Power sensors read from recorded-layout sysfs trees (`tests/fixtures/sysfs/`): which source
//! ember picks on an x86 RAPL host, a Jetson and a Pi 5, the watts it reads, counter
//! wrap-around, and a sensor that stops answering.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_bench::power::{Meter, discover_with, parse_pmic};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sysfs")
}

fn no_vcgencmd() -> PathBuf {
    PathBuf::from("/nonexistent/vcgencmd")
}

fn no_nvml() -> PathBuf {
    PathBuf::from("/nonexistent/libnvidia-ml.so.1")
}

/// A stand-in NVML built from C at test time: two GPUs; each read of a GPU's energy counter
/// advances it by 500 mJ; with `no_energy` the counter is unsupported (NVML error 3) and each
/// GPU draws 150 W. Each build is its own file, so its counters are its own.
fn fake_nvml(name: &str, no_energy: bool) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-fake-nvml-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let c = dir.join(format!("{name}.c"));
    let so = dir.join(format!("{name}.so"));
    std::fs::write(
        &c,
        format!(
            r#"#include <string.h>
static unsigned long long energy[2] = {{1000000, 2000000}};
int nvmlInit_v2(void) {{ return 0; }}
int nvmlDeviceGetCount_v2(unsigned *n) {{ *n = 2; return 0; }}
int nvmlDeviceGetHandleByIndex_v2(unsigned i, void **d) {{ *d = (void *)(long)(i + 1); return 0; }}
int nvmlDeviceGetName(void *d, char *buf, unsigned len) {{ strncpy(buf, "Fake GPU 80GB", len); return 0; }}
int nvmlDeviceGetTotalEnergyConsumption(void *d, unsigned long long *mj) {{
  if ({no_energy}) return 3;
  long i = (long)d - 1; energy[i] += 500; *mj = energy[i]; return 0;
}}
int nvmlDeviceGetPowerUsage(void *d, unsigned *mw) {{ *mw = 150000; return 0; }}
"#,
            no_energy = no_energy as u8
        ),
    )
    .unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = std::process::Command::new(&cc)
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&c)
        .output()
        .unwrap_or_else(|e| panic!("{cc} (a C compiler builds the stand-in NVML): {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    so
}

/// A writable copy of a fixture tree, one per call (tests run in parallel).
fn copy_tree(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dst = std::env::temp_dir().join(format!("ember-power-{}-{name}-{k}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(&fixtures().join(name), &dst);
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn write(p: &Path, v: u64) {
    std::fs::write(p, format!("{v}\n")).unwrap();
}

#[test]
fn x86_rapl_sums_the_packages_once_and_handles_wrap_around() {
    let root = copy_tree("x86-rapl");
    let d = discover_with(&root, &no_vcgencmd(), &no_nvml());
    let src = d.source.clone().expect("RAPL found");
    // Subzones (core, dram) and the MMIO duplicate of package-0 are not counted again.
    assert_eq!(src.name, "rapl package-0+package-1");
    assert!(d.notes.is_empty(), "{:?}", d.notes);

    let zone = |z: &str| root.join("sys/class/powercap").join(z).join("energy_uj");
    let (p0, p1) = (48_211_876_543u64, 47_190_334_121u64);
    write(&zone("intel-rapl:0"), p0);
    write(&zone("intel-rapl:1"), p1);
    let mut m = Meter::new(src);
    // Readings at instants the test chooses, so the interval is exact whatever the load.
    let t0 = Instant::now();
    m.read(t0).unwrap();
    let t = t0 + Duration::from_secs(2);
    // 30 J and 10 J in 2 s: 20 W.
    write(&zone("intel-rapl:0"), p0 + 30_000_000);
    write(&zone("intel-rapl:1"), p1 + 10_000_000);
    let w = m.read(t).unwrap().unwrap();
    assert!((w - 20.0).abs() < 1e-9, "{w}");
    // package-0 wraps at max_energy_range_uj: 262143328850 − (p0 + 30 J) + 1 J.
    let max = 262_143_328_850u64;
    let before0 = p0 + 30_000_000;
    let wrapped_to = 1_000_000u64;
    write(&zone("intel-rapl:0"), wrapped_to);
    write(&zone("intel-rapl:1"), p1 + 10_000_000);
    let w = m.read(t + Duration::from_secs(1)).unwrap().unwrap();
    let want = ((max - before0) + wrapped_to) as f64 / 1e6;
    assert!((w - want).abs() < 1e-9 * want, "{w} vs {want}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn an_unreadable_rapl_counter_is_reported_not_used() {
    let root = copy_tree("x86-rapl");
    let f = root.join("sys/class/powercap/intel-rapl:1/energy_uj");
    std::fs::remove_file(&f).unwrap();
    std::fs::create_dir(&f).unwrap(); // reads fail, as a root-only file does for a user
    let d = discover_with(&root, &no_vcgencmd(), &no_nvml());
    assert_eq!(d.source.unwrap().name, "rapl package-0");
    assert!(
        d.notes
            .iter()
            .any(|n| n.contains("RAPL package-1: present but unreadable")),
        "{:?}",
        d.notes
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn jetson_uses_the_module_input_rail() {
    let d = discover_with(&fixtures().join("jetson-orin"), &no_vcgencmd(), &no_nvml());
    let src = d.source.expect("INA3221 found");
    assert_eq!(src.name, "ina3221 VDD_IN");
    let w = Meter::new(src).read(Instant::now()).unwrap().unwrap();
    // 5072 mV × 1464 mA.
    assert!((w - 5.072 * 1.464).abs() < 1e-9, "{w}");
}

#[test]
fn pi5_reads_its_pmic_rails_through_vcgencmd() {
    let root = fixtures().join("pi5");
    // Without vcgencmd a Pi 5's sysfs has no power sensor.
    assert!(
        discover_with(&root, &no_vcgencmd(), &no_nvml())
            .source
            .is_none()
    );
    let d = discover_with(&root, &root.join("vcgencmd"), &no_nvml());
    let src = d.source.expect("PMIC found");
    assert_eq!(src.name, "pi5 pmic (all rails)");
    let w = Meter::new(src).read(Instant::now()).unwrap().unwrap();
    let rails = [
        (0.071246, 3.7056),
        (0.062472, 3.304),
        (0.18203, 1.8),
        (0.030254, 1.11),
        (0.0, 0.6),
        (0.17569, 1.1),
        (0.31966, 0.8),
        (1.2054, 0.85),
        (0.0004884, 3.304),
        (0.00018315, 3.304),
        (0.0, 1.8),
        (0.22446, 0.8),
        (0.01416, 5.11),
    ];
    let want: f64 = rails.iter().map(|(a, v)| a * v).sum();
    assert!((w - want).abs() < 1e-9, "{w} vs {want}");
    // Rails with only a voltage (EXT5V, BATT) add nothing; garbage is no reading.
    assert_eq!(
        parse_pmic("error=1 error_msg=\"Command not registered\""),
        None
    );
}

#[test]
fn a_sensor_that_disappears_fails_every_later_read() {
    let root = copy_tree("jetson-orin");
    let d = discover_with(&root, &no_vcgencmd(), &no_nvml());
    let mut m = Meter::new(d.source.unwrap());
    assert!(m.read(Instant::now()).unwrap().is_some());
    std::fs::remove_file(root.join("sys/class/hwmon/hwmon1/curr1_input")).unwrap();
    let e = m.read(Instant::now()).unwrap_err();
    assert!(e.contains("curr1_input"), "{e}");
    // Even if it comes back, the run's readings stay broken: no half-measured energy.
    write(&root.join("sys/class/hwmon/hwmon1/curr1_input"), 1464);
    assert!(m.read(Instant::now()).is_err());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn no_sensor_at_all() {
    let empty = std::env::temp_dir().join(format!("ember-power-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let d = discover_with(&empty, &no_vcgencmd(), &no_nvml());
    assert!(d.source.is_none() && d.notes.is_empty());
}

#[test]
fn nvidia_gpus_through_nvml_with_the_cpu_packages() {
    let root = copy_tree("x86-rapl");
    let lib = fake_nvml("energy", false);
    let d = discover_with(&root, &no_vcgencmd(), &lib);
    let src = d.source.expect("NVML found");
    assert_eq!(src.name, "nvml Fake GPU 80GB ×2 + rapl package-0+package-1");
    let mut m = Meter::new(src);
    let t0 = Instant::now();
    m.read(t0).unwrap();
    // RAPL's counters stand still here; each GPU's advances 500 mJ per read: 1 J in 1 s.
    let w = m.read(t0 + Duration::from_secs(1)).unwrap().unwrap();
    assert!((w - 1.0).abs() < 1e-9, "{w}");
    std::fs::remove_dir_all(&root).unwrap();

    // GPUs without an energy counter: their power draw, 2 × 150 W.
    let empty = std::env::temp_dir().join(format!("ember-power-nosys-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let lib = fake_nvml("power", true);
    let src = discover_with(&empty, &no_vcgencmd(), &lib).source.unwrap();
    assert_eq!(src.name, "nvml Fake GPU 80GB ×2");
    let w = Meter::new(src).read(Instant::now()).unwrap().unwrap();
    assert!((w - 300.0).abs() < 1e-9, "{w}");
    // A machine without NVML: nothing, and no note (that is the usual case).
    let d = discover_with(&empty, &no_vcgencmd(), &no_nvml());
    assert!(d.source.is_none() && d.notes.is_empty(), "{:?}", d.notes);
}
