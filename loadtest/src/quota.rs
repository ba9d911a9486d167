//! A CPU quota for one process, through the kernel's CFS bandwidth control (cgroup v2
//! `cpu.max`, or v1 `cpu.cfs_quota_us`), so that the peak scenario saturates the proxy and not
//! the generator: on two cores the generator and the mesh share one core and cannot outrun a
//! proxy that has the other to itself, but they can outrun a proxy held to a quarter of it.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The period the quota is counted over: short, so a throttled proxy stalls for a few
/// milliseconds at a time rather than for most of a 100 ms default period.
const PERIOD_US: u64 = 10_000;

/// A cgroup holding one process to `share` of one CPU; removed when dropped.
#[derive(Debug)]
pub struct Quota {
    dir: PathBuf,
    pub share: f64,
}

impl Quota {
    /// Moves `pid` (all its threads) into a new cgroup allowed `share` (0, 1] of one CPU.
    pub fn apply(pid: u32, share: f64, name: &str) -> anyhow::Result<Quota> {
        anyhow::ensure!(share > 0.0 && share <= 1.0, "CPU share {share} is not in (0, 1]");
        let quota_us = ((PERIOD_US as f64) * share).round().max(1000.0) as u64;
        let name = format!("meshgate-loadtest-{}-{name}", std::process::id());
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
        let v1 = Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us");
        let dir = if std::fs::read_to_string(v2).is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu")) {
            // v2: the controller must be enabled for the root's children first.
            write(Path::new("/sys/fs/cgroup/cgroup.subtree_control"), "+cpu")?;
            let dir = Path::new("/sys/fs/cgroup").join(&name);
            mkdir(&dir)?;
            write(&dir.join("cpu.max"), &format!("{quota_us} {PERIOD_US}"))?;
            dir
        } else if v1.exists() {
            let dir = Path::new("/sys/fs/cgroup/cpu").join(&name);
            mkdir(&dir)?;
            write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            write(&dir.join("cpu.cfs_quota_us"), &quota_us.to_string())?;
            dir
        } else {
            anyhow::bail!("no cgroup CPU controller (neither /sys/fs/cgroup/cpu.max nor /sys/fs/cgroup/cpu/)");
        };
        let q = Quota {
            dir,
            share: quota_us as f64 / PERIOD_US as f64,
        };
        write(&q.dir.join("cgroup.procs"), &pid.to_string())?;
        Ok(q)
    }

    /// CPU time the cgroup's members were refused by the quota (v1 `throttled_time`, v2
    /// `throttled_usec`), in seconds: more than zero shows the quota, not the load, limited them.
    pub fn throttled_secs(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).ok()?;
        let field = |k: &str| stat.lines().find_map(|l| l.strip_prefix(k)?.trim().parse::<f64>().ok());
        field("throttled_usec ")
            .map(|us| us / 1e6)
            .or_else(|| field("throttled_time ").map(|ns| ns / 1e9))
    }
}

impl Drop for Quota {
    fn drop(&mut self) {
        // A cgroup with members cannot be removed: any still alive go back to the parent.
        if let (Ok(pids), Some(parent)) = (
            std::fs::read_to_string(self.dir.join("cgroup.procs")),
            self.dir.parent(),
        ) {
            for pid in pids.lines() {
                let _ = std::fs::write(parent.join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn mkdir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir(dir).with_context(|| {
        format!(
            "creating the cgroup {} (needs root and a writable cgroup file system)",
            dir.display()
        )
    })
}

fn write(path: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}
