//! Operating a running instance: the admin API, hot reload and identity rotation under load.
//! (Drain and signals run against the real binary in `lifecycle.rs`.)

use std::time::Duration;

use e2e::*;
use http::{Method, StatusCode};

fn config_with_aliases(aliases: &[String], bad_cidr: bool) -> String {
    let base = default_services_and_tenants();
    let with_aliases = base.replacen(
        "    identity: spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews\n",
        &format!(
            "    identity: spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews\n    aliases: [{}]\n",
            aliases.join(", ")
        ),
        1,
    );
    if bad_cidr {
        with_aliases.replace("127.20.0.0/16", "127.20.0.0/99")
    } else {
        with_aliases
    }
}

/// Rewrites the services/tenants part of the running env's config file.
fn rewrite_config(env: &Env, body: &str) {
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let start = text.find("services:\n").unwrap();
    let end = text.find("upstream:\n").unwrap();
    let new = format!("{}{}{}", &text[..start], body, &text[end..]);
    // Write-then-rename, as config management tools do; the watcher sees one complete change.
    let tmp = env.config_path.with_extension("tmp");
    std::fs::write(&tmp, new).unwrap();
    std::fs::rename(&tmp, &env.config_path).unwrap();
}

#[tokio::test]
async fn admin_endpoints() {
    let token_dir = tempfile::tempdir().unwrap();
    let token_path = token_dir.path().join("token");
    std::fs::write(&token_path, "s3cret\n").unwrap();
    let env = EnvBuilder::default()
        .extra(&format!(
            "admin:\n  bind: 127.0.0.1:0\n  token_file: {}\nreload:\n  watch: false\n",
            token_path.display()
        ))
        .start()
        .await
        .unwrap();
    assert_eq!(
        env.admin_get("/healthz").await.unwrap(),
        (StatusCode::OK, "ok\n".into())
    );
    assert_eq!(
        env.admin_get("/readyz").await.unwrap(),
        (StatusCode::OK, "ready\n".into())
    );

    let r = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    // With a token set, everything but health, readiness and metrics needs it: /config lists
    // every tenant's sources and identities.
    for path in ["/pool", "/config"] {
        let (st, _) = env.admin_get(path).await.unwrap();
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{path} without the token");
        let (st, _) = admin_with_token(&env, Method::GET, path, "wrong").await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{path} with a wrong token");
    }
    let (st, pool) = admin_with_token(&env, Method::GET, "/pool", "s3cret").await;
    assert_eq!(st, StatusCode::OK);
    let pool: serde_json::Value = serde_json::from_str(&pool).unwrap();
    let reviews = pool["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["service"] == "reviews")
        .unwrap();
    assert!(!reviews["connections"].as_array().unwrap().is_empty(), "{reviews}");
    assert!(reviews["connections"][0]["age_seconds"].as_f64().is_some());

    let (st, cfg) = admin_with_token(&env, Method::GET, "/config", "s3cret").await;
    assert_eq!(st, StatusCode::OK);
    assert!(!cfg.contains(&key_hash(LAPTOP_KEY)), "key hash leaked: {cfg}");
    assert!(!cfg.contains("key.pem"), "key path leaked: {cfg}");
    assert!(!cfg.contains("s3cret"), "token leaked: {cfg}");
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["tenants"]["laptops"]["api_keys"][0], "<redacted>");
    assert_eq!(
        cfg["services"]["reviews"]["sni"],
        format!("outbound_.9080_._.{}", host("reviews"))
    );

    let (st, metrics) = env.admin_get("/metrics").await.unwrap();
    assert_eq!(st, StatusCode::OK);
    for name in [
        "meshgate_requests_total{",
        "meshgate_request_duration_seconds_bucket{",
        "meshgate_upstream_connections{service=\"reviews\"} ",
        "meshgate_upstream_connects_total{service=\"reviews\",result=\"ok\"}",
        "meshgate_upstream_handshake_duration_seconds_count{service=\"reviews\"}",
        "meshgate_upstream_requests_total{service=\"reviews\",connection=\"new\"}",
        "meshgate_identity_expiry_timestamp_seconds{identity=\"spiffe://cluster.local/ns/meshgate/sa/meshgate\"}",
        "meshgate_ready 1",
        "meshgate_draining 0",
        "meshgate_downstream_connections{listener=\"vm\"}",
        "process_resident_memory_bytes ",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }

    // Mutating endpoints need the token.
    let (st, _) = admin_request(env.admin_addr(), Method::POST, "/reload").await.unwrap();
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _) = admin_request(env.admin_addr(), Method::POST, "/drain").await.unwrap();
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(env.admin_get("/readyz").await.unwrap().0, StatusCode::OK);
    let (st, _) = admin_request(env.admin_addr(), Method::POST, "/explain").await.unwrap();
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, body) = admin_with_token(&env, Method::POST, "/reload", "s3cret").await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, _) = admin_with_token(&env, Method::POST, "/drain", "s3cret").await;
    assert_eq!(st, StatusCode::ACCEPTED);
    let (st, body) = env.admin_get("/readyz").await.unwrap();
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "not ready: draining\n");
}

async fn admin_with_token(env: &Env, method: Method, path: &str, token: &str) -> (StatusCode, String) {
    use bytes::Bytes;
    use http_body_util::Full;
    let mut c = Client::connect(env.admin_addr(), "127.0.0.1".parse().unwrap(), false)
        .await
        .unwrap();
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = c.send(req).await.unwrap();
    (r.status, r.text())
}

#[tokio::test]
async fn reload_under_load_keeps_every_request_and_applies_new_routes() {
    let env = EnvBuilder::default()
        .admin()
        .extra("reload:\n  watch: false\n")
        .start()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let load = Load::start(env.addr(), BILLING_IP, &host("reviews"), "/", 8);
    load.wait_for_more(200).await;
    let routed_before = env.mesh.stats().gateway_routed;
    let mut aliases: Vec<String> = Vec::new();
    for i in 0..10 {
        let invalid = i == 4;
        if !invalid {
            aliases.push(format!("reviews-gen{i}.test"));
        }
        rewrite_config(&env, &config_with_aliases(&aliases, invalid));
        let (st, body) = admin_request(env.admin_addr(), Method::POST, "/reload").await.unwrap();
        if invalid {
            assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
            assert!(body.contains(":") && body.contains("invalid CIDR"), "{body}");
        } else {
            assert_eq!(st, StatusCode::OK, "{body}");
        }
        // The newest valid alias routes; the running config survived the invalid file.
        let newest = aliases.last().unwrap();
        let r = env.get(BILLING_IP, newest, "/", &[]).await.unwrap();
        assert_eq!(r.status, 200, "{newest} after reload {i}: {}", r.text());
        load.wait_for_more(50).await;
        // Pacing, not synchronisation: spread the ten changes over a few seconds of traffic.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{ok} requests in {secs:.1}s ({:.0}/s) during 10 reloads, 0 failed",
        ok as f64 / secs
    );
    // The reviews pool's key never changed, so its connections were kept across reloads.
    let routed_after = env.mesh.stats().gateway_routed;
    assert!(
        routed_after <= routed_before + 2,
        "reloads re-dialed the gateway: {routed_before} -> {routed_after} connections"
    );
    let (_, metrics) = env.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("meshgate_config_reloads_total{result=\"ok\"} 9"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshgate_config_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn config_file_change_is_picked_up_by_the_watcher() {
    let env = EnvBuilder::default()
        .extra("reload:\n  interval: 100ms\n")
        .start()
        .await
        .unwrap();
    let r = env.get(BILLING_IP, "watched.test", "/", &[]).await.unwrap();
    assert_eq!(r.status, 404);
    rewrite_config(&env, &config_with_aliases(&["watched.test".into()], false));
    eventually(
        Duration::from_secs(20),
        "the watcher to apply the new alias",
        || async { env.get(BILLING_IP, "watched.test", "/", &[]).await.unwrap().status == 200 },
    )
    .await;
    // An invalid change is rejected and the last good config keeps serving.
    rewrite_config(&env, &config_with_aliases(&["watched.test".into()], true));
    eventually(
        Duration::from_secs(20),
        "the watcher to reject the bad file",
        || async {
            env.gate
                .app
                .metrics()
                .config_reloads
                .get_or_create(&meshgate::metrics::ResultLabels { result: "error".into() })
                .get()
                >= 1
        },
    )
    .await;
    assert_eq!(env.get(BILLING_IP, "watched.test", "/", &[]).await.unwrap().status, 200);
}

#[tokio::test]
async fn identity_rotation_under_load_keeps_every_request_and_uses_the_new_cert() {
    // The watcher's own timer is out of the way (1 h): the test drives each poll itself, so the
    // half-written state below is certainly seen, as many times as it says.
    let env = EnvBuilder::default()
        .admin()
        .extra("reload:\n  interval: 1h\n")
        .start()
        .await
        .unwrap();
    let first = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap().json();
    let old_hash = xfcc_hash(&first);
    let load = Load::start(env.addr(), BILLING_IP, &host("reviews"), "/", 8);
    load.wait_for_more(200).await;

    let new = env.mesh.ca().issue("meshgate", "meshgate").unwrap();
    // Written one file at a time, key first, as a naive rotation would: in between, the key does
    // not match the cert and must be ignored, not installed and not counted as an error.
    std::fs::write(env.dir.path().join("key.pem"), &new.key_pem).unwrap();
    let app = env.gate.app.clone();
    let polled = app.reload_identity().await;
    assert!(
        matches!(polled, Err(meshgate::identity::IdentityError::KeyMismatch { .. })),
        "the half-written pair was not seen as one: {polled:?}"
    );
    // More polls of the same half-written files (fewer than the ones after which a mismatch
    // counts as a failed reload), with requests flowing: the old pair stays in use.
    for _ in 1..meshgate::app::MISMATCH_POLLS - 1 {
        load.wait_for_more(50).await;
        assert!(matches!(app.reload_identity().await, Ok(false)));
        let j = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap().json();
        assert_eq!(xfcc_hash(&j), old_hash, "a request presented the half-written pair");
    }
    std::fs::write(env.dir.path().join("cert-chain.pem"), &new.chain_pem).unwrap();
    assert!(
        matches!(app.reload_identity().await, Ok(true)),
        "the completed pair was not installed"
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let new_hash = loop {
        let j = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap().json();
        let h = xfcc_hash(&j);
        if h != old_hash {
            break h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests never presented the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    load.wait_for_more(200).await;
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    eprintln!("{ok} requests across the rotation, 0 failed");
    // The sidecar saw the new leaf: its XFCC Hash is the SHA-256 of the certificate presented.
    let leaf_der = new.chain_der().unwrap()[0].clone();
    use sha2::Digest;
    assert_eq!(new_hash, hex::encode(sha2::Sha256::digest(leaf_der.as_ref())));
    let (_, metrics) = env.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("meshgate_identity_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    // The half-written pair (key before cert) was waited out, not counted as a failure.
    assert!(
        metrics.contains("meshgate_identity_reloads_total{result=\"error\"} 0"),
        "{metrics}"
    );
}

fn xfcc_hash(echo: &serde_json::Value) -> String {
    let xfcc = echo["xfcc"].as_str().unwrap();
    xfcc.split(';')
        .find_map(|kv| kv.strip_prefix("Hash="))
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn expired_identity_turns_readiness_off() {
    let env = EnvBuilder::default()
        .admin()
        .extra("reload:\n  interval: 100ms\n")
        .identity(|ca| {
            let mut o = meshsim::IssueOptions::workload(TD, "meshgate", "meshgate");
            o.not_after = std::time::SystemTime::now() + Duration::from_secs(2);
            let c = ca.issue_with(&o).unwrap();
            (c.chain_pem, c.key_pem, ca.root_pem())
        })
        .start()
        .await
        .unwrap();
    assert_eq!(env.admin_get("/readyz").await.unwrap().0, StatusCode::OK);
    eventually(Duration::from_secs(20), "readiness to go off at expiry", || async {
        let (st, body) = env.admin_get("/readyz").await.unwrap();
        st == StatusCode::SERVICE_UNAVAILABLE && body.contains("expired")
    })
    .await;
}

#[tokio::test]
async fn reload_moves_a_listener_new_bound_old_drained() {
    let env = EnvBuilder::default()
        .extra("reload:\n  watch: false\ndrain:\n  delay: 1s\n  spread: 1s\n  timeout: 5s\n")
        .start()
        .await
        .unwrap();
    let old = env.addr();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let text = text.replace("bind: 127.0.0.1:0", &format!("bind: 127.0.0.1:{port}"));
    std::fs::write(&env.config_path, text).unwrap();
    env.gate.app.reload().await.unwrap();
    let now = env.gate.app.listener_addrs().await;
    assert_eq!(
        now,
        vec![("vm".to_string(), format!("127.0.0.1:{port}").parse().unwrap())]
    );
    let mut c = Client::connect(now[0].1, BILLING_IP.parse().unwrap(), false)
        .await
        .unwrap();
    let req = http::Request::get("/")
        .header("host", host("reviews"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(c.send(req).await.unwrap().status, 200);
    // The old listener stops accepting once drained.
    eventually(Duration::from_secs(10), "the old listener to close", || async {
        tokio::net::TcpStream::connect(old).await.is_err()
    })
    .await;
}

#[tokio::test]
async fn the_admin_port_closes_connections_whose_head_never_ends() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = EnvBuilder::default()
        .admin()
        .extra("limits:\n  header_read_timeout: 1s\n")
        .start()
        .await
        .unwrap();
    let mut s = connect_from(env.admin_addr(), "127.0.0.1".parse().unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n").await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "an admin connection with a head that never ends was held open"
    );
    // And the port still answers others.
    assert_eq!(env.admin_get("/healthz").await.unwrap().0, StatusCode::OK);
}
