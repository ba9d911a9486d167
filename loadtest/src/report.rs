//! The report: JSON (everything, per run), Markdown (the tables and the target checks) and an
//! SVG chart (CPU per request and p99 latency by scenario), written side by side.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::runner::{Report, ScenarioReport, Target};

/// One target of issues #6 and #14, checked against this run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub goal: String,
    pub measured: String,
    /// `None` when the scenario it needs was not run.
    pub pass: Option<bool>,
}

/// Pool size the steady-state handshake goal is measured against (`upstream.max_connections`).
pub const POOL_SIZE: f64 = 8.0;

pub fn checks(scenarios: &[ScenarioReport]) -> Vec<Check> {
    let find = |n: &str| scenarios.iter().find(|s| s.name == n);
    let pair = |n: &str| find(n).and_then(|s| Some((s.of(Target::Meshgate)?.clone(), s.of(Target::Haproxy)?.clone())));
    let mut out = Vec::new();
    let missing = |goal: &str| Check {
        goal: goal.into(),
        measured: "scenario not run".into(),
        pass: None,
    };

    // Issue #14: CPU per request at most 0.70 × HAProxy's on the small-request scenarios and
    // 0.60 × on the large-body ones.
    for (scenarios_of_goal, bound) in [
        (&["h1-small", "h2c-small", "mixed-deny", "cold-start"][..], 0.70),
        (&["h1-64k", "h1-1m"][..], 0.60),
    ] {
        let goal = format!(
            "CPU per request ≤ {bound:.2} × HAProxy's in {}",
            scenarios_of_goal.join(", ")
        );
        let ratios: Vec<(String, f64)> = scenarios_of_goal
            .iter()
            .filter_map(|n| {
                let (m, h) = pair(n)?;
                Some((n.to_string(), m.cpu_secs_per_10k? / h.cpu_secs_per_10k?))
            })
            .collect();
        out.push(if ratios.is_empty() {
            missing(&goal)
        } else {
            Check {
                goal: goal.clone(),
                measured: ratios
                    .iter()
                    .map(|(n, r)| format!("{n} {r:.2}×"))
                    .collect::<Vec<_>>()
                    .join(", "),
                pass: Some(ratios.iter().all(|(_, r)| *r <= bound)),
            }
        });
    }

    let goal = "p99 latency at half of HAProxy's saturation rate ≤ HAProxy's p99, in every round";
    out.push(match find("half-load") {
        Some(s) => {
            let rounds: Vec<(usize, f64, f64)> = (1..=s.runs.iter().map(|r| r.round).max().unwrap_or(0))
                .filter_map(|round| {
                    let p99 = |t: Target| {
                        s.runs
                            .iter()
                            .find(|r| r.round == round && r.target == t)
                            .map(|r| r.p99_ms)
                    };
                    Some((round, p99(Target::Meshgate)?, p99(Target::Haproxy)?))
                })
                .collect();
            Check {
                goal: goal.into(),
                measured: rounds
                    .iter()
                    .map(|(r, m, h)| format!("round {r}: {m:.2} vs {h:.2} ms"))
                    .collect::<Vec<_>>()
                    .join("; "),
                pass: Some(!rounds.is_empty() && rounds.iter().all(|(_, m, h)| m <= h)),
            }
        }
        None => missing(goal),
    });

    // Measured in the peak scenario, where each proxy is held to the same share of a core and
    // so saturates before the generator; h1-small stands in when it was not run, and says that
    // its figure is the generator's wherever the proxies were not busy.
    let goal = "Peak throughput on one core ≥ 1.3 × HAProxy's";
    let busy = |b: Option<f64>| b.map(|b| format!("{:.0}%", b * 100.0)).unwrap_or_default();
    out.push(match (find("peak"), pair("peak"), pair("h1-small")) {
        (Some(sc), Some((m, h)), _) => {
            let share = sc.cpu_quota.unwrap_or(1.0);
            Check {
                goal: goal.into(),
                measured: format!(
                    "{:.0} vs {:.0} req/s per core ({:.0} vs {:.0} req/s held to {:.0}% of a core each, busy {} vs {}): {:.2}×",
                    m.requests_per_sec / share,
                    h.requests_per_sec / share,
                    m.requests_per_sec,
                    h.requests_per_sec,
                    share * 100.0,
                    busy(m.proxy_cpu_busy),
                    busy(h.proxy_cpu_busy),
                    m.requests_per_sec / h.requests_per_sec.max(1e-9)
                ),
                pass: Some(m.requests_per_sec >= 1.3 * h.requests_per_sec),
            }
        }
        (_, _, Some((m, h))) => Check {
            goal: goal.into(),
            measured: format!(
                "h1-small (the peak scenario was not run): {:.0} vs {:.0} req/s: {:.2}× (proxy CPU busy {} vs {}; below 100% the generator, not the proxy, set the pace)",
                m.requests_per_sec,
                h.requests_per_sec,
                m.requests_per_sec / h.requests_per_sec.max(1e-9),
                busy(m.proxy_cpu_busy),
                busy(h.proxy_cpu_busy)
            ),
            pass: Some(m.requests_per_sec >= 1.3 * h.requests_per_sec),
        },
        _ => missing(goal),
    });

    // Issue #14: at most 4 KiB per idle connection, measured with 10,000 of them (the 1,000
    // figure is reported, but a fixed cost weighs ten times as much there).
    let goal = "Memory ≤ 4 KiB per idle client connection (10,000 HTTP/1.1, 10,000 h2c)";
    let idle: Vec<(String, f64)> = scenarios
        .iter()
        .filter(|s| s.name.ends_with("10k"))
        .filter_map(|s| Some((s.name.clone(), s.of(Target::Meshgate)?.kib_per_idle_connection?)))
        .collect();
    out.push(if idle.is_empty() {
        missing(goal)
    } else {
        Check {
            goal: goal.into(),
            measured: idle
                .iter()
                .map(|(n, k)| format!("{n}: {k:.1} KiB"))
                .collect::<Vec<_>>()
                .join(", "),
            pass: Some(idle.iter().all(|(_, k)| *k <= 4.0)),
        }
    });

    let goal = "Upstream handshakes per 10,000 steady-state requests ≤ the pool size";
    out.push(match find("h1-small").and_then(|s| s.of(Target::Meshgate)) {
        Some(m) => Check {
            goal: goal.into(),
            measured: format!("{:.2} (pool size {POOL_SIZE})", m.handshakes_per_10k),
            pass: Some(m.handshakes_per_10k <= POOL_SIZE),
        },
        None => missing(goal),
    });
    out
}

pub fn write(report: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(report)?)?;
    std::fs::write(dir.join("report.md"), markdown(report))?;
    std::fs::write(dir.join("chart.svg"), svg(report))?;
    Ok(())
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "–".into())
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# meshgate vs HAProxy vs direct\n");
    let _ = writeln!(s, "- date: {}", r.date);
    let _ = writeln!(s, "- command: `{}`", r.command);
    let _ = writeln!(s, "- machine: {}", r.machine);
    let _ = writeln!(s, "- HAProxy: {}", r.haproxy_version);
    let _ = writeln!(
        s,
        "- proxies pinned to CPU 1, generator and mesh to CPU 0: {}",
        if r.pinned { "yes" } else { "no" }
    );
    let _ = writeln!(
        s,
        "- {} rounds of {:.1} s per target, alternating\n",
        r.rounds, r.seconds_per_run
    );
    let _ = writeln!(s, "## Targets\n\n| goal | measured | result |\n|---|---|---|");
    for c in &r.checks {
        let res = match c.pass {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "not measured",
        };
        let _ = writeln!(s, "| {} | {} | {res} |", c.goal, c.measured);
    }
    for sc in &r.scenarios {
        let _ = writeln!(s, "\n## {}\n\n{}\n", sc.name, sc.description);
        for n in &sc.notes {
            let _ = writeln!(s, "- {n}");
        }
        if !sc.notes.is_empty() {
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "| target | requests | errors | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | proxy CPU s / 10k req | proxy CPU busy | peak RSS MiB | upstream handshakes / 10k | KiB / idle conn |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for m in &sc.summary {
            let idle = sc.name.starts_with("idle");
            let lat = |v: f64| if idle { "–".to_string() } else { format!("{v:.2}") };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                m.target.name(),
                m.requests,
                m.errors,
                if idle {
                    "–".into()
                } else {
                    format!("{:.0}", m.requests_per_sec)
                },
                lat(m.p50_ms),
                lat(m.p90_ms),
                lat(m.p99_ms),
                lat(m.p999_ms),
                opt(m.cpu_secs_per_10k, 3),
                opt(m.proxy_cpu_busy.map(|b| b * 100.0), 0) + if m.proxy_cpu_busy.is_some() { "%" } else { "" },
                opt(m.peak_rss_mib, 1),
                if idle {
                    "–".into()
                } else {
                    format!("{:.2}", m.handshakes_per_10k)
                },
                opt(m.kib_per_idle_connection, 1),
            );
        }
    }
    let _ = writeln!(s, "\nChart: `chart.svg`. Every run: `report.json`.");
    s
}

/// Two grouped bar panels: CPU per 10k requests and p99, per scenario, per target.
pub fn svg(r: &Report) -> String {
    let rows: Vec<&ScenarioReport> = r
        .scenarios
        .iter()
        .filter(|s| s.summary.iter().any(|m| m.cpu_secs_per_10k.is_some()))
        .collect();
    let colors = [
        (Target::Meshgate, "#2b7bb9"),
        (Target::Haproxy, "#d9822b"),
        (Target::Direct, "#7a7a7a"),
    ];
    let (w, panel_h, top) = (900.0, 260.0, 40.0);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{}" font-family="sans-serif" font-size="12">"#,
        top + 2.0 * (panel_h + 60.0)
    );
    let _ = write!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="10" y="20" font-size="15">meshgate vs HAProxy vs direct — {}</text>"#,
        xml(&r.date)
    );
    for (i, (t, c)) in colors.iter().enumerate() {
        let x = 520.0 + i as f64 * 120.0;
        let _ = write!(
            s,
            r#"<rect x="{x}" y="8" width="12" height="12" fill="{c}"/><text x="{}" y="19">{}</text>"#,
            x + 16.0,
            t.name()
        );
    }
    type Metric = fn(&crate::runner::Summary) -> Option<f64>;
    let panels: [(&str, Metric); 2] = [
        ("proxy CPU seconds per 10,000 requests", |m| m.cpu_secs_per_10k),
        (
            "p99 latency (ms)",
            |m| if m.requests > 0 { Some(m.p99_ms) } else { None },
        ),
    ];
    for (p, (title, metric)) in panels.iter().enumerate() {
        let y0 = top + p as f64 * (panel_h + 60.0);
        let base = y0 + panel_h;
        let max = rows
            .iter()
            .flat_map(|sc| sc.summary.iter().filter_map(metric))
            .fold(0.0f64, f64::max)
            .max(1e-9);
        let _ = write!(s, r#"<text x="60" y="{}" font-size="13">{title}</text>"#, y0 + 14.0);
        let _ = write!(
            s,
            r#"<line x1="60" y1="{base}" x2="{}" y2="{base}" stroke="black"/>"#,
            w - 20.0
        );
        let group = (w - 90.0) / rows.len().max(1) as f64;
        for (g, sc) in rows.iter().enumerate() {
            let gx = 70.0 + g as f64 * group;
            let bar = (group - 20.0) / 3.0;
            for (i, (t, c)) in colors.iter().enumerate() {
                let Some(v) = sc.of(*t).and_then(metric) else { continue };
                let h = v / max * (panel_h - 40.0);
                let x = gx + i as f64 * bar;
                let _ = write!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{c}"/><text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle">{}</text>"#,
                    base - h,
                    bar - 2.0,
                    x + bar / 2.0,
                    base - h - 3.0,
                    if v >= 10.0 {
                        format!("{v:.0}")
                    } else {
                        format!("{v:.2}")
                    }
                );
            }
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                gx + group / 2.0 - 10.0,
                base + 16.0,
                xml(&sc.name)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Now, as `YYYY-MM-DD HH:MM UTC`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

/// CPU model, count and kernel, for the report header.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU");
    // Not available_parallelism: this process may already be pinned to one CPU.
    let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} × {model}, Linux {}", kernel.trim())
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_now_is_a_plausible_date() {
        let s = super::utc_now();
        assert_eq!(s.len(), "2026-11-26 12:00 UTC".len(), "{s}");
        assert!(s.as_str() >= "2025-01-01", "{s}");
    }
}
