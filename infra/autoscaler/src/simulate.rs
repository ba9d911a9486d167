//! `meshgate-autoscaler simulate`: replays a load trace through the same [`Decider`] the
//! controller uses, on a simulated group, so operators can tune targets, the stabilization
//! window and the scale-up limit offline.
//!
//! Trace: CSV with a header. The first column is the time in seconds; every other column is a
//! signal named like the group's signals (`load` for the primary `query`/`target`, then the
//! `extra_signals` names) holding the **fleet-wide total** of that signal; the simulator divides
//! it by the instances in service, as the default query divides by ready instances. A value holds
//! until the next row; an empty cell or `NaN` is missing data.
//!
//! The simulated group: a scale-up launches instances that come into service after
//! `launch_delay` and are then warming for the policy's `warm_up`; a scale-in removes instances at
//! once (their drain is not modelled). It starts at `min_capacity`, all in service and warm.

use std::fmt::Write as _;
use std::time::Duration;

use crate::config::GroupConfig;
use crate::decide::{Decider, Direction, Input, Reading};

#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// Signal names from the header, after the time column.
    pub signals: Vec<String>,
    /// (seconds, one value per signal).
    pub rows: Vec<(f64, Vec<Option<f64>>)>,
}

/// Parses a trace; errors name the line.
pub fn parse_trace(text: &str) -> Result<Trace, String> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let (_, header) = lines.next().ok_or("empty trace: want a header like `seconds,load`")?;
    let cols: Vec<String> = header.split(',').map(|c| c.trim().to_string()).collect();
    if cols.len() < 2 {
        return Err(format!(
            "line 1: header {header:?} needs a time column and at least one signal"
        ));
    }
    let signals = cols[1..].to_vec();
    let mut rows: Vec<(f64, Vec<Option<f64>>)> = Vec::new();
    for (i, line) in lines {
        let n = i + 1;
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != cols.len() {
            return Err(format!(
                "line {n}: {} columns, the header has {}",
                cells.len(),
                cols.len()
            ));
        }
        let t: f64 = cells[0]
            .parse()
            .map_err(|_| format!("line {n}: time {:?} is not a number of seconds", cells[0]))?;
        if let Some((prev, _)) = rows.last() {
            if t <= *prev {
                return Err(format!("line {n}: time {t} does not increase"));
            }
        }
        let mut values = Vec::new();
        for c in &cells[1..] {
            values.push(match *c {
                "" => None,
                c => Some(crate::prom::parse_float(c).ok_or_else(|| format!("line {n}: {c:?} is not a number"))?)
                    .filter(|v| v.is_finite()),
            });
        }
        rows.push((t, values));
    }
    if rows.is_empty() {
        return Err("the trace has no data rows".into());
    }
    Ok(Trace { signals, rows })
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    pub launch_delay: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            launch_delay: Duration::from_secs(60),
        }
    }
}

/// The state after one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub t: f64,
    /// The primary signal's fleet total (None: missing).
    pub load: Option<f64>,
    /// `load / target`: instances the load needs.
    pub needed: Option<f64>,
    pub desired: u32,
    pub in_service: u32,
    pub direction: Direction,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub duration_s: f64,
    pub steps: usize,
    pub peak_capacity: u32,
    pub peak_at_s: f64,
    pub min_capacity: u32,
    pub scale_ups: usize,
    pub scale_downs: usize,
    /// Time the primary signal per instance in service was above its target.
    pub time_over_target_s: f64,
    pub instance_hours: f64,
}

#[derive(Debug, Clone)]
pub struct Simulation {
    pub group: String,
    pub target: f64,
    pub interval: Duration,
    pub steps: Vec<Step>,
    pub summary: Summary,
    /// Extra signals the trace has no column for.
    pub skipped: Vec<String>,
}

/// Runs the trace through the group's decision rule every `interval`.
pub fn simulate(group: &GroupConfig, interval: Duration, trace: &Trace, opts: Options) -> Result<Simulation, String> {
    // Which trace column feeds which signal. The primary signal must have one; extra signals
    // without a column are left out of the simulation (and said so in the summary).
    let mut columns = Vec::new();
    let mut skipped = Vec::new();
    for (i, s) in group.signals.iter().enumerate() {
        match trace.signals.iter().position(|c| *c == s.name) {
            Some(idx) => columns.push((s, idx)),
            None if i > 0 => skipped.push(s.name.clone()),
            None => {
                return Err(format!(
                    "the trace has no column {:?} for the primary signal (columns: {})",
                    s.name,
                    trace.signals.join(", ")
                ))
            }
        }
    }
    let policy = group.policy.clone();
    let mut decider = Decider::new(policy.clone());
    let step_s = interval.as_secs_f64();
    let start = trace.rows[0].0;
    let end = trace.rows.last().map(|r| r.0).unwrap_or(start);
    // Instances: the time each came (or comes) into service; warm ones at −∞.
    let mut instances: Vec<f64> = vec![f64::NEG_INFINITY; policy.min as usize];
    let mut desired = policy.min;
    let mut steps = Vec::new();
    let mut row = 0;
    let mut k = 0u64;
    loop {
        let t = start + k as f64 * step_s;
        if t > end + 1e-9 {
            break;
        }
        k += 1;
        while row + 1 < trace.rows.len() && trace.rows[row + 1].0 <= t + 1e-9 {
            row += 1;
        }
        let values = &trace.rows[row].1;
        let in_service = instances.iter().filter(|&&s| s <= t).count() as u32;
        let warming = instances
            .iter()
            .filter(|&&s| s <= t && t - s < policy.warm_up.as_secs_f64())
            .count() as u32;
        let pending = instances.len() as u32 - in_service;
        let readings: Vec<Reading> = columns
            .iter()
            .map(|&(s, c)| {
                let per_instance = values[c].and_then(|total| (in_service > 0).then(|| total / in_service as f64));
                Reading::new(&s.name, per_instance, s.target)
            })
            .collect();
        let d = decider.step(&Input {
            now: Duration::from_secs_f64(t - start),
            desired,
            in_service,
            warming,
            pending,
            readings,
        });
        // Apply: launches come into service after the delay; scale-in removes the newest first
        // (pending ones before those in service, like an ASG's default termination policy for
        // instances that never served).
        match d.desired.cmp(&desired) {
            std::cmp::Ordering::Greater => {
                for _ in desired..d.desired {
                    instances.push(t + opts.launch_delay.as_secs_f64());
                }
            }
            std::cmp::Ordering::Less => {
                instances.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
                instances.truncate(d.desired as usize);
            }
            std::cmp::Ordering::Equal => {}
        }
        desired = d.desired;
        let load = values[columns[0].1];
        steps.push(Step {
            t: t - start,
            load,
            needed: load.map(|l| l / group.signals[0].target),
            desired,
            in_service,
            direction: d.direction,
        });
    }
    let summary = summarize(&steps, step_s, group.signals[0].target);
    Ok(Simulation {
        group: group.name.clone(),
        target: group.signals[0].target,
        interval,
        steps,
        summary,
        skipped,
    })
}

fn summarize(steps: &[Step], step_s: f64, target: f64) -> Summary {
    let peak = steps.iter().max_by_key(|s| s.desired).expect("at least one step");
    let mut over = 0.0;
    let mut instance_s = 0.0;
    for s in steps {
        if let Some(l) = s.load {
            let per = if s.in_service > 0 {
                l / s.in_service as f64
            } else {
                f64::INFINITY
            };
            if l > 0.0 && per > target {
                over += step_s;
            }
        }
        instance_s += f64::from(s.desired) * step_s;
    }
    Summary {
        duration_s: steps.last().map(|s| s.t + step_s).unwrap_or(0.0),
        steps: steps.len(),
        peak_capacity: peak.desired,
        peak_at_s: peak.t,
        min_capacity: steps.iter().map(|s| s.desired).min().unwrap_or(0),
        scale_ups: steps.iter().filter(|s| s.direction == Direction::Up).count(),
        scale_downs: steps.iter().filter(|s| s.direction == Direction::Down).count(),
        time_over_target_s: over,
        instance_hours: instance_s / 3600.0,
    }
}

impl Simulation {
    /// The summary as printed by the CLI.
    pub fn summary_text(&self) -> String {
        let s = &self.summary;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "group {}: {} steps of {} s over {:.0} s (target {} per instance)",
            self.group,
            s.steps,
            self.interval.as_secs_f64(),
            s.duration_s,
            self.target
        );
        for sk in &self.skipped {
            let _ = writeln!(out, "signal {sk}: no column in the trace, not simulated");
        }
        let _ = writeln!(out, "peak capacity: {} (at {:.0} s)", s.peak_capacity, s.peak_at_s);
        let _ = writeln!(out, "min capacity: {}", s.min_capacity);
        let _ = writeln!(
            out,
            "scale events: {} ({} up, {} down)",
            s.scale_ups + s.scale_downs,
            s.scale_ups,
            s.scale_downs
        );
        let pct = if s.duration_s > 0.0 {
            100.0 * s.time_over_target_s / s.duration_s
        } else {
            0.0
        };
        let _ = writeln!(out, "time over target: {:.0} s ({pct:.1} %)", s.time_over_target_s);
        let _ = writeln!(out, "instance-hours: {:.2}", s.instance_hours);
        out
    }

    /// Capacity against load over time, as a standalone SVG document.
    pub fn svg(&self) -> String {
        let (w, h) = (960.0, 440.0);
        let (left, right, top, bottom) = (60.0, 20.0, 40.0, 70.0);
        let pw = w - left - right;
        let ph = h - top - bottom;
        let t_max = self.summary.duration_s.max(1.0);
        let y_max_raw = self
            .steps
            .iter()
            .map(|s| f64::from(s.desired).max(s.needed.unwrap_or(0.0)))
            .fold(1.0, f64::max);
        let y_step = nice_step(y_max_raw / 6.0);
        let y_max = (y_max_raw / y_step).ceil() * y_step;
        let x = |t: f64| left + pw * t / t_max;
        let y = |v: f64| top + ph - ph * v / y_max;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}: capacity against load (target {} per instance)</text>"#,
            w / 2.0,
            xml_escape(&self.group),
            self.target
        );
        // Grid and axes.
        let mut v = 0.0;
        while v <= y_max + 1e-9 {
            let yy = y(v);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + pw,
                left - 6.0,
                yy + 4.0,
                fmt_num(v)
            );
            v += y_step;
        }
        let t_step = nice_step(t_max / 8.0);
        let mut t = 0.0;
        while t <= t_max + 1e-9 {
            let xx = x(t);
            let _ = writeln!(
                s,
                r##"<line x1="{xx:.1}" y1="{top}" x2="{xx:.1}" y2="{:.1}" stroke="#f0f0f0"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                top + ph,
                top + ph + 16.0,
                fmt_num(t)
            );
            t += t_step;
        }
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time (s)</text>"#,
            left + pw / 2.0,
            top + ph + 34.0
        );
        let _ = writeln!(
            s,
            r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">instances</text>"#,
            top + ph / 2.0,
            top + ph / 2.0
        );
        // Series: load in instances needed (line, gaps where missing), desired and in service
        // (steps).
        let step_s = self.interval.as_secs_f64();
        let mut needed = String::new();
        let mut pen_down = false;
        for st in &self.steps {
            match st.needed {
                Some(n) => {
                    let _ = write!(
                        needed,
                        "{}{:.1},{:.1} ",
                        if pen_down { "L" } else { "M" },
                        x(st.t),
                        y(n)
                    );
                    pen_down = true;
                }
                None => pen_down = false,
            }
        }
        let step_path = |f: &dyn Fn(&Step) -> u32| {
            let mut p = String::new();
            for (i, st) in self.steps.iter().enumerate() {
                let v = f64::from(f(st));
                let _ = write!(p, "{}{:.1},{:.1} ", if i == 0 { "M" } else { "L" }, x(st.t), y(v));
                let _ = write!(p, "L{:.1},{:.1} ", x((st.t + step_s).min(t_max)), y(v));
            }
            p
        };
        let _ = writeln!(
            s,
            r##"<path d="{}" fill="none" stroke="#9e9e9e" stroke-width="1.5"/>"##,
            needed.trim_end()
        );
        let _ = writeln!(
            s,
            r##"<path d="{}" fill="none" stroke="#2e7d32" stroke-width="2" stroke-dasharray="5,3"/>"##,
            step_path(&|st| st.in_service).trim_end()
        );
        let _ = writeln!(
            s,
            r##"<path d="{}" fill="none" stroke="#1565c0" stroke-width="2"/>"##,
            step_path(&|st| st.desired).trim_end()
        );
        // Legend.
        let ly = h - 16.0;
        for (i, (color, dash, label)) in [
            ("#9e9e9e", "", "load / target (instances needed)"),
            ("#1565c0", "", "desired capacity"),
            ("#2e7d32", "5,3", "in service"),
        ]
        .iter()
        .enumerate()
        {
            let lx = left + i as f64 * 260.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{color}" stroke-width="2" stroke-dasharray="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                lx + 24.0,
                if dash.is_empty() { "none" } else { dash },
                lx + 30.0,
                ly + 4.0,
                xml_escape(label)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// 1, 2 or 5 × 10^n, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * mag >= raw {
            return (m * mag).max(1.0);
        }
    }
    10.0 * mag
}

fn fmt_num(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.1}")
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use std::path::Path;

    fn group(extra: &str) -> (GroupConfig, Duration) {
        let text = format!(
            "prometheus:\n  url: http://127.0.0.1:9090\ninterval: 15s\ngroups:\n  - name: g\n    target: 10\n    min_capacity: 2\n    max_capacity: 20\n{extra}"
        );
        let c = parse(Path::new("t.yaml"), &text).unwrap();
        (c.groups[0].clone(), c.interval)
    }

    #[test]
    fn trace_parsing() {
        let t = parse_trace("# comment\nseconds,load\n0,10\n15,\n30,NaN\n45,12.5\n").unwrap();
        assert_eq!(t.signals, vec!["load"]);
        assert_eq!(t.rows.len(), 4);
        assert_eq!(t.rows[1].1, vec![None]);
        assert_eq!(t.rows[2].1, vec![None]);
        assert!(parse_trace("seconds,load\n0,1\n0,2\n").unwrap_err().contains("line 3"));
        assert!(parse_trace("seconds,load\n0,x\n").unwrap_err().contains("line 2"));
        assert!(parse_trace("seconds\n0\n").is_err());
    }

    #[test]
    fn a_step_up_and_back_down() {
        let (g, interval) = group("    scale_down_stabilization: 60s\n    warm_up: 0s\n");
        // 20 (2 instances' worth) for 2 min, 80 for 5 min, 20 for 10 min.
        let mut csv = String::from("seconds,load\n");
        for t in (0..=1020).step_by(15) {
            let load = if (120..420).contains(&t) { 80 } else { 20 };
            csv.push_str(&format!("{t},{load}\n"));
        }
        let sim = simulate(
            &g,
            interval,
            &parse_trace(&csv).unwrap(),
            Options {
                launch_delay: Duration::from_secs(30),
            },
        )
        .unwrap();
        let s = &sim.summary;
        assert_eq!(s.peak_capacity, 8, "{}", sim.summary_text());
        assert_eq!(s.min_capacity, 2);
        // 2 → 6 (limit +4), then → 8, and back down to 2 in one step after the window.
        assert_eq!((s.scale_ups, s.scale_downs), (2, 1), "{:?}", sim.steps);
        assert!(s.time_over_target_s > 0.0 && s.time_over_target_s <= 120.0, "{s:?}");
        assert_eq!(sim.steps.last().unwrap().desired, 2);
        let svg = sim.svg();
        assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
        assert!(sim.summary_text().contains("peak capacity: 8"));
    }

    #[test]
    fn trace_columns_feed_signals_by_name() {
        let (g, interval) = group("    extra_signals:\n      - name: cpu\n        query: x\n        target: 1\n");
        let e = simulate(&g, interval, &parse_trace("s,cpu\n0,1\n").unwrap(), Options::default()).unwrap_err();
        assert!(e.contains("\"load\""), "{e}");
        let sim = simulate(&g, interval, &parse_trace("s,load\n0,1\n").unwrap(), Options::default()).unwrap();
        assert!(
            sim.summary_text().contains("signal cpu: no column"),
            "{}",
            sim.summary_text()
        );
        // Both columns: the larger recommendation wins (cpu 8 per instance on 2 → 16).
        let sim = simulate(
            &g,
            interval,
            &parse_trace("s,load,cpu\n0,1,16\n").unwrap(),
            Options::default(),
        )
        .unwrap();
        assert_eq!(sim.steps[0].desired, 6, "{:?}", sim.steps); // 2 → 16 wanted, limited to +4
    }
}
