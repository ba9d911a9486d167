//! Services by host pattern and services files (issue #20), as `meshgate check` sees them, and
//! `meshgate services import` on realistic `kubectl` output.

use crate::cli::{assert_rejected, check, meshgate, replace, Fixture, BASE};

/// BASE with `yaml` (services, indented by two) inserted first under `services:`; its first
/// line is line 15 of the file.
fn with_services(yaml: &str) -> String {
    replace("services:\n", &format!("services:\n{yaml}"))
}

#[test]
fn a_pattern_config_is_summarized_with_its_rule() {
    let f = Fixture::new();
    let text = with_services(
        "  bookinfo:\n    host: \"*.bookinfo.svc.cluster.local\"\n    ports: [9080, 8080]\n  mesh-wide:\n    host: \"*.svc.cluster.local\"\n    port: 7000\n    protocol: http2\n",
    )
    .replace("allow: [reviews]", "allow: [reviews, bookinfo, mesh-wide]");
    let (code, out, err) = check(&f.config(&text));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("*.bookinfo.svc.cluster.local ports 9080,8080 Auto sni=outbound_.PORT_._.HOST expects any spiffe://cluster.local/ns/bookinfo/sa/* identity"),
        "{out}"
    );
    assert!(
        out.contains("/ns/NAMESPACE/sa/* identity (NAMESPACE from NAME.NAMESPACE.svc.DOMAIN)"),
        "{out}"
    );
}

#[test]
fn bad_patterns_are_refused_with_line_and_reason() {
    let f = Fixture::new();
    for (host, needle) in [
        ("\"*\"", "`*` alone would match every service"),
        ("\"*.\"", "`*` alone would match every service"),
        ("\"*.local\"", "would match every name under a top-level domain"),
        ("\"reviews.*.svc.cluster.local\"", "one leading `*.`"),
        ("\"*.*.svc.cluster.local\"", "would match every name"),
    ] {
        let text = with_services(&format!("  wide:\n    host: {host}\n    port: 80\n"));
        assert_rejected(&f, &text, 16, needle);
    }
    // A pattern whose hosts name no namespace needs its server identity spelt out.
    let text = with_services("  ext:\n    host: \"*.example.com\"\n    port: 80\n");
    assert_rejected(&f, &text, 16, "name no Kubernetes namespace");
    let ok = with_services("  ext:\n    host: \"*.example.com\"\n    port: 80\n    identity: any\n");
    assert_eq!(check(&f.config(&ok)).0, 0);
    // ports: belongs to patterns; exact hosts need a protocol.
    let text = with_services("  two:\n    host: two.ns.svc.cluster.local\n    ports: [80, 81]\n    protocol: http1\n");
    assert_rejected(&f, &text, 17, "ports: is for host patterns");
    let text = with_services("  bare:\n    host: bare.ns.svc.cluster.local\n    port: 80\n");
    assert_rejected(&f, &text, 15, "needs a protocol");
    let text = with_services("  p:\n    host: \"*.ns.svc.cluster.local\"\n    port: 80\n    subset: v1\n");
    assert_rejected(&f, &text, 18, "subset: is for one named service");
}

#[test]
fn overlapping_patterns_of_one_tenant_are_refused() {
    let f = Fixture::new();
    let services = "  narrow:\n    host: \"*.bookinfo.svc.cluster.local\"\n    port: 9080\n  wide:\n    host: \"*.svc.cluster.local\"\n    ports: [9080, 8080]\n";
    // Tenant laptops allows "*", so both: refused at its allow line (25 + 6 inserted lines).
    let text = with_services(services);
    assert_rejected(&f, &text, 29, "overlap on port 9080");
    // Each allowed by a different tenant: fine (a request takes the one its tenant may use).
    let text = with_services(services)
        .replace("allow: [reviews]", "allow: [reviews, narrow]")
        .replace("allow: [\"*\"]", "allow: [reviews, wide]");
    let (code, _, err) = check(&f.config(&text));
    assert_eq!(code, 0, "{err}");
    // Disjoint ports do not overlap.
    let text = with_services(&services.replace("ports: [9080, 8080]", "ports: [8080]"));
    assert_eq!(check(&f.config(&text)).0, 0);
}

#[test]
fn a_services_file_is_checked_with_its_own_lines() {
    let f = Fixture::new();
    let text = replace("services:\n", "services_file: imported.yaml\nservices:\n")
        .replace("allow: [reviews]", "allow: [reviews, ratings]");
    f.write(
        "imported.yaml",
        "# generated\nservices:\n  ratings:\n    host: ratings.bookinfo.svc.cluster.local\n    port: 9080\n    protocol: http1\n",
    );
    let path = f.config(&text);
    let (code, out, err) = check(&path);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("sni=outbound_.9080_._.ratings.bookinfo.svc.cluster.local"),
        "{out}"
    );
    // An error in the services file names that file and its line.
    f.write(
        "imported.yaml",
        "services:\n  ratings:\n    host: ratings.bookinfo.svc.cluster.local\n    port: 0\n    protocol: http1\n",
    );
    let (code, _, err) = check(&path);
    assert_eq!(code, 1);
    let file = f.dir.path().join("imported.yaml");
    assert!(err.contains(&format!("{}:4: invalid port 0", file.display())), "{err}");
    // A name both files define, and a host:port both route.
    f.write(
        "imported.yaml",
        "services:\n  reviews:\n    host: other.bookinfo.svc.cluster.local\n    port: 9080\n    protocol: http1\n  ratings:\n    host: reviews.bookinfo.svc.cluster.local\n    port: 9080\n    protocol: http1\n",
    );
    let (_, _, err) = check(&path);
    assert!(
        err.contains(&format!("{}:2: service \"reviews\" is defined twice", file.display())),
        "{err}"
    );
    assert!(err.contains("is already routed to service \"reviews\""), "{err}");
    // A missing file is an error at the key's line.
    std::fs::remove_file(&file).unwrap();
    let (_, _, err) = check(&path);
    assert!(
        err.contains(&format!("{}:14: cannot read services_file", path.display())),
        "{err}"
    );
}

#[test]
fn import_writes_a_services_file_that_check_accepts() {
    let f = Fixture::new();
    let input = concat!(env!("CARGO_MANIFEST_DIR"), "/src/import_testdata/kubectl.json");
    let out_path = f.dir.path().join("imported.yaml");
    let (code, stdout, err) = meshgate(&[
        "services",
        "import",
        "-f",
        input,
        "-o",
        out_path.to_str().unwrap(),
        "--namespace",
        "bookinfo",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(err.contains("services written"), "{err}");
    let written = std::fs::read_to_string(&out_path).unwrap();
    assert!(
        written.contains("host: ratings.bookinfo.svc.cluster.local"),
        "{written}"
    );
    // The imported names replace the hand-written reviews service.
    let text = replace(
        "services:\n  reviews:\n    host: reviews.bookinfo.svc.cluster.local\n    port: 9080\n    protocol: http2\n",
        "services_file: imported.yaml\n",
    )
    .replace("allow: [reviews]", "allow: [\"*\"]");
    let (code, out, err) = check(&f.config(&text));
    assert_eq!(code, 0, "{err}\n{written}");
    assert!(
        out.contains("sni=outbound_.9080_._.ratings.bookinfo.svc.cluster.local"),
        "{out}"
    );
    // Standard input works too, and bad input is one clear line.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["services", "import"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"{\"kind\": \"Deployment\"}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("Deployment") && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(BASE.lines().count(), 25);
}
