//! Figures the kernel gives in kB in `/proc` files (`/proc/meminfo`,
//! `/proc/self/status`).

/// The value of line `key` (e.g. `"VmRSS:"`) of `/proc` file `path`, in kB.
pub fn kb(path: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    })
}

/// This machine's memory in bytes, from /proc/meminfo (64 GiB if
/// unreadable).
pub fn physical_memory() -> u64 {
    kb("/proc/meminfo", "MemTotal:").map_or(64 << 30, |kb| kb << 10)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_machines_figures() {
        assert!(super::physical_memory() > 1 << 20);
        assert!(super::kb("/proc/self/status", "VmRSS:").is_some_and(|k| k > 0));
        assert_eq!(super::kb("/proc/self/status", "NoSuchKey:"), None);
        assert_eq!(super::kb("/nonexistent", "VmRSS:"), None);
    }
}
