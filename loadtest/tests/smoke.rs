//! The load generator and the comparison runner work: short runs, assertions on counts only
//! (never on speed: benchmarks are not part of the suite's pass/fail).

use std::path::PathBuf;
use std::time::Duration;

use meshgate_loadtest::gen::{self, Load, Mode, Proto};
use meshgate_loadtest::runner::{self, Options, Target, Topology, HOST, SNI};

fn meshgate_binary() -> PathBuf {
    // `cargo test --workspace` builds every binary of the workspace into the same directory.
    let p = PathBuf::from(env!("CARGO_BIN_EXE_meshgate-loadtest"))
        .parent()
        .unwrap()
        .join("meshgate");
    assert!(
        p.exists(),
        "{} missing: build it with cargo build -p meshgate",
        p.display()
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_sends_exactly_rate_times_duration_and_closed_loop_stops_at_the_count() {
    let top = Topology::start().await.unwrap();
    let direct = |mode, duration, max| Load {
        target: top.mesh.gateway_addr(),
        proto: Proto::H2Tls {
            config: top.tls.clone(),
            sni: SNI.to_string().try_into().unwrap(),
        },
        host: HOST.into(),
        path: "/?bytes=16".into(),
        headers: vec![],
        sources: vec!["127.0.0.1".parse().unwrap()],
        h2_connections: 2,
        mode,
        duration,
        max_requests: max,
        request_timeout: Duration::from_secs(20),
    };
    // Requests are due at i / rate for i = 0, 1, …: exactly rate × duration fall in the window.
    let out = gen::run(direct(
        Mode::Open {
            rate: 200.0,
            concurrency: 8,
        },
        Duration::from_secs(1),
        u64::MAX,
    ))
    .await;
    assert_eq!((out.sent, out.status(200), out.errors, out.timeouts), (200, 200, 0, 0));
    assert_eq!(out.body_bytes, 200 * 16);
    assert_eq!(out.latency.len(), 200);

    let out = gen::run(direct(Mode::Closed { concurrency: 16 }, Duration::from_secs(60), 500)).await;
    assert_eq!((out.sent, out.status(200), out.errors), (500, 500, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_runs_each_kind_of_scenario_against_all_targets_and_writes_the_report() {
    let out = tempfile::tempdir().unwrap();
    let haproxy = runner::find_haproxy();
    assert!(
        haproxy.exists(),
        "HAProxy is needed (Debian package haproxy; scripts/test.sh installs it)"
    );
    let opts = Options {
        out: out.path().to_path_buf(),
        rounds: 1,
        duration: Duration::from_millis(500),
        warmup: Duration::from_millis(200),
        scenarios: [
            "h1-small",
            "h2c-small",
            "mixed-deny",
            "peak",
            "half-load",
            "idle-1k",
            "cold-start",
        ]
        .map(String::from)
        .to_vec(),
        meshgate: meshgate_binary(),
        haproxy,
        pin: false,
        idle_override: Some(40),
        cold_requests: 100,
        command_line: "smoke test".into(),
    };
    let report = runner::compare(&opts).await.unwrap();
    let by_name = |n: &str| report.scenarios.iter().find(|s| s.name == n).unwrap();

    for name in ["h1-small", "h2c-small", "half-load"] {
        let sc = by_name(name);
        for t in [Target::Meshgate, Target::Haproxy, Target::Direct] {
            let s = sc.of(t).unwrap_or_else(|| panic!("{name}: no {t:?}"));
            assert!(s.requests > 0, "{name} {t:?}: {s:?}");
            assert_eq!(s.errors, 0, "{name} {t:?}: {:?}", sc.runs);
            assert_eq!(s.cpu_secs_per_10k.is_some(), t != Target::Direct, "{name} {t:?}");
        }
    }
    // Denied clients get 403 from both proxies, allowed ones 200, nothing else; and both answer
    // the 403 with `Connection: close` (issue #19), so the same work is compared: every denied
    // request came over a new connection.
    for run in &by_name("mixed-deny").runs {
        let (ok, denied) = (run.statuses.get(&200), run.statuses.get(&403));
        assert!(ok > Some(&0) && denied > Some(&0), "{run:?}");
        assert_eq!(run.statuses.len(), 2, "{run:?}");
        assert_eq!(run.errors, 0, "{run:?}");
        assert!(run.connections >= *denied.unwrap(), "{run:?}");
    }
    // Each proxy held to a quarter of a core: the kernel's quota caps what it used.
    let peak = by_name("peak");
    assert_eq!(peak.cpu_quota, Some(runner::PEAK_SHARE), "{:?}", peak.notes);
    assert!(peak.of(Target::Direct).is_none());
    for t in [Target::Meshgate, Target::Haproxy] {
        let s = peak.of(t).unwrap();
        assert!(s.requests > 0 && s.errors == 0, "{t:?}: {s:?}");
        let busy = s.proxy_cpu_busy.unwrap();
        assert!(
            busy <= runner::PEAK_SHARE + 0.1,
            "{t:?} used {busy} of a core under a quota of 0.25"
        );
    }
    assert!(report
        .checks
        .iter()
        .any(|c| c.goal.starts_with("Peak") && c.measured.contains("per core")));
    let idle = by_name("idle-1k");
    for t in [Target::Meshgate, Target::Haproxy] {
        let s = idle.of(t).unwrap();
        assert_eq!((s.idle_connections_held, s.errors), (Some(40), 0), "{t:?}");
        assert!(s.kib_per_idle_connection.is_some());
    }
    // A fresh proxy has to open its upstream connections: handshakes are counted.
    for run in &by_name("cold-start").runs {
        assert_eq!((run.answered, run.errors), (100, 0), "{run:?}");
        assert!(run.upstream_handshakes >= 1, "{run:?}");
    }
    assert_eq!(report.checks.len(), 6);

    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    for name in [
        "## h1-small",
        "## mixed-deny",
        "## idle-1k",
        "## cold-start",
        "| goal | measured | result |",
    ] {
        assert!(md.contains(name), "{name} missing from report.md");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(json["scenarios"].as_array().unwrap().len(), 7);
    let svg = std::fs::read_to_string(out.path().join("chart.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("h1-small"));
    assert!(out.path().join("haproxy.cfg").exists() && out.path().join("meshgate.yaml").exists());
}
