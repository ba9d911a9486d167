//! Istio sees who called (issue #21): tenants with `telemetry:` are attributed by the
//! destination sidecar as their own workloads, over HTTP/1.1, h2c and TCP (the metadata
//! exchange); a tenant without it sends nothing; the sidecar's answer never reaches the VM;
//! request ids and trace context pass through. meshsim decodes the metadata with its own
//! protobuf reader and applies Istio's stats rules (`meshsim::peer`).

use std::time::Duration;

use e2e::*;
use meshsim::Source;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OTHERS_IP: &str = "127.40.0.5";

/// The default services plus `db` (TCP), and tenants of their own: billing-vms and laptops with
/// `telemetry:`, others without.
fn config() -> String {
    let services = default_services_and_tenants()
        .split_once("tenants:\n")
        .unwrap()
        .0
        .to_string();
    format!(
        r#"{services}  db:
    host: db.data.svc.cluster.local
    port: 5432
    protocol: tcp
tenants:
  billing-vms:
    sources: [127.20.0.0/16]
    allow: [reviews, ratings, details, db]
    telemetry:
      workload: billing-batch
      app: billing
      version: v2
      cluster_id: vm-network
      labels:
        team: payments
  laptops:
    api_keys: ["{key}"]
    allow: ["*"]
    telemetry:
      workload: dev-laptops
  others:
    sources: [127.40.0.0/16]
    allow: [details, db]
tracing:
  sample_rate: 1.0
"#,
        key = key_hash(LAPTOP_KEY),
    )
}

async fn env() -> Env {
    EnvBuilder::default()
        .mesh(spec_with_db())
        .listener("  - name: db\n    bind: 127.0.0.1:0\n    protocol: tcp\n    service: db\n")
        .services_and_tenants(&config())
        .admin()
        .start()
        .await
        .unwrap()
}

fn billing() -> Source {
    Source {
        workload: "billing-batch".into(),
        // From meshgate's certificate (ns meshgate), as Istio takes it; the config's default.
        namespace: "meshgate".into(),
        app: "billing".into(),
        version: "v2".into(),
        canonical_service: "billing".into(),
        canonical_revision: "v2".into(),
        cluster: "vm-network".into(),
        principal: meshgate_principal(),
    }
}

fn laptops() -> Source {
    Source {
        workload: "dev-laptops".into(),
        namespace: "meshgate".into(),
        app: "dev-laptops".into(),
        version: "unknown".into(),
        canonical_service: "dev-laptops".into(),
        canonical_revision: "latest".into(),
        cluster: "unknown".into(),
        principal: meshgate_principal(),
    }
}

fn unknown() -> Source {
    Source {
        workload: "unknown".into(),
        namespace: "meshgate".into(),
        app: "unknown".into(),
        version: "unknown".into(),
        canonical_service: "unknown".into(),
        canonical_revision: "latest".into(),
        cluster: "unknown".into(),
        principal: meshgate_principal(),
    }
}

fn meshgate_principal() -> String {
    format!("spiffe://{TD}/ns/meshgate/sa/meshgate")
}

fn source_of(j: &serde_json::Value) -> Source {
    let s = |k: &str| {
        j["source"][k]
            .as_str()
            .unwrap_or_else(|| panic!("source.{k} in {j}"))
            .to_string()
    };
    Source {
        workload: s("workload"),
        namespace: s("namespace"),
        app: s("app"),
        version: s("version"),
        canonical_service: s("canonical_service"),
        canonical_revision: s("canonical_revision"),
        cluster: s("cluster"),
        principal: s("principal"),
    }
}

fn get(host: &str, path: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::get(path)
        .header("host", host)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn two_tenants_are_two_workloads_over_http1_and_h2c() {
    let env = env().await;
    // HTTP/1.1 client to an http2 and an http1 service, h2c client with a key to another.
    let mut h1 = env.h1(BILLING_IP).await.unwrap();
    for svc in ["reviews", "ratings"] {
        let r = h1.send(get(&format!("{}:9080", host(svc)), "/")).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        assert_eq!(source_of(&j), billing(), "{svc}: {j}");
        // The sidecar answered with its own metadata (it does only when it received some):
        // the VM never sees it.
        assert!(r.headers.get("x-envoy-peer-metadata").is_none(), "{svc}");
        assert!(r.headers.get("x-envoy-peer-metadata-id").is_none(), "{svc}");
        let id = j["peer_metadata_id"].as_str().unwrap();
        assert_eq!(id.split('~').count(), 4, "{id}");
    }
    let mut h2 = env.h2c(STRANGER_IP).await.unwrap();
    let mut req = get(&format!("{}:9080", host("details")), "/");
    req.headers_mut().insert("x-meshgate-key", LAPTOP_KEY.parse().unwrap());
    let r = h2.send(req).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(source_of(&j), laptops(), "{j}");
    assert!(r.headers.get("x-envoy-peer-metadata").is_none());
    // Two distinct blobs, two distinct ids (Istio caches decoded metadata by id).
    let billing_id = {
        let r = h1.send(get(&format!("{}:9080", host("details")), "/")).await.unwrap();
        r.json()["peer_metadata_id"].as_str().unwrap().to_string()
    };
    assert_ne!(j["peer_metadata_id"].as_str().unwrap(), billing_id);

    // The pods' own tallies agree: one source per tenant, counted per request.
    let stats = env.mesh.stats();
    let count = |who: &Source| {
        stats
            .pods
            .values()
            .map(|p| p.sources.get(who).copied().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(count(&billing()), 3);
    assert_eq!(count(&laptops()), 1);
    assert_eq!(count(&unknown()), 0);

    // meshgate's own metrics name the same workloads, one series per tenant with telemetry.
    let (_, metrics) = env.admin_get("/metrics").await.unwrap();
    let info: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("meshgate_tenant_info{"))
        .collect();
    assert_eq!(info.len(), 2, "{info:?}");
    assert!(info.iter().any(|l| l.contains(r#"tenant="billing-vms""#)
        && l.contains(r#"workload="billing-batch""#)
        && l.contains(r#"version="v2""#)
        && l.ends_with(" 1")));
}

#[tokio::test]
async fn a_tenant_without_telemetry_sends_no_metadata() {
    let env = env().await;
    let r = env
        .get(
            OTHERS_IP,
            &format!("{}:9080", host("details")),
            "/",
            // A client cannot make up metadata either.
            &[
                ("x-envoy-peer-metadata", "Cg0KBE5BTUUSBRoDdm0x"),
                ("x-envoy-peer-metadata-id", "forged"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert!(j["peer_metadata"].is_null(), "{j}");
    assert!(j["peer_metadata_id"].is_null(), "{j}");
    assert_eq!(source_of(&j), unknown());

    // Over TCP: plain ALPN `istio`, no exchange, attributed by certificate only.
    let addr = env.gate.addr("db").unwrap();
    let mut s = connect_from(addr, OTHERS_IP.parse().unwrap()).await.unwrap();
    echo_roundtrip(&mut s, b"no telemetry here").await;
    let snap = env
        .mesh
        .wait_for_stats(Duration::from_secs(10), |s| {
            s.pods["db-a"].sources.contains_key(&unknown())
        })
        .await
        .unwrap_or_else(|s| panic!("{:?}", s.pods["db-a"].sources));
    assert_eq!(snap.pods["db-a"].sources.len(), 1, "{:?}", snap.pods["db-a"].sources);
}

async fn echo_roundtrip(s: &mut tokio::net::TcpStream, payload: &[u8]) {
    s.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(CLIENT_TIMEOUT, s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    // Exactly the bytes sent: the sidecar's metadata preamble was taken out of the stream.
    assert_eq!(back, payload);
}

#[tokio::test]
async fn tcp_listener_and_connect_tunnel_run_the_metadata_exchange() {
    let env = env().await;
    // A server-speaks-second protocol through the TCP listener...
    let addr = env.gate.addr("db").unwrap();
    let mut s = connect_from(addr, BILLING_IP.parse().unwrap()).await.unwrap();
    echo_roundtrip(&mut s, b"SELECT 1;").await;
    // ...and a large echo, so the preamble handling holds past the first read.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    echo_roundtrip(&mut s, &big).await;
    drop(s);
    env.mesh
        .wait_for_stats(Duration::from_secs(10), |s| {
            s.pods["db-a"].sources.get(&billing()) == Some(&1)
        })
        .await
        .unwrap_or_else(|s| panic!("{:?}", s.pods["db-a"].sources));

    // CONNECT from the laptop tenant (by key).
    let key = format!("Proxy-Authorization: Bearer {LAPTOP_KEY}\r\n");
    let (head, mut s) = connect_tunnel(env.addr(), STRANGER_IP, "db.data.svc.cluster.local:5432", &key).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echo_roundtrip(&mut s, b"through a tunnel").await;
    env.mesh
        .wait_for_stats(Duration::from_secs(10), |s| {
            s.pods["db-a"].sources.get(&laptops()) == Some(&1)
        })
        .await
        .unwrap_or_else(|s| panic!("{:?}", s.pods["db-a"].sources));
}

#[tokio::test]
async fn request_ids_and_trace_context_flow_through() {
    let env = env().await;
    let details = format!("{}:9080", host("details"));
    // The client's own context passes unchanged, and its id comes back.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = env
        .get(
            BILLING_IP,
            &details,
            "/",
            &[
                ("x-request-id", "req-from-the-vm-1"),
                ("traceparent", tp),
                ("tracestate", "vendor=opaque"),
                ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
                ("x-b3-spanid", "e457b5a2e4d86bd1"),
                ("x-b3-sampled", "1"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-request-id"], "req-from-the-vm-1");
    let h = &r.json()["headers"];
    assert_eq!(h["x-request-id"][0], "req-from-the-vm-1");
    assert_eq!(h["traceparent"][0], tp);
    assert_eq!(h["tracestate"][0], "vendor=opaque");
    assert_eq!(h["x-b3-traceid"][0], "80f198ee56343ba864fe8b2a57d3eff7");
    assert_eq!(h["x-b3-spanid"][0], "e457b5a2e4d86bd1");

    // Without any: meshgate starts a trace (sampled: tracing.sample_rate is 1 here) and gives
    // the request an id, the same one upstream and in the response.
    let r = env.get(BILLING_IP, &details, "/", &[]).await.unwrap();
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    let h = &r.json()["headers"];
    assert_eq!(h["x-request-id"][0], id.as_str());
    let started = h["traceparent"][0].as_str().unwrap();
    let parts: Vec<&str> = started.split('-').collect();
    assert_eq!(parts.len(), 4, "{started}");
    assert_eq!(
        (parts[0], parts[1].len(), parts[2].len(), parts[3]),
        ("00", 32, 16, "01"),
        "{started}"
    );
    assert!(h.get("tracestate").is_none());

    // A malformed traceparent is replaced, and its tracestate dropped with it.
    let r = env
        .get(
            BILLING_IP,
            &details,
            "/",
            &[("traceparent", "00-0000-bad"), ("tracestate", "vendor=stale")],
        )
        .await
        .unwrap();
    let h = &r.json()["headers"];
    assert_ne!(h["traceparent"][0], "00-0000-bad");
    assert_eq!(h["traceparent"][0].as_str().unwrap().len(), 55);
    assert!(h.get("tracestate").is_none());

    // A refusal carries its id too, so a VM can quote it.
    let r = env
        .get(
            OTHERS_IP,
            &format!("{}:9080", host("reviews")),
            "/",
            &[("x-request-id", "denied-1")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.headers["x-request-id"], "denied-1");
}
