//! What a process cost, read from `/proc`: CPU time (user + system) and memory.

use std::time::Duration;

/// Clock ticks per second for `/proc/PID/stat`. Linux has reported 100 on every mainstream
/// architecture for decades; `getconf` confirms it where available.
fn ticks_per_sec() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU time the process has used so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    Ok(Duration::from_secs_f64(cpu_ticks(&stat)? as f64 / ticks_per_sec()))
}

/// utime + stime, in clock ticks, from the text of `/proc/PID/stat`.
fn cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    // The command name (field 2) may contain spaces and parentheses; the fields after it start
    // past the last ')'.
    let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow::anyhow!("bad stat"))? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    anyhow::ensure!(f.len() > 12, "stat has {} fields after the name", f.len());
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12 here.
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// (resident now, peak resident) in KiB, from `/proc/PID/status`.
pub fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| anyhow::anyhow!("{name} missing"))?;
        Ok(line[name.len()..].trim().trim_end_matches("kB").trim().parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    #[test]
    fn utime_and_stime_found_after_an_awkward_name() {
        // Fields 14 and 15 are 250 and 50 ticks; the name has spaces and a ')'.
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 7 0 0";
        assert_eq!(super::cpu_ticks(stat).unwrap(), 300);
        assert!(super::cpu_ticks("4242 (truncated) S 1 2").is_err());
    }

    #[test]
    fn measures_what_this_thread_spends() {
        let pid = std::process::id();
        let before = super::cpu_time(pid).unwrap();
        // Work on this thread until the process's CPU time has grown by 200 ms: it must grow
        // (a reader that parsed the wrong fields would stay put), and by no more than the
        // wall time on every core allows (a wrong tick rate would overshoot). However busy the
        // machine, this only takes longer; the 60 s bound only stops a broken reader.
        let start = Instant::now();
        let mut x = 0u64;
        let spent = loop {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            let spent = super::cpu_time(pid).unwrap() - before;
            if spent >= Duration::from_millis(200) {
                break spent;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "CPU time stuck at {spent:?}");
        };
        assert!(x != 1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let ceiling = start.elapsed() * cores + Duration::from_millis(50);
        assert!(
            spent <= ceiling,
            "{spent:?} of CPU in {:?} of wall time",
            start.elapsed()
        );

        // Touching 64 MiB raises the resident size by about that much.
        let (rss_before, _) = super::memory_kib(pid).unwrap();
        let block = vec![1u8; 64 << 20];
        let (rss, peak) = super::memory_kib(pid).unwrap();
        assert!(block.iter().step_by(4096).all(|b| *b == 1));
        assert!(rss >= rss_before + 48 * 1024, "{rss_before} KiB -> {rss} KiB");
        assert!(peak >= rss);
    }
}
