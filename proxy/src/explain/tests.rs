//! explain against hand-written configs: every decision, and agreement with the data path.

use super::*;
use std::path::Path;
use std::time::SystemTime;

const CONFIG: &str = r#"listeners:
  - name: vm
    bind: 127.0.0.1:0
    protocol: http
mesh:
  trust_domain: cluster.local
  gateway: [eastwest.mesh.example.com:15443, 10.0.0.9:15443]
  identity:
    cert_chain: cert-chain.pem
    key: key.pem
    root_cert: root-cert.pem
services:
  reviews:
    host: reviews.bookinfo.svc.cluster.local
    port: 9080
    protocol: http2
    identity: spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews
  ratings:
    host: ratings.bookinfo.svc.cluster.local
    port: 9080
    protocol: http1
    subset: v2
  shop:
    host: "*.shop.svc.cluster.local"
    ports: [8080]
tenants:
  billing-vms:
    sources: [10.20.0.0/16]
    allow: [reviews]
    rate_limit: {requests_per_second: 50, burst: 100}
    max_concurrent_requests: 10
  ci:
    sources: [192.168.1.0/24]
    api_keys: ["sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"]
    allow: ["*"]
  private:
    sources: [10.30.0.0/16]
    vpce: [vpce-1]
    allow: [ratings]
"#;
// "hello" is the key whose digest the `ci` tenant holds.
const KEY: &str = "hello";

fn snapshot() -> (tempfile::TempDir, Snapshot) {
    let dir = tempfile::tempdir().unwrap();
    let ca = meshsim::MeshCa::new("cluster.local").unwrap();
    let cert = ca.issue("meshgate", "meshgate").unwrap();
    cert.write_files(dir.path(), &ca.root_pem()).unwrap();
    let path = dir.path().join("meshgate.yaml");
    let s = crate::config::parse(&path, CONFIG, SystemTime::now()).unwrap();
    (dir, s)
}

fn ask(s: &Snapshot, client: &str, key: Option<&str>, vpce: Option<&str>, target: &str) -> Explanation {
    explain(s, client.parse().unwrap(), key.map(hash_key).as_ref(), vpce, target)
}

fn refused(e: &Explanation, status: u16, reason: &str) {
    assert_eq!(e.decision, Decision::Refuse, "{e}");
    assert_eq!((e.status, e.reason.as_str()), (status, reason), "{e}");
}

#[test]
fn allowed_by_source_shows_tenant_route_and_identities() {
    let (_d, s) = snapshot();
    let e = ask(
        &s,
        "10.20.3.4",
        None,
        None,
        "http://reviews.bookinfo.svc.cluster.local:9080/x?y=1",
    );
    assert!(e.forwarded(), "{e}");
    assert_eq!((e.status, e.reason.as_str()), (200, "forwarded"));
    assert_eq!(e.authority.as_deref(), Some("reviews.bookinfo.svc.cluster.local:9080"));
    let t = e.tenant.as_ref().unwrap();
    assert_eq!(t.name, "billing-vms");
    assert_eq!(t.matched_by, "source 10.20.0.0/16");
    assert_eq!(
        t.rate_limit,
        Some(RateLimitInfo {
            requests_per_second: 50.0,
            burst: 100.0
        })
    );
    assert_eq!(t.max_concurrent_requests, Some(10));
    let r = e.route.as_ref().unwrap();
    assert_eq!(r.service, "reviews");
    assert_eq!(
        r.sni,
        crate::config::sni_for("reviews.bookinfo.svc.cluster.local", 9080, None)
    );
    assert_eq!(r.sni, "outbound_.9080_._.reviews.bookinfo.svc.cluster.local");
    assert_eq!(r.alpn, ["istio-h2", "istio", "h2"]);
    assert_eq!(r.gateway, ["eastwest.mesh.example.com:15443", "10.0.0.9:15443"]);
    assert_eq!(
        r.expected_server,
        "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
    );
    assert_eq!(
        e.client_identity.as_deref(),
        Some("spiffe://cluster.local/ns/meshgate/sa/meshgate")
    );
    assert!(e.message.is_none() && e.why.is_none());
}

#[test]
fn a_tenant_with_its_own_identity_presents_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = meshsim::MeshCa::new("cluster.local").unwrap();
    let mesh = ca.issue("meshgate", "meshgate").unwrap();
    mesh.write_files(dir.path(), &ca.root_pem()).unwrap();
    let billing = ca.issue("billing", "billing-vms").unwrap();
    billing
        .write_files(&dir.path().join("billing"), &ca.root_pem())
        .unwrap();
    let text = CONFIG.replace(
        "    max_concurrent_requests: 10\n",
        "    max_concurrent_requests: 10\n    identity:\n      cert_chain: billing/cert-chain.pem\n      \
             key: billing/key.pem\n      root_cert: billing/root-cert.pem\n",
    );
    let s = crate::config::parse(&dir.path().join("meshgate.yaml"), &text, SystemTime::now()).unwrap();
    let e = ask(&s, "10.20.0.1", None, None, "reviews.bookinfo.svc.cluster.local");
    assert_eq!(
        e.client_identity.as_deref(),
        Some("spiffe://cluster.local/ns/billing/sa/billing-vms")
    );
    let e = ask(&s, "192.168.1.5", Some(KEY), None, "reviews.bookinfo.svc.cluster.local");
    assert_eq!(
        e.client_identity.as_deref(),
        Some("spiffe://cluster.local/ns/meshgate/sa/meshgate")
    );
}

#[test]
fn bare_host_is_the_host_header_and_ipv4_mapped_clients_are_ipv4() {
    let (_d, s) = snapshot();
    let e = ask(
        &s,
        "::ffff:10.20.0.1",
        None,
        None,
        "REVIEWS.bookinfo.svc.cluster.local.",
    );
    assert!(e.forwarded(), "{e}");
    assert_eq!(e.client, "10.20.0.1");
    assert_eq!(e.authority.as_deref(), Some("REVIEWS.bookinfo.svc.cluster.local."));
}

#[test]
fn subset_and_http1_route() {
    let (_d, s) = snapshot();
    let e = ask(&s, "192.168.1.5", Some(KEY), None, "ratings.bookinfo.svc.cluster.local");
    assert!(e.forwarded(), "{e}");
    assert_eq!(
        e.tenant.as_ref().unwrap().matched_by,
        "API key, from source 192.168.1.0/24"
    );
    let r = e.route.unwrap();
    assert_eq!(r.sni, "outbound_.9080_.v2_.ratings.bookinfo.svc.cluster.local");
    assert_eq!(r.alpn, ["istio-http/1.1", "istio", "http/1.1"]);
    assert_eq!(r.expected_server, "any spiffe://cluster.local/ identity");
}

#[test]
fn deny_by_subnet() {
    let (_d, s) = snapshot();
    let e = ask(&s, "172.16.0.1", None, None, "reviews.bookinfo.svc.cluster.local");
    refused(&e, 403, "unknown_client");
    assert_eq!(e.message.as_deref(), Some("client address is not in any tenant"));
    assert_eq!(e.why.as_deref(), Some("no tenant lists a source containing 172.16.0.1"));
    assert!(e.tenant.is_none() && e.client_identity.is_none());
    // Where it would have gone is still shown.
    assert_eq!(e.route.unwrap().service, "reviews");

    let e = ask(&s, "192.168.1.5", None, None, "reviews.bookinfo.svc.cluster.local");
    refused(&e, 403, "unknown_client");
    assert_eq!(
        e.why.as_deref(),
        Some("tenant ci accepts 192.168.1.5 only with its API key")
    );

    let e = ask(
        &s,
        "10.30.0.1",
        None,
        Some("vpce-2"),
        "ratings.bookinfo.svc.cluster.local",
    );
    refused(&e, 403, "unknown_client");
    assert_eq!(
        e.why.as_deref(),
        Some("tenant private accepts 10.30.0.1 only through VPC endpoint vpce-1")
    );
    let e = ask(
        &s,
        "10.30.0.1",
        None,
        Some("vpce-1"),
        "ratings.bookinfo.svc.cluster.local",
    );
    assert!(e.forwarded(), "{e}");
    assert_eq!(
        e.tenant.unwrap().matched_by,
        "source 10.30.0.0/16, through VPC endpoint vpce-1"
    );
}

#[test]
fn deny_by_key() {
    let (_d, s) = snapshot();
    // A wrong key is never downgraded to a source match, even from a tenant's subnet.
    let e = ask(
        &s,
        "10.20.0.1",
        Some("wrong"),
        None,
        "reviews.bookinfo.svc.cluster.local",
    );
    refused(&e, 401, "bad_key");
    assert_eq!(
        e.why,
        Some(format!(
            "no tenant holds the key sha256:{}",
            hex::encode(hash_key("wrong"))
        ))
    );
    assert!(e.tenant.is_none());

    let e = ask(&s, "10.20.0.1", Some(KEY), None, "reviews.bookinfo.svc.cluster.local");
    refused(&e, 403, "key_wrong_source");
    assert_eq!(
        e.why.as_deref(),
        Some("the key belongs to tenant ci, which accepts it only from 192.168.1.0/24")
    );
}

#[test]
fn unknown_host_and_service_not_allowed() {
    let (_d, s) = snapshot();
    let e = ask(
        &s,
        "10.20.0.1",
        None,
        None,
        "http://details.bookinfo.svc.cluster.local/",
    );
    refused(&e, 404, "unknown_host");
    assert_eq!(
        e.why.as_deref(),
        Some("no service has details.bookinfo.svc.cluster.local as its host or an alias")
    );
    assert_eq!(e.tenant.as_ref().unwrap().name, "billing-vms");
    assert!(e.route.is_none());

    let e = ask(&s, "10.20.0.1", None, None, "ratings.bookinfo.svc.cluster.local");
    refused(&e, 403, "service_not_allowed");
    assert_eq!(e.why.as_deref(), Some("tenant billing-vms may call only: reviews"));
    assert_eq!(e.route.unwrap().service, "ratings");
}

#[test]
fn refusal_order_follows_the_data_path() {
    let (_d, s) = snapshot();
    // Tenant before route: an unknown client asking for an unknown host is 403, as in the pipeline.
    refused(
        &ask(&s, "172.16.0.1", None, None, "nope.example"),
        403,
        "unknown_client",
    );
    refused(
        &ask(&s, "10.20.0.1", None, None, "reviews:port"),
        400,
        "malformed_request",
    );
    refused(
        &ask(
            &s,
            "10.20.0.1",
            None,
            None,
            "https://reviews.bookinfo.svc.cluster.local/",
        ),
        404,
        "unknown_host",
    );
}

#[test]
fn query_checks_its_key_fields() {
    let (_d, s) = snapshot();
    let q = |key: Option<&str>, key_sha256: Option<&str>| Query {
        client: "192.168.1.5".parse().unwrap(),
        target: "reviews.bookinfo.svc.cluster.local".into(),
        key: key.map(Into::into),
        key_sha256: key_sha256.map(Into::into),
        vpce: None,
    };
    let hashed = format!("sha256:{}", hex::encode(hash_key(KEY)));
    assert!(q(Some(KEY), None).answer(&s).unwrap().forwarded());
    assert!(q(None, Some(&hashed)).answer(&s).unwrap().forwarded());
    assert!(q(Some(KEY), Some(&hashed)).answer(&s).is_err());
    assert!(q(None, Some("hello")).answer(&s).is_err());
    assert!(q(Some(" "), None).answer(&s).is_err());
    let no_target = Query {
        target: " ".into(),
        ..q(None, None)
    };
    assert!(no_target.answer(&s).is_err());
}

#[test]
fn json_round_trips_and_text_names_everything() {
    let (_d, s) = snapshot();
    let e = ask(&s, "10.20.0.1", None, None, "reviews.bookinfo.svc.cluster.local");
    let back: Explanation = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
    assert_eq!(back, e);
    let text = e.to_string();
    for needle in [
        "decision:        forward (200 forwarded)",
        "tenant:          billing-vms (matched by source 10.20.0.0/16)",
        "tenant limits:   rate 50 requests/s, burst 100; at most 10 concurrent requests",
        "sni:             outbound_.9080_._.reviews.bookinfo.svc.cluster.local",
        "alpn:            istio-h2, istio, h2",
        "client identity: spiffe://cluster.local/ns/meshgate/sa/meshgate",
    ] {
        assert!(text.contains(needle), "{needle:?} not in\n{text}");
    }
    assert!(Path::new(&e.config).ends_with("meshgate.yaml"));
}

#[test]
fn hbone_routes_show_transport_and_authority() {
    let dir = tempfile::tempdir().unwrap();
    let ca = meshsim::MeshCa::new("cluster.local").unwrap();
    ca.issue("meshgate", "meshgate")
        .unwrap()
        .write_files(dir.path(), &ca.root_pem())
        .unwrap();
    let text = CONFIG.replace(
            "    subset: v2\n",
            "    subset: v2\n  details:\n    host: details.bookinfo.svc.cluster.local\n    port: 9080\n    protocol: http2\n    transport: hbone\n    hbone:\n      address: \"[fd00::7]:15008\"\n  remote:\n    host: remote.bookinfo.svc.cluster.local\n    port: 9080\n    protocol: http1\n    transport: double-hbone\n    hbone:\n      gateway: ew.remote.example.com:15008\n      gateway_identity: spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway\n      network: vm-net\n",
        );
    let s = crate::config::parse(&dir.path().join("m.yaml"), &text, SystemTime::now()).unwrap();
    let e = ask(&s, "192.168.1.9", Some(KEY), None, "details.bookinfo.svc.cluster.local");
    let text = e.to_string();
    assert!(text.contains("transport:       hbone\n"), "{text}");
    assert!(text.contains("hbone address:   [fd00::7]:15008\n"), "{text}");
    assert!(
        text.contains("connect:         :authority [fd00::7]:9080, no SNI\n"),
        "{text}"
    );
    assert!(text.contains("alpn:            h2\n"), "{text}");
    assert!(!text.contains("sni:"), "{text}");
    let e = ask(&s, "192.168.1.9", Some(KEY), None, "remote.bookinfo.svc.cluster.local");
    let h = e.route.as_ref().unwrap().hbone.clone().unwrap();
    assert_eq!(h.transport, "double-hbone");
    assert_eq!(h.authority, "remote.bookinfo.svc.cluster.local:9080");
    assert_eq!(h.network.as_deref(), Some("vm-net"));
    let text = e.to_string();
    assert!(
            text.contains("hbone gateway:   ew.remote.example.com:15008 (spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway)"),
            "{text}"
        );
    // The JSON form (admin API) carries it too.
    let back: Explanation = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
    assert_eq!(back, e);
}

#[test]
fn a_pattern_route_shows_the_pattern_sni_alpn_and_identity_rule() {
    let (_d, s) = snapshot();
    let e = ask(
        &s,
        "192.168.1.7",
        Some(KEY),
        None,
        "http://Cart.shop.svc.cluster.local:8080/x",
    );
    assert!(e.forwarded(), "{e:?}");
    let r = e.route.as_ref().unwrap();
    assert_eq!(r.pattern.as_deref(), Some("*.shop.svc.cluster.local"));
    assert_eq!(r.service, "shop");
    assert_eq!(r.host, "cart.shop.svc.cluster.local");
    assert_eq!(r.sni, "outbound_.8080_._.cart.shop.svc.cluster.local");
    assert_eq!(r.protocol, "auto");
    assert_eq!(r.alpn.len(), 2, "{:?}", r.alpn);
    assert!(r.alpn[0].starts_with("istio-http/1.1, istio, http/1.1"), "{:?}", r.alpn);
    assert!(r.alpn[1].starts_with("istio-h2, istio, h2"), "{:?}", r.alpn);
    assert_eq!(r.expected_server, "any spiffe://cluster.local/ns/shop/sa/* identity");
    let text = e.to_string();
    assert!(text.contains("*.shop.svc.cluster.local"), "{text}");
    // A port outside the pattern, and a tenant that may not use it, as the data path decides.
    let e = ask(&s, "192.168.1.7", Some(KEY), None, "cart.shop.svc.cluster.local:9090");
    assert_eq!((e.status, e.reason.as_str()), (404, "unknown_host"));
    let e = ask(&s, "10.20.0.1", None, None, "cart.shop.svc.cluster.local:8080");
    assert_eq!((e.status, e.reason.as_str()), (403, "service_not_allowed"));
}
