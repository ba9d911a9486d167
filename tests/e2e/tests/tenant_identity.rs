//! Per-tenant identity (issue #9): each tenant may present its own workload certificate, so the
//! mesh sees who called, and AuthorizationPolicies can tell tenants apart.

use e2e::*;
use meshsim::{MeshSpec, PodSpec, ServiceSpec};

const BILLING_PRINCIPAL: &str = "cluster.local/ns/billing/sa/billing-vm";
const LAPTOP_PRINCIPAL: &str = "cluster.local/ns/laptops/sa/laptop-vm";

/// `reviews` only lets the billing principal in (an AuthorizationPolicy); `details` lets anyone.
fn spec() -> MeshSpec {
    MeshSpec::new()
        .service(
            ServiceSpec::new("reviews", "bookinfo", 9080, "bookinfo-reviews")
                .pod(PodSpec::new("reviews-a").allow([BILLING_PRINCIPAL])),
        )
        .service(ServiceSpec::new("details", "bookinfo", 9080, "bookinfo-details").pod(PodSpec::new("details-a")))
}

fn tenants(key_hash: &str) -> String {
    format!(
        r#"services:
  reviews:
    host: {reviews}
    port: 9080
    protocol: http2
  details:
    host: {details}
    port: 9080
    protocol: http2
tenants:
  billing:
    sources: [127.20.0.0/16]
    allow: [reviews, details]
    identity:
      cert_chain: billing/cert-chain.pem
      key: billing/key.pem
      root_cert: root-cert.pem
  laptops:
    api_keys: ["{key_hash}"]
    allow: ["*"]
    identity:
      cert_chain: laptops/cert-chain.pem
      key: laptops/key.pem
      root_cert: root-cert.pem
  others:
    sources: [127.40.0.0/16]
    allow: [details]
"#,
        reviews = host("reviews"),
        details = host("details"),
    )
}

fn write_identity(ca: &meshsim::MeshCa, dir: &std::path::Path, ns: &str, sa: &str) -> anyhow::Result<()> {
    let c = ca.issue(ns, sa)?;
    std::fs::create_dir_all(dir.join(ns))?;
    std::fs::write(dir.join(ns).join("cert-chain.pem"), c.chain_pem)?;
    std::fs::write(dir.join(ns).join("key.pem"), c.key_pem)?;
    Ok(())
}

async fn env() -> Env {
    env_with("").await
}

async fn env_with(extra: &str) -> Env {
    let key_hash = format!("sha256:{}", hex::encode(meshgate::policy::keys::hash_key(LAPTOP_KEY)));
    EnvBuilder::default()
        .mesh(spec())
        .files(|ca, dir| {
            write_identity(ca, dir, "billing", "billing-vm")?;
            write_identity(ca, dir, "laptops", "laptop-vm")
        })
        .services_and_tenants(&tenants(&key_hash))
        .admin()
        .extra(extra)
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn each_tenant_presents_its_own_principal_and_the_mesh_policy_tells_them_apart() {
    let env = env().await;
    let key = [("x-meshgate-key", LAPTOP_KEY)];
    // The same service, three callers: the sidecar sees three principals.
    let billing = env.get(BILLING_IP, &host("details"), "/", &[]).await.unwrap();
    let laptop = env.get(STRANGER_IP, &host("details"), "/", &key).await.unwrap();
    let other = env.get("127.40.0.9", &host("details"), "/", &[]).await.unwrap();
    for r in [&billing, &laptop, &other] {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(
        billing.json()["peer_principal"],
        format!("spiffe://{BILLING_PRINCIPAL}")
    );
    assert_eq!(laptop.json()["peer_principal"], format!("spiffe://{LAPTOP_PRINCIPAL}"));
    assert_eq!(
        other.json()["peer_principal"],
        "spiffe://cluster.local/ns/meshgate/sa/meshgate",
        "a tenant without its own identity presents mesh.identity"
    );
    assert!(billing.json()["xfcc"]
        .as_str()
        .unwrap()
        .contains(&format!("URI=spiffe://{BILLING_PRINCIPAL}")));

    // reviews allows only billing's principal: billing gets in, the laptop is refused by the
    // sidecar's RBAC (not by meshgate: its tenant allows every service).
    let denied_before = env.mesh.stats().pods_total(|p| p.rbac_denied);
    let ok = env.get(BILLING_IP, &host("reviews"), "/", &[]).await.unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json()["peer_principal"], format!("spiffe://{BILLING_PRINCIPAL}"));
    let refused = env.get(STRANGER_IP, &host("reviews"), "/", &key).await.unwrap();
    assert_eq!(refused.status, 403);
    assert_eq!(refused.text(), "RBAC: access denied");
    assert_eq!(env.mesh.stats().pods_total(|p| p.rbac_denied) - denied_before, 1);
}

#[tokio::test]
async fn connections_are_never_shared_across_identities() {
    let env = env().await;
    let key = [("x-meshgate-key", LAPTOP_KEY)];
    // Interleave the two tenants on one service many times: every response must carry the
    // caller's own principal, whichever pooled connection served it.
    for i in 0..40 {
        let (src, headers, want): (&str, &[(&str, &str)], &str) = if i % 2 == 0 {
            (BILLING_IP, &[], BILLING_PRINCIPAL)
        } else {
            (STRANGER_IP, &key, LAPTOP_PRINCIPAL)
        };
        let r = env.get(src, &host("details"), "/", headers).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["peer_principal"], format!("spiffe://{want}"), "request {i}");
    }
    // The admin API shows which identity each tenant presents.
    let (status, body) = env.admin_get("/config").await.unwrap();
    assert_eq!(status, 200);
    let cfg: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        cfg["tenants"]["billing"]["identity"],
        format!("spiffe://{BILLING_PRINCIPAL}")
    );
    assert_eq!(
        cfg["tenants"]["others"]["identity"],
        "spiffe://cluster.local/ns/meshgate/sa/meshgate"
    );
    // Both identities' expiry is exported.
    let (_, metrics) = env.admin_get("/metrics").await.unwrap();
    for p in [
        BILLING_PRINCIPAL,
        LAPTOP_PRINCIPAL,
        "cluster.local/ns/meshgate/sa/meshgate",
    ] {
        assert!(
            metrics.contains(&format!(
                "meshgate_identity_expiry_timestamp_seconds{{identity=\"spiffe://{p}\"}}"
            )),
            "{p} missing from metrics"
        );
    }
}

#[tokio::test]
async fn a_tenant_identity_rotates_from_its_files_without_touching_the_others() {
    // The file watcher is off so that this test's explicit poll is the one that sees the change.
    let env = env_with("reload:\n  watch: false\n").await;
    let key = [("x-meshgate-key", LAPTOP_KEY)];
    let r = env.get(BILLING_IP, &host("details"), "/", &[]).await.unwrap();
    assert_eq!(r.json()["peer_principal"], format!("spiffe://{BILLING_PRINCIPAL}"));

    // The billing certificate is replaced on disk (say, by a Vault agent) with a new one.
    let rotated = env.mesh.ca().issue("billing", "billing-vm-2").unwrap();
    std::fs::write(env.dir.path().join("billing/key.pem"), &rotated.key_pem).unwrap();
    std::fs::write(env.dir.path().join("billing/cert-chain.pem"), &rotated.chain_pem).unwrap();
    assert!(env.gate.app.reload_identity().await.unwrap(), "rotation not installed");

    let r = env.get(BILLING_IP, &host("details"), "/", &[]).await.unwrap();
    assert_eq!(
        r.json()["peer_principal"],
        "spiffe://cluster.local/ns/billing/sa/billing-vm-2"
    );
    let r = env.get(STRANGER_IP, &host("details"), "/", &key).await.unwrap();
    assert_eq!(r.json()["peer_principal"], format!("spiffe://{LAPTOP_PRINCIPAL}"));
    // Nothing changed on disk since: the next poll installs nothing.
    assert!(!env.gate.app.reload_identity().await.unwrap());
}
