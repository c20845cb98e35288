//! Process and machine facts: resident memory, CPU name, core count.

/// Resident set size now and at its peak, in bytes (Linux `/proc/self/status`).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct MemoryStats {
    pub rss_bytes: u64,
    pub rss_peak_bytes: u64,
    /// Of the resident bytes, how many are file-backed (the mapped weights).
    pub rss_file_bytes: u64,
    pub rss_anon_bytes: u64,
}

pub fn memory() -> MemoryStats {
    let mut m = MemoryStats::default();
    if let Ok(s) = std::fs::read_to_string("/proc/self/status") {
        for line in s.lines() {
            let kb = |l: &str| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
                    * 1024
            };
            if line.starts_with("VmRSS:") {
                m.rss_bytes = kb(line);
            } else if line.starts_with("VmHWM:") {
                m.rss_peak_bytes = kb(line);
            } else if line.starts_with("RssFile:") {
                m.rss_file_bytes = kb(line);
            } else if line.starts_with("RssAnon:") {
                m.rss_anon_bytes = kb(line);
            }
        }
    }
    m
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| {
                    l.starts_with("model name")
                        || l.starts_with("Model")
                        || l.starts_with("Hardware")
                })
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
