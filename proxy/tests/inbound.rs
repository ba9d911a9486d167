//! `vm_services:` and `mesh-inbound` listeners as `meshgate check` sees them (issue #16): a good
//! config is summarized, and each kind of mistake is refused with its line and reason.

use crate::cli::{assert_rejected, check, replace, Fixture};

/// BASE with a `mesh-inbound` listener (lines 5-7) and `vm_services` appended; the first line
/// of `vm` is line 30.
fn with_inbound(vm: &str) -> String {
    replace(
        "admin:\n",
        "  - name: mesh-in\n    bind: 0.0.0.0:15443\n    protocol: mesh-inbound\nadmin:\n",
    ) + "vm_services:\n"
        + vm
}

const BILLING: &str = "  billing:\n    hosts: [billing.vms.internal]\n    port: 8080\n    protocol: http1\n    backends: [\"10.0.1.5:8080\", \"billing-2.vm.internal:8080\"]\n    allow: [\"spiffe://cluster.local/ns/shop/sa/cart\", \"ns/ops/*\"]\n";

#[test]
fn a_vm_service_is_summarized() {
    let f = Fixture::new();
    let (code, out, err) = check(&f.config(&with_inbound(BILLING)));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("mesh-in"), "{out}");
    assert!(
        out.contains("billing          billing.vms.internal port 8080 Http1 -> 10.0.1.5:8080, billing-2.vm.internal:8080 (RoundRobin) allow: spiffe://cluster.local/ns/shop/sa/cart, ns/ops/*"),
        "{out}"
    );
}

#[test]
fn bad_vm_services_are_refused_with_line_and_reason() {
    let f = Fixture::new();
    // Line numbers: 30 `billing:`, 31 hosts, 32 port, 33 protocol, 34 backends, 35 allow.
    assert_rejected(
        &f,
        &with_inbound(&BILLING.replace("\"10.0.1.5:8080\"", "\"10.0.1.5\"")),
        34,
        "backend \"10.0.1.5\"",
    );
    assert_rejected(
        &f,
        &with_inbound(&BILLING.replace("\"10.0.1.5:8080\"", "\"http://10.0.1.5:8080\"")),
        34,
        "backend \"http://10.0.1.5:8080\"",
    );
    // Principal rules that could never match a caller.
    for (rule, why) in [
        ("spiffe://other.domain/ns/shop/sa/cart", "trust domain \"other.domain\""),
        ("spiffe://cluster.local/ns/*/sa/cart", "`*` only ends a rule"),
        ("ns/Shop/*", "not a namespace name"),
    ] {
        let text = with_inbound(&BILLING.replace("\"ns/ops/*\"", &format!("\"{rule}\"")));
        assert_rejected(&f, &text, 35, why);
    }
    // A trust domain alias makes the first one acceptable.
    let text = with_inbound(&BILLING.replace("\"ns/ops/*\"", "\"spiffe://other.domain/ns/shop/sa/cart\"")).replace(
        "  trust_domain: cluster.local\n",
        "  trust_domain: cluster.local\n  trust_domain_aliases: [other.domain]\n",
    );
    let (code, _, err) = check(&f.config(&text));
    assert_eq!(code, 0, "{err}");
    // Default deny needs someone allowed; auto is not a VM protocol.
    assert_rejected(
        &f,
        &with_inbound(&BILLING.replace(
            "    allow: [\"spiffe://cluster.local/ns/shop/sa/cart\", \"ns/ops/*\"]\n",
            "",
        )),
        30,
        "allows no caller",
    );
    assert_rejected(
        &f,
        &with_inbound(&BILLING.replace("protocol: http1", "protocol: auto")),
        33,
        "protocol: http1, http2 or tcp",
    );
}

#[test]
fn listeners_and_vm_services_come_together_and_ports_do_not_clash() {
    let f = Fixture::new();
    // The outbound listener binds 127.0.0.1:8443; an inbound one on 0.0.0.0:8443 would fail.
    let text = with_inbound(BILLING)
        .replace(
            "    bind: 127.0.0.1:0\n    protocol: http\n",
            "    bind: 127.0.0.1:8443\n    protocol: http\n",
        )
        .replace("0.0.0.0:15443", "0.0.0.0:8443");
    assert_rejected(&f, &text, 6, "already bound by listener \"vm-http\" (port 8443)");
    // vm_services with nowhere to arrive, and a listener with nothing to serve.
    let text = replace("tenants:\n", &format!("vm_services:\n{BILLING}tenants:\n"));
    let (code, _, err) = check(&f.config(&text));
    assert_eq!(code, 1);
    assert!(err.contains("need a listener with protocol: mesh-inbound"), "{err}");
    let text = replace(
        "admin:\n",
        "  - name: mesh-in\n    bind: 0.0.0.0:15443\n    protocol: mesh-inbound\nadmin:\n",
    );
    assert_rejected(&f, &text, 5, "no vm_services for it to serve");
}

#[test]
fn explain_answers_for_a_mesh_caller() {
    let f = Fixture::new();
    let path = f.config(&with_inbound(BILLING));
    let cfg = path.to_str().unwrap();
    let ask =
        |principal: &str, target: &str| crate::cli::meshgate(&["explain", "-c", cfg, "--principal", principal, target]);
    let (code, out, err) = ask(
        "spiffe://cluster.local/ns/ops/sa/deployer",
        "outbound_.8080_._.billing.vms.internal",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("decision:        forward (200 forwarded)"), "{out}");
    assert!(out.contains("allowed by:      ns/ops/*"), "{out}");
    assert!(
        out.contains("backends:        10.0.1.5:8080, billing-2.vm.internal:8080 (RoundRobin)"),
        "{out}"
    );
    assert!(
        out.contains("server identity: spiffe://cluster.local/ns/meshgate/sa/meshgate"),
        "{out}"
    );
    let (code, out, _) = ask(
        "spiffe://cluster.local/ns/bookinfo/sa/reviews",
        "billing.vms.internal:8080",
    );
    assert_eq!(code, 1);
    assert!(out.contains("refuse (403 principal_not_allowed)"), "{out}");
    assert!(out.contains("matches none of billing's allow list"), "{out}");
    let (code, out, _) = ask(
        "spiffe://cluster.local/ns/ops/sa/x",
        "outbound_.9999_._.billing.vms.internal",
    );
    assert_eq!(code, 1);
    assert!(out.contains("refuse (404 unknown_vm_service)"), "{out}");
    let (code, out, _) = ask("spiffe://elsewhere/ns/ops/sa/x", "billing.vms.internal");
    assert_eq!(code, 1);
    assert!(out.contains("refuse (403 untrusted_caller)"), "{out}");
    // JSON, as for outbound questions.
    let (_, out, _) = crate::cli::meshgate(&[
        "explain",
        "-c",
        cfg,
        "--json",
        "--principal",
        "spiffe://cluster.local/ns/shop/sa/cart",
        "billing.vms.internal",
    ]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["vm_service"]["name"], "billing");
    assert_eq!(j["matched_rule"], "spiffe://cluster.local/ns/shop/sa/cart");
}
