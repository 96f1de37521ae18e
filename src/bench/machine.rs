//! What the bench ran on and how much memory a process holds, both read from /proc (Linux), so
//! every table says which machine its figures belong to.

use std::fmt;

/// The machine a table was measured on.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub ram_bytes: u64,
    pub kernel: String,
    /// `/proc/loadavg`'s 1, 5 and 15 minute averages when the bench started: on a shared
    /// machine, how much else was running.
    pub load: String,
}

impl Machine {
    /// Reads the machine from /proc; fields that cannot be read say "unknown" (or 0).
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned());
        let cores = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let ram_bytes = kib_field(&meminfo, "MemTotal:").unwrap_or(0) * 1024;
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned());
        let load = std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".to_owned());
        Machine {
            cpu_model,
            cores,
            ram_bytes,
            kernel,
            load,
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, {} cores, {:.1} GiB RAM, Linux {}; load average at start {}",
            self.cpu_model,
            self.cores,
            self.ram_bytes as f64 / (1u64 << 30) as f64,
            self.kernel,
            self.load
        )
    }
}

/// A `Name:   1234 kB` field of a /proc status or meminfo file, in KiB.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resident memory of process `pid` ("self" for this one): `(VmRSS, VmHWM)` in bytes.
pub fn rss(pid: &str) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some((
        kib_field(&s, "VmRSS:")? * 1024,
        kib_field(&s, "VmHWM:")? * 1024,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kib_field_is_read_from_its_line_whatever_the_spacing() {
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t1024 kB\n";
        assert_eq!(kib_field(status, "VmRSS:"), Some(1024));
        assert_eq!(kib_field(status, "VmHWM:"), Some(2048));
        assert_eq!(kib_field(status, "VmSwap:"), None);
    }
}
