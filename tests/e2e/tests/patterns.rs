//! Services by host pattern (issue #20): meshgate's config names a pattern, never these
//! services, and meshsim's gateway routes each on the SNI meshgate builds from the host alone.

use std::time::Duration;

use bytes::Bytes;
use e2e::meshsim::{PodSpec, ServiceSpec};
use e2e::*;
use http::{Request, StatusCode};
use http_body_util::Full;

const SHOP: &str = "shop.svc.cluster.local";

/// The demo mesh plus namespace `shop`: `cart`, `catalog` (listed) and `orders` (port 8080), `admin` (port 9999,
/// outside the pattern's ports), `impostor` (its pod presents an identity of namespace
/// `other`), `db` (TCP, 5432); and `vault` in namespace `secrets`, which no pattern covers.
fn spec() -> e2e::meshsim::MeshSpec {
    meshsim::demo_spec()
        .service(ServiceSpec::new("cart", "shop", 8080, "shop-cart").pod(PodSpec::new("cart-a")))
        .service(ServiceSpec::new("catalog", "shop", 8080, "shop-catalog").pod(PodSpec::new("catalog-a")))
        .service(ServiceSpec::new("orders", "shop", 8080, "shop-orders").pod(PodSpec::new("orders-a")))
        .service(ServiceSpec::new("admin", "shop", 9999, "shop-admin").pod(PodSpec::new("admin-a")))
        .service(
            ServiceSpec::new("impostor", "shop", 8080, "shop-impostor")
                .pod(PodSpec::new("impostor-a").other_identity("other", "thief")),
        )
        .service(
            ServiceSpec::new("db", "shop", 5432, "shop-db")
                .tcp()
                .pod(PodSpec::new("db-a")),
        )
        .service(ServiceSpec::new("vault", "secrets", 8080, "vault").pod(PodSpec::new("vault-a")))
}

fn config() -> String {
    format!(
        r#"services:
  shop:
    host: "*.{SHOP}"
    ports: [8080]
  shop-db:
    host: "*.{SHOP}"
    port: 5432
    protocol: tcp
  details:
    host: {details}
    port: 9080
    protocol: http2
  # Listed: wins over the pattern (and declares HTTP/2 whatever the client speaks).
  catalog:
    host: catalog.{SHOP}
    port: 8080
    protocol: http2
tenants:
  batch:
    sources: [127.20.0.0/16]
    allow: [shop, shop-db, details, catalog]
  others:
    sources: [127.40.0.0/16]
    allow: [details]
"#,
        details = host("details"),
    )
}

async fn env(upstream_extra: &str) -> Env {
    EnvBuilder::default()
        .mesh(spec())
        .services_and_tenants(&config())
        .upstream(&format!(
            "upstream:\n  connect_timeout: 2s\n  handshake_timeout: 5s\n  request_timeout: 20s\n{upstream_extra}"
        ))
        .admin()
        .start()
        .await
        .unwrap()
}

async fn get(c: &mut Client, authority: &str) -> Resp {
    let req = Request::get(format!("http://{authority}/x"))
        .header("host", authority)
        .body(Full::new(Bytes::new()))
        .unwrap();
    c.send(req).await.unwrap()
}

fn metric(env: &Env, needle: &str) -> u64 {
    let text = env.gate.app.metrics().encode();
    text.lines()
        .find_map(|l| l.strip_prefix(needle))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test]
async fn http1_and_h2c_clients_reach_unlisted_services_through_one_pattern() {
    let env = env("").await;
    for (h2, alpn, first_offer) in [(false, "http/1.1", "istio-http/1.1"), (true, "h2", "istio-h2")] {
        let mut c = Client::connect(env.addr(), BILLING_IP.parse().unwrap(), h2)
            .await
            .unwrap();
        for name in ["cart", "orders"] {
            let authority = format!("{name}.{SHOP}:8080");
            let r = get(&mut c, &authority).await;
            assert_eq!(r.status, StatusCode::OK, "{name} h2={h2}: {}", r.text());
            let j = r.json();
            assert_eq!(j["pod"], format!("{name}-a"));
            // What the gateway routed on, and what the sidecar was offered and chose: the
            // client's own protocol, as a sidecar does on a port of unknown protocol.
            assert_eq!(j["sni"], format!("outbound_.8080_._.{name}.{SHOP}"));
            assert_eq!(j["alpn"], alpn, "h2={h2}");
            assert_eq!(j["offered_alpn"][0], first_offer, "h2={h2}");
            assert_eq!(j["offered_alpn"][1], "istio");
            assert_eq!(j["host"], authority);
            assert_eq!(j["peer_principal"], format!("spiffe://{TD}/ns/meshgate/sa/meshgate"));
        }
    }
    // One pool per host and client protocol, listed by /pool with the SNI each uses.
    let (status, body) = env.admin_get("/pool").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let pool: serde_json::Value = serde_json::from_str(&body).unwrap();
    let dests = pool["dynamic_destinations"].as_array().unwrap();
    assert_eq!(dests.len(), 4, "{body}");
    for d in dests {
        assert_eq!(d["service"], "shop");
        assert!(d["sni"].as_str().unwrap().starts_with("outbound_.8080_._."), "{d}");
        assert_eq!(d["server_identity"], format!("any spiffe://{TD}/ns/shop/sa/* identity"));
    }
    assert!(
        metric(
            &env,
            r#"meshgate_dynamic_requests_total{service="shop",host="cart.shop.svc.cluster.local"} "#
        ) >= 2
    );
    // The listed host wins over the pattern: its own pool, its declared protocol.
    let mut c = env.h1(BILLING_IP).await.unwrap();
    let r = get(&mut c, &format!("catalog.{SHOP}:8080")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["alpn"], "h2");
    let (_, body) = env.admin_get("/pool").await.unwrap();
    let pool: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(pool["dynamic_destinations"].as_array().unwrap().len(), 4, "{body}");
    assert_eq!(
        metric(&env, r#"meshgate_dynamic_destinations{service="shop"} "#),
        0,
        "set on scrape only"
    );
    let (_, text) = env.admin_get("/metrics").await.unwrap();
    assert!(
        text.contains(r#"meshgate_dynamic_destinations{service="shop"} 4"#),
        "{text}"
    );
}

#[tokio::test]
async fn hosts_and_ports_outside_the_pattern_and_other_tenants_are_refused() {
    let env = env("").await;
    let mut c = env.h1(BILLING_IP).await.unwrap();
    // Another namespace: no pattern covers it.
    let r = get(&mut c, "vault.secrets.svc.cluster.local:8080").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());
    // A port the pattern does not list.
    let r = get(&mut c, &format!("admin.{SHOP}:9999")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());
    // `*.shop.svc.cluster.local` does not match the suffix itself.
    let r = get(&mut c, &format!("{SHOP}:8080")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());
    // A tenant whose allow list does not name the pattern.
    let r = env
        .get("127.40.0.9", &format!("cart.{SHOP}:8080"), "/", &[])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_eq!(env.mesh.stats().gateway_routed, 0, "nothing refused reached the mesh");
}

#[tokio::test]
async fn an_unknown_service_is_a_502_that_names_the_sni_and_is_remembered() {
    let env = env("  unknown_service_cache: 60s\n").await;
    let mut c = env.h1(BILLING_IP).await.unwrap();
    let r = get(&mut c, &format!("ghost.{SHOP}:8080")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    // The gateway's refusal answered, not a connect or pool timeout: those are 503/504 with
    // other reasons, and the reason counted below is unknown_mesh_service.
    let text = r.text();
    assert!(text.contains(&format!("outbound_.8080_._.ghost.{SHOP}")), "{text}");
    assert!(
        text.contains("no such service") && text.contains("no sidecar endpoint"),
        "{text}"
    );
    let refused = env.mesh.stats().gateway_refused;
    assert!(refused >= 1);
    // The second request is answered from the negative cache: the gateway sees nothing new.
    let r = get(&mut c, &format!("ghost.{SHOP}:8080")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(env.mesh.stats().gateway_refused, refused);
    assert_eq!(
        metric(&env, r#"meshgate_unknown_mesh_service_total{service="shop"} "#),
        1
    );
    assert_eq!(
        metric(
            &env,
            r#"meshgate_upstream_errors_total{service="shop",reason="unknown_mesh_service"} "#
        ),
        2
    );
    // A service the gateway knows but with no sidecar endpoint left: the same answer.
    env.mesh.stop_pod("cart-a").await;
    let r = get(&mut c, &format!("cart.{SHOP}:8080")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert!(
        r.text().contains(&format!("outbound_.8080_._.cart.{SHOP}")),
        "{}",
        r.text()
    );
    assert_eq!(env.mesh.stats().gateway_upstream_failures, 1);
    // A host that never answered gets no host label of its own.
    let (_, metrics) = env.admin_get("/metrics").await.unwrap();
    assert!(!metrics.contains("host=\"ghost."), "{metrics}");
}

#[tokio::test]
async fn a_server_outside_the_hosts_namespace_is_refused() {
    let env = env("").await;
    let r = env
        .get(BILLING_IP, &format!("impostor.{SHOP}:8080"), "/", &[])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    let text = r.text();
    assert!(
        text.contains("spiffe://cluster.local/ns/other/sa/thief") && text.contains("/ns/shop/sa/*"),
        "{text}"
    );
}

#[tokio::test]
async fn connect_reaches_a_tcp_service_through_a_tcp_pattern() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = env("").await;
    let (head, mut s) = connect_tunnel(env.addr(), BILLING_IP, &format!("db.{SHOP}:5432"), "").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"ping through the pattern").await.unwrap();
    let mut buf = [0u8; 24];
    tokio::time::timeout(CLIENT_TIMEOUT, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping through the pattern");
    // An HTTP pattern's host is no tunnel target.
    let (head, _) = connect_tunnel(env.addr(), BILLING_IP, &format!("cart.{SHOP}:8080"), "").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
}

#[tokio::test]
async fn destinations_are_bounded_least_recently_used_first() {
    let env = env("  max_dynamic_destinations: 2\n  max_metric_hosts: 1\n").await;
    let mut c = env.h1(BILLING_IP).await.unwrap();
    for name in ["cart", "orders", "cart", "details-none"] {
        let _ = get(&mut c, &format!("{name}.{SHOP}:8080")).await;
    }
    let (_, body) = env.admin_get("/pool").await.unwrap();
    let pool: serde_json::Value = serde_json::from_str(&body).unwrap();
    let hosts: Vec<&str> = pool["dynamic_destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["host"].as_str().unwrap())
        .collect();
    // `orders` was the least recently used when the fourth host arrived.
    assert_eq!(
        hosts,
        [format!("details-none.{SHOP}"), format!("cart.{SHOP}")],
        "{body}"
    );
    // One host label, the rest counted as `other`.
    assert_eq!(
        metric(
            &env,
            r#"meshgate_dynamic_requests_total{service="shop",host="cart.shop.svc.cluster.local"} "#
        ),
        2
    );
    assert_eq!(
        metric(&env, r#"meshgate_dynamic_requests_total{service="shop",host="other"} "#),
        1
    );
}

#[tokio::test]
async fn a_services_file_is_hot_reloaded() {
    let body = format!(
        "services_file: services.yaml\nservices:\n  details:\n    host: {}\n    port: 9080\n    protocol: http2\ntenants:\n  batch:\n    sources: [127.20.0.0/16]\n    allow: [\"*\"]\n",
        host("details")
    );
    let env = EnvBuilder::default()
        .mesh(spec())
        .services_and_tenants(&body)
        .extra("reload:\n  interval: 100ms\n")
        .admin()
        .files(|_, dir| Ok(std::fs::write(dir.join("services.yaml"), "services: {}\n")?))
        .start()
        .await
        .unwrap();
    let cart = format!("cart.{SHOP}:8080");
    let r = env.get(BILLING_IP, &cart, "/", &[]).await.unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // What `meshgate services import -o` does: the whole file replaced at once.
    let file = env.dir.path().join("services.yaml");
    std::fs::write(
        file.with_extension("tmp"),
        format!("services:\n  cart-shop:\n    host: cart.{SHOP}\n    port: 8080\n    protocol: auto\n"),
    )
    .unwrap();
    std::fs::rename(file.with_extension("tmp"), &file).unwrap();
    eventually(Duration::from_secs(20), "the services file to be reloaded", || async {
        env.get(BILLING_IP, &cart, "/", &[])
            .await
            .is_ok_and(|r| r.status == StatusCode::OK)
    })
    .await;
    // A reload that leaves the destination's pool key alone keeps its pool and connections.
    let cart_pool = || async {
        let (_, body) = env.admin_get("/pool").await.unwrap();
        let pool: serde_json::Value = serde_json::from_str(&body).unwrap();
        pool["dynamic_destinations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["host"] == format!("cart.{SHOP}"))
            .map(|d| d["connections"].clone())
    };
    let before = cart_pool().await.expect("a pool for cart");
    assert!(!before.as_array().unwrap().is_empty());
    std::fs::write(
        file.with_extension("tmp"),
        format!(
            "services:\n  cart-shop:\n    host: cart.{SHOP}\n    port: 8080\n    protocol: auto\n  orders-shop:\n    host: orders.{SHOP}\n    port: 8080\n    protocol: http1\n"
        ),
    )
    .unwrap();
    std::fs::rename(file.with_extension("tmp"), &file).unwrap();
    let orders = format!("orders.{SHOP}:8080");
    eventually(Duration::from_secs(20), "the second services file", || async {
        env.get(BILLING_IP, &orders, "/", &[])
            .await
            .is_ok_and(|r| r.status == StatusCode::OK)
    })
    .await;
    let after = cart_pool().await.expect("cart's pool taken over");
    let ids = |v: &serde_json::Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(ids(&after), ids(&before));
    // A broken services file is refused; the running config (and the route) stays.
    std::fs::write(&file, "services:\n  cart-shop:\n    host: cart.shop\n    port: 0\n").unwrap();
    eventually(
        Duration::from_secs(20),
        "the broken services file to be refused",
        || async { metric(&env, r#"meshgate_config_reloads_total{result="error"} "#) >= 1 },
    )
    .await;
    let r = env.get(BILLING_IP, &cart, "/", &[]).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["alpn"], "http/1.1");
}
