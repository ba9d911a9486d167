"""The Istio manifests parse, carry the fields Istio requires, use the wire forms of
shared/reference/istio-wire.md (SNI outbound_.PORT_.SUBSET_.HOST, port 15443, principals
TRUST_DOMAIN/ns/NS/sa/SA), and agree with the Terraform example (trust domain, meshgate's SPIFFE
ID, the exposed services, the identity secret format)."""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ISTIO = Path(__file__).resolve().parents[1]
REPO = ISTIO.parents[1]
sys.path.insert(0, str(REPO / "terraform" / "tests"))

import tfeval  # noqa: E402

NETWORKING = {"Gateway", "ServiceEntry", "WorkloadEntry", "DestinationRule", "VirtualService"}
SECURITY = {"PeerAuthentication", "AuthorizationPolicy", "RequestAuthentication"}
API_GROUPS = {
    **{k: ("networking.istio.io", {"v1", "v1beta1", "v1alpha3"}) for k in NETWORKING},
    **{k: ("security.istio.io", {"v1", "v1beta1"}) for k in SECURITY},
    "IstioOperator": ("install.istio.io", {"v1alpha1"}),
    "Certificate": ("cert-manager.io", {"v1"}),
    "PushSecret": ("external-secrets.io", {"v1alpha1"}),
}
HELM_VALUES = {"helm-values.yaml", "istiod-values.yaml"}
PRINCIPAL = re.compile(r"^[a-z0-9.-]+/ns/[a-z0-9-]+/sa/[a-z0-9-]+$")
SNI = re.compile(r"^outbound_\.(\d+)_\.([a-z0-9-]*)_\.([a-z0-9.-]+)$")


def manifest_files():
    return sorted(p for p in ISTIO.rglob("*.yaml") if "tests" not in p.parts)


def objects():
    out = []
    for p in manifest_files():
        if p.name in HELM_VALUES:
            continue
        for doc in yaml.safe_load_all(p.read_text()):
            out.append((p, doc))
    return out


def of_kind(kind, under=None):
    """(path, object) of every manifest of a kind, or only those under a directory of ISTIO."""
    return [(p, d) for p, d in objects() if d["kind"] == kind and (under is None or p.is_relative_to(ISTIO / under))]


def one(kind):
    (item,) = of_kind(kind)
    return item[1]


def example():
    """terraform.tfvars of the example as Terraform sees it: converted to the example's variable
    types, defaults filled in."""
    raw = tfeval.load_hcl(REPO / "terraform/examples/complete/terraform.tfvars")
    scope = tfeval.Scope({}, REPO)
    values = {k: tfeval.evaluate(tfeval.parse_expr(tfeval.expr_source(v)), scope) for k, v in raw.items() if not k.startswith("__")}
    return tfeval.Module(REPO / "terraform/examples/complete").input_values(values)


def test_every_directory_has_manifests_and_a_readme():
    for d in ("eastwest-gateway", "peer-authentication", "authorization", "reverse", "identity", "subsets", "inbound"):
        assert (ISTIO / d / "README.md").is_file(), d
        assert list((ISTIO / d).rglob("*.yaml")), d
    for d in ("inbound/direct", "inbound/east-west"):
        assert list((ISTIO / d).glob("*.yaml")), d
    assert (ISTIO / "README.md").is_file()


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(ISTIO)))
def test_manifest_parses_with_required_fields(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs), path
    if path.name in HELM_VALUES:
        return
    for d in docs:
        kind = d.get("kind")
        assert kind in API_GROUPS, f"{path}: unexpected kind {kind}"
        group, versions = API_GROUPS[kind]
        g, _, v = d["apiVersion"].partition("/")
        assert g == group and v in versions, (path, d["apiVersion"])
        meta = d.get("metadata") or {}
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta.get("name", "")), (path, meta)
        assert meta.get("namespace"), f"{path}: {kind} {meta.get('name')} needs a namespace"
        assert isinstance(d.get("spec"), dict) and d["spec"], f"{path}: {kind} needs a spec"


def test_gateway_auto_passthrough_on_15443():
    gw = one("Gateway")
    spec = gw["spec"]
    assert spec["selector"] == {"istio": "eastwestgateway"}
    (server,) = spec["servers"]
    assert server["port"] == {"number": 15443, "name": "tls", "protocol": "TLS"}
    assert server["tls"] == {"mode": "AUTO_PASSTHROUGH"}
    assert server["hosts"] == ["*.local"]


def test_gateway_deployments_match_the_gateway():
    selector = one("Gateway")["spec"]["selector"]
    iop = one("IstioOperator")
    (gw,) = iop["spec"]["components"]["ingressGateways"]
    assert gw["enabled"] is True and gw["name"] == "istio-eastwestgateway"
    assert selector.items() <= gw["label"].items()
    network = gw["label"]["topology.istio.io/network"]
    env = {e["name"]: e["value"] for e in gw["k8s"]["env"]}
    assert env["ISTIO_META_REQUESTED_NETWORK_VIEW"] == network == iop["spec"]["values"]["global"]["network"]
    ports = {p["name"]: p for p in gw["k8s"]["service"]["ports"]}
    assert ports["tls"]["port"] == ports["tls"]["targetPort"] == 15443
    assert gw["k8s"]["serviceAnnotations"]["service.beta.kubernetes.io/aws-load-balancer-scheme"] == "internal"

    values = yaml.safe_load((ISTIO / "eastwest-gateway/helm-values.yaml").read_text())
    assert selector.items() <= values["labels"].items()
    assert values["env"]["ISTIO_META_REQUESTED_NETWORK_VIEW"] == values["labels"]["topology.istio.io/network"]
    ports = {p["name"]: p for p in values["service"]["ports"]}
    assert ports["tls"]["port"] == ports["tls"]["targetPort"] == 15443 and ports["tls"]["protocol"] == "TCP"
    assert values["service"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-scheme"] == "internal"


def test_example_services_are_exported_by_the_gateway():
    """Every service the example exposes gets an AUTO_PASSTHROUGH chain: its host matches the
    Gateway's hosts, and meshgate dials the gateway on 15443."""
    ex = example()
    hosts = one("Gateway")["spec"]["servers"][0]["hosts"]
    for name, s in ex["services"].items():
        assert any(fnmatch.fnmatchcase(s["host"], h) for h in hosts), (name, s["host"], hosts)
        sni = f"outbound_.{s['port']}_.{s.get('subset') or ''}_.{s['host']}"
        assert SNI.fullmatch(sni), sni
    for g in ex["mesh_gateways"]:
        assert g.endswith(":15443"), g


def test_sni_strings_in_docs_have_the_wire_form():
    ex = example()
    services = {(str(s["port"]), s.get("subset") or "", s["host"]) for s in ex["services"].values()}
    found = []
    for p in sorted(ISTIO.rglob("*")):
        if p.suffix in (".md", ".yaml") and "tests" not in p.parts:
            found += re.findall(r"outbound_\.[^\s`'\",)]+", p.read_text())
    found = [s for s in found if s != "outbound_.PORT_.SUBSET_.HOST"]  # the form itself
    assert found
    for s in found:
        m = SNI.fullmatch(s)
        assert m, f"{s!r} is not outbound_.PORT_.SUBSET_.HOST"
        if m.group(3).endswith(".svc.cluster.local") and m.group(3).split(".")[0] in ("payments", "reviews", "ratings"):
            assert m.groups() in services, f"{s} names no service of the example"


def test_peer_authentication_strict_mesh_wide():
    pa = one("PeerAuthentication")
    assert pa["metadata"] == {"name": "default", "namespace": "istio-system"}
    assert pa["spec"] == {"mtls": {"mode": "STRICT"}}


def test_authorization_policies_use_principal_form():
    ex = example()
    td = ex["trust_domain"]
    meshgate_principal = ex["spiffe_id"].removeprefix("spiffe://")
    policies = of_kind("AuthorizationPolicy")
    assert len(policies) >= 3
    principals = set()
    for path, ap in policies:
        spec = ap["spec"]
        assert spec["action"] in ("ALLOW", "DENY", "AUDIT", "CUSTOM"), path
        assert spec["selector"]["matchLabels"], path
        # Selecting one version leaves the service's other pods with no ALLOW policy: open.
        assert "version" not in spec["selector"]["matchLabels"], f"{path}: {ap['metadata']['name']}"
        assert spec["rules"], path
        for rule in spec["rules"]:
            for src in rule["from"]:
                for pr in src["source"]["principals"]:
                    assert PRINCIPAL.fullmatch(pr) and not pr.startswith("spiffe://"), f"{path}: {pr}"
                    assert pr.startswith(td + "/"), f"{path}: {pr} not in trust domain {td}"
                    principals.add(pr)
            for to in rule.get("to", []):
                assert set(to["operation"]) <= {"methods", "paths", "hosts", "notMethods", "notPaths"}, "ports in AuthorizationPolicy are pod ports, not Service ports; left out on purpose"
    assert meshgate_principal in principals, "allow-meshgate must name the example fleet's identity"


# ---- What the policies allow, evaluated as Istio does -------------------------------------------
# For one request: DENY policies that match refuse it; then, if ALLOW policies select the
# workload, one of their rules must match; a workload no ALLOW policy selects allows everything
# (mTLS STRICT still requires a mesh certificate). Operations (methods, paths) are not part of
# "may this principal call this service at all": a rule that matches the source allows some
# requests. Policies in istio-system apply mesh-wide.


def _principal_matches(pattern, principal):
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return principal.endswith(pattern[1:])
    if pattern.endswith("*"):
        return principal.startswith(pattern[:-1])
    return principal == pattern


def _rule_matches(rule, principal):
    sources = rule.get("from")
    if not sources:
        return True
    return any(
        any(_principal_matches(p, principal) for p in src["source"].get("principals", []))
        for src in sources
    )


def policies_allow(policies, principal, namespace, labels):
    applicable = [
        ap
        for ap in policies
        if ap["metadata"]["namespace"] in (namespace, "istio-system")
        and ap["spec"].get("selector", {}).get("matchLabels", {}).items() <= labels.items()
    ]
    for ap in applicable:
        if ap["spec"]["action"] == "DENY" and any(_rule_matches(r, principal) for r in ap["spec"]["rules"]):
            return False
    allows = [ap for ap in applicable if ap["spec"]["action"] == "ALLOW"]
    if not allows:
        return True
    return any(_rule_matches(r, principal) for ap in allows for r in ap["spec"]["rules"])


def service_pods(service):
    """(namespace, labels) of every pod a service's requests may land on: NAME.NS.svc... has
    pods labelled app=NAME in NS; a subset pins the version, otherwise any of them."""
    name, namespace = service["host"].split(".")[:2]
    versions = [service["subset"]] if service.get("subset") else ["v1", "v2", "v3"]
    return [(namespace, {"app": name, "version": v}) for v in versions]


def assert_policies_match(policies, services, tenants, fleet_principal):
    """Every (principal, service) pair: the policies allow it exactly when meshgate lets a tenant
    presenting that principal call that service."""
    allowed = {}
    for name, t in tenants.items():
        identity = t.get("identity") or {}
        principal = (identity.get("spiffe_id") or fleet_principal).removeprefix("spiffe://")
        want = set(services) if "*" in t["allow"] else set(t["allow"])
        assert want <= set(services), (name, want)
        allowed.setdefault(principal, set()).update(want)
    assert allowed
    # And a principal no tenant presents (another workload of the meshgate namespace) reaches
    # none of them: each service is bounded by an ALLOW policy, not left open.
    allowed.setdefault("cluster.local/ns/meshgate/sa/not-a-tenant", set())
    for principal, want in allowed.items():
        for name, svc in services.items():
            verdicts = {policies_allow(policies, principal, ns, labels) for ns, labels in service_pods(svc)}
            assert len(verdicts) == 1, f"{principal} -> {name}: allowed on some pods only"
            (verdict,) = verdicts
            assert verdict == (name in want), (
                f"{principal} -> {name}: meshgate {'allows' if name in want else 'denies'} it, "
                f"the policies {'allow' if verdict else 'deny'} it"
            )


def policies_in(filename):
    return [d for p, d in of_kind("AuthorizationPolicy") if p.name == filename]


def test_policy_evaluation_follows_istio():
    allow = {"metadata": {"namespace": "ns"}, "spec": {"selector": {"matchLabels": {"app": "a"}}, "action": "ALLOW",
             "rules": [{"from": [{"source": {"principals": ["td/ns/x/sa/y"]}}]}]}}
    deny = {"metadata": {"namespace": "istio-system"}, "spec": {"action": "DENY",
            "rules": [{"from": [{"source": {"principals": ["td/ns/bad/*"]}}]}]}}
    pod = ("ns", {"app": "a", "version": "v1"})
    assert policies_allow([allow], "td/ns/x/sa/y", *pod)
    assert not policies_allow([allow], "td/ns/x/sa/z", *pod)
    assert policies_allow([allow], "td/ns/x/sa/z", "ns", {"app": "b"}), "no ALLOW policy selects b"
    assert not policies_allow([allow, deny], "td/ns/bad/sa/y", "ns", {"app": "b"})
    only_v2 = {**allow, "spec": {**allow["spec"], "selector": {"matchLabels": {"app": "a", "version": "v2"}}}}
    assert policies_allow([only_v2], "td/ns/x/sa/z", *pod), "a v2-only policy leaves v1 open"


def test_fleet_policies_match_the_terraform_example():
    """allow-meshgate.yaml is the policy set for terraform/examples/complete, whose tenants all
    present the fleet's certificate."""
    ex = example()
    assert_policies_match(policies_in("allow-meshgate.yaml"), ex["services"], ex["tenants"], ex["spiffe_id"])


def test_per_tenant_policies_match_their_meshgate_config():
    config = yaml.safe_load((ISTIO / "authorization/meshgate-per-tenant.yml").read_text())
    assert all((t.get("identity") or {}).get("spiffe_id") for t in config["tenants"].values())
    assert_policies_match(policies_in("per-tenant.yaml"), config["services"], config["tenants"], None)


def test_subset_services_have_a_destination_rule_the_gateway_sees():
    rules = [d for _, d in of_kind("DestinationRule")]
    config = yaml.safe_load((ISTIO / "authorization/meshgate-per-tenant.yml").read_text())
    services = list(example()["services"].values()) + list(config["services"].values())
    subsets = [s for s in services if s.get("subset")]
    assert subsets
    for s in subsets:
        found = [
            r for r in rules
            if r["spec"]["host"] == s["host"]
            and any(sub["name"] == s["subset"] for sub in r["spec"].get("subsets", []))
            and set(r["spec"].get("exportTo", ["*"])) & {"*", "istio-system"}
        ]
        assert found, f"no DestinationRule exported to the gateway defines subset {s['subset']} of {s['host']}"


def test_reverse_direction_through_the_vm_load_balancer():
    ((_, se),) = of_kind("ServiceEntry", "reverse")
    ((_, we),) = of_kind("WorkloadEntry", "reverse")
    ((_, dr),) = of_kind("DestinationRule", "reverse")
    spec = se["spec"]
    assert spec["hosts"] and spec["location"] == "MESH_INTERNAL"
    assert spec["resolution"] in ("DNS", "STATIC", "DNS_ROUND_ROBIN")
    ports = {p["name"]: p for p in spec["ports"]}
    for p in ports.values():
        assert 1 <= p["number"] <= 65535 and p["protocol"] in ("HTTP", "HTTPS", "HTTP2", "GRPC", "TCP", "TLS")
    # workloadSelector picks the WorkloadEntry; its port names exist on the ServiceEntry.
    assert se["metadata"]["namespace"] == we["metadata"]["namespace"]
    assert spec["workloadSelector"]["labels"].items() <= we["spec"]["labels"].items()
    assert set(we["spec"]["ports"]) <= set(ports)
    # A DNS name as address needs DNS resolution; no sidecar behind it, so no Istio mTLS.
    if not re.fullmatch(r"[0-9.]+|[0-9a-f:]+", we["spec"]["address"]):
        assert spec["resolution"] == "DNS"
    assert we["spec"]["labels"].get("security.istio.io/tlsMode") != "istio"
    assert dr["spec"]["host"] in spec["hosts"]
    assert dr["spec"]["trafficPolicy"]["tls"]["mode"] == "DISABLE"


def test_identity_recipe_matches_the_fleet():
    ex = example()
    cert = one("Certificate")["spec"]
    assert cert["uris"] == [ex["spiffe_id"]]
    assert not {"commonName", "dnsNames", "ipAddresses", "emailAddresses"} & set(cert), "Istio-shaped: one URI SAN, no subject"
    assert {"client auth", "server auth"} <= set(cert["usages"])
    assert cert["privateKey"]["algorithm"] == "ECDSA"
    push = one("PushSecret")["spec"]
    assert push["selector"]["secret"]["name"] == cert["secretName"]
    pushed = {d["match"]["secretKey"]: d["match"]["remoteRef"]["property"] for d in push["data"]}
    assert pushed == {"tls.crt": "cert_chain", "tls.key": "key", "ca.crt": "root_cert"}
    assert len({d["match"]["remoteRef"]["remoteKey"] for d in push["data"]}) == 1
    # The fleet's fetcher reads exactly these JSON keys.
    fetcher = (REPO / "terraform/modules/fleet/templates/user_data.sh.tftpl").read_text()
    for key in pushed.values():
        assert f'("{key}", ' in fetcher, key
    # The secret name the example's fleet reads.
    remote = push["data"][0]["match"]["remoteRef"]["remoteKey"]
    assert f":secret:{remote}-" in ex["identity_secret_arn"]


def test_vault_recipe():
    script = ISTIO / "identity/vault-pki.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert 'allowed_uri_sans="$SPIFFE_ID"' in text and "require_cn=false" in text
    assert re.search(r"SPIFFE_ID=\$\{SPIFFE_ID:-spiffe://\$TRUST_DOMAIN/ns/[a-z0-9-]+/sa/[a-z0-9-]+\}", text)
    for f in ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"):
        assert f"--from-file={f}=" in text, f"cacerts needs {f}"
    # The Vault paths the recipe creates are the ones its fleet example names.
    assert "pki_meshgate/issue/meshgate" in text and "pki_root/cert/ca" in text


# ---- The mesh → VM direction: infra/istio/inbound ----------------------------------------------
# Both ways of reaching meshgate's mesh-inbound listener, checked against the example's
# vm_services, mesh_inbound port and identity: (A) direct, a ServiceEntry whose endpoint is the
# NLB; (B) east-west, meshgate as a WorkloadEntry on a network whose gateway is the NLB.

TLS_MODE = "security.istio.io/tlsMode"
# The Istio port protocols that carry each vm_service protocol.
PORT_PROTOCOLS = {"http1": {"HTTP"}, "http2": {"HTTP2", "GRPC"}, "tcp": {"TCP"}}


def inbound_example():
    ex = example()
    assert ex["mesh_inbound"] and ex["vm_services"], "the example enables the mesh → VM direction"
    return ex, ex["mesh_inbound"]["port"], ex["vm_services"]


def is_ip(address):
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        return False


def nlb_dns_name(ex):
    """How an internal NLB's DNS name looks (terraform output nlb_dns_name): the manifests name
    the example's fleet in the example's region."""
    return re.compile(rf"internal-{re.escape(ex['name'])}-[0-9a-z]+\.elb\.{re.escape(ex['region'])}\.amazonaws\.com")


def caller_namespaces(allow):
    """The namespaces a vm_service's allow list admits callers from, or {"*"} when it admits a
    whole trust domain."""
    out = set()
    for a in allow:
        if a == "*" or re.fullmatch(r"spiffe://[a-z0-9.-]+/\*", a):
            return {"*"}
        m = re.fullmatch(r"(?:(?:spiffe://)?[a-z0-9.-]+/)?ns/([a-z0-9-]+)/(?:\*|sa/(?:\*|[a-z0-9-]+))", a)
        assert m, f"{a!r} is none of meshgate's allow forms"
        out.add(m.group(1))
    return out


def workload_spiffe_id(we, trust_domain):
    """The SPIFFE ID Istio derives from a WorkloadEntry's namespace and serviceAccount."""
    return f"spiffe://{trust_domain}/ns/{we['metadata']['namespace']}/sa/{we['spec']['serviceAccount']}"


def service_entries_for(under, vm_services):
    """vm_service name -> the ServiceEntry under a directory that registers its hosts."""
    entries = of_kind("ServiceEntry", under)
    out = {}
    for name, svc in vm_services.items():
        found = [(p, se) for p, se in entries if set(se["spec"]["hosts"]) == set(svc["hosts"])]
        assert len(found) == 1, f"{under}: one ServiceEntry for {name} ({svc['hosts']}), found {len(found)}"
        out[name] = found[0]
    assert len(entries) == len(out), f"{under}: a ServiceEntry for no vm_service of the example"
    return out


def assert_service_entry_reaches_mesh_inbound(path, se, svc, inbound_port):
    """What both ways share: the vm_service's hosts and port, the port a protocol carrying the
    vm_service's, and the connection sent to the mesh-inbound port."""
    spec = se["spec"]
    assert spec["location"] == "MESH_INTERNAL", f"{path}: auto mTLS never applies to MESH_EXTERNAL"
    (port,) = spec["ports"]
    assert port["number"] == svc["port"], f"{path}: callers dial the vm_service's port (and the SNI carries it)"
    assert port["protocol"] in PORT_PROTOCOLS[svc["protocol"]], (path, port, svc["protocol"])
    assert port["name"], path
    assert port.get("targetPort") == inbound_port, f"{path}: the connection goes to the mesh-inbound port"
    # No endpoint or WorkloadEntry port overrides targetPort with another one.
    for ep in spec.get("endpoints", []):
        assert ep.get("ports", {}).get(port["name"], inbound_port) == inbound_port, (path, ep)
    assert se["metadata"]["namespace"], path


def test_inbound_direct_service_entries_point_at_the_mesh_inbound_listener():
    ex, inbound_port, vm_services = inbound_example()
    dns_name = nlb_dns_name(ex)
    for name, (path, se) in service_entries_for("inbound/direct", vm_services).items():
        svc = vm_services[name]
        assert_service_entry_reaches_mesh_inbound(path, se, svc, inbound_port)
        spec = se["spec"]
        assert spec["resolution"] in ("DNS", "STATIC"), path
        assert "workloadSelector" not in spec and spec["endpoints"], f"{path}: the NLB as the endpoint"
        for ep in spec["endpoints"]:
            # Auto mTLS sends Istio mTLS to labelled endpoints only.
            assert ep["labels"][TLS_MODE] == "istio", (path, ep)
            if is_ip(ep["address"]):
                assert spec["resolution"] == "STATIC", f"{path}: an IP endpoint wants STATIC"
            else:
                assert spec["resolution"] == "DNS", f"{path}: a DNS name as endpoint needs resolution DNS"
                assert dns_name.fullmatch(ep["address"]), f"{path}: {ep['address']} is not the fleet's NLB"
        # Sidecars accept meshgate's certificate only.
        assert spec["subjectAltNames"] == [ex["spiffe_id"]], path


def test_inbound_direct_destination_rules_pin_istio_mtls_to_meshgate():
    ex, _, vm_services = inbound_example()
    entries = service_entries_for("inbound/direct", vm_services)
    rules = {d["spec"]["host"]: (p, d) for p, d in of_kind("DestinationRule", "inbound/direct")}
    for name, (_, se) in entries.items():
        svc = vm_services[name]
        for host in svc["hosts"]:
            assert host in rules, f"no DestinationRule for {host}"
            path, dr = rules[host]
            assert dr["metadata"]["namespace"] == se["metadata"]["namespace"], f"{path}: the service's namespace, looked up after the caller's"
            tls = dr["spec"]["trafficPolicy"]["tls"]
            assert tls["mode"] == "ISTIO_MUTUAL", path
            assert tls["subjectAltNames"] == [ex["spiffe_id"]], path
            if "sni" in tls:
                # What the caller's sidecar would send anyway, and what meshgate routes on.
                assert tls["sni"] == f"outbound_.{svc['port']}_._.{host}", path
                assert SNI.fullmatch(tls["sni"]), path
            assert set(dr["spec"].get("exportTo", ["*"])) >= set(se["spec"].get("exportTo", ["*"])), f"{path}: seen wherever the ServiceEntry is"
    assert len(rules) == sum(len(s["hosts"]) for s in vm_services.values())


def test_inbound_east_west_workload_entry_is_meshgate_on_a_network_of_its_own():
    ex, inbound_port, _ = inbound_example()
    ((path, we),) = of_kind("WorkloadEntry", "inbound/east-west")
    spec = we["spec"]
    # Istio derives the identity sidecars require from the namespace and service account.
    spiffe_id = workload_spiffe_id(we, ex["trust_domain"])
    assert spiffe_id == ex["spiffe_id"], f"{path}: {spiffe_id} is not meshgate's identity {ex['spiffe_id']}"
    # Across networks Istio only routes to mTLS endpoints.
    assert spec["labels"][TLS_MODE] == "istio", path
    cluster_network = one("IstioOperator")["spec"]["values"]["global"]["network"]
    assert spec["network"] and spec["network"] != cluster_network, f"{path}: a network of its own, not the cluster's {cluster_network}"
    assert is_ip(spec["address"]) and ipaddress.ip_address(spec["address"]).is_private, f"{path}: one of the internal NLB's addresses"
    for port in spec.get("ports", {}).values():
        assert port == inbound_port, path


def test_inbound_east_west_service_entries_select_meshgate():
    _, inbound_port, vm_services = inbound_example()
    ((_, we),) = of_kind("WorkloadEntry", "inbound/east-west")
    for name, (path, se) in service_entries_for("inbound/east-west", vm_services).items():
        assert_service_entry_reaches_mesh_inbound(path, se, vm_services[name], inbound_port)
        spec = se["spec"]
        assert "endpoints" not in spec, path
        # workloadSelector picks WorkloadEntries of its own namespace.
        assert se["metadata"]["namespace"] == we["metadata"]["namespace"], path
        assert spec["workloadSelector"]["labels"].items() <= we["spec"]["labels"].items(), path
        assert spec["resolution"] == "STATIC", f"{path}: the WorkloadEntry's address is an IP"


def test_inbound_east_west_network_gateway_is_the_mesh_inbound_listener():
    ex, inbound_port, _ = inbound_example()
    ((_, we),) = of_kind("WorkloadEntry", "inbound/east-west")
    values = yaml.safe_load((ISTIO / "inbound/east-west/istiod-values.yaml").read_text())
    networks = values["global"]["meshNetworks"]
    network = networks[we["spec"]["network"]]
    # The NLB on the mesh-inbound port is the network's only gateway: what sidecars on other
    # networks send vm-network's traffic to.
    (gateway,) = network["gateways"]
    assert gateway["port"] == inbound_port
    assert is_ip(gateway["address"]) or nlb_dns_name(ex).fullmatch(gateway["address"]), gateway
    # endpoints (required by the API) name nothing but meshgate's WorkloadEntry.
    cidrs = [ipaddress.ip_network(e["fromCidr"]) for e in network["endpoints"]]
    assert cidrs and all(c.num_addresses == 1 for c in cidrs)
    assert ipaddress.ip_address(we["spec"]["address"]) in cidrs[0]
    # The cluster's own network is not redefined here (Helm would replace the whole map).
    assert set(networks) == {we["spec"]["network"]}


def test_inbound_callers_are_principals_of_the_trust_domain_and_see_the_service():
    """allow entries are SPIFFE IDs of the mesh's trust domain (the Istio principal form without
    spiffe://) or namespace patterns, and each ServiceEntry is visible exactly where they live."""
    ex, _, vm_services = inbound_example()
    td = ex["trust_domain"]
    for name, svc in vm_services.items():
        assert svc["allow"], f"{name}: default deny admits nobody"
        for a in svc["allow"]:
            # An exact caller, as a SPIFFE ID or in Istio's principal form: the mesh's trust domain.
            principal = a.removeprefix("spiffe://")
            if PRINCIPAL.fullmatch(principal):
                assert principal.startswith(td + "/"), f"{name}: {a} not in trust domain {td}"
            else:
                assert "*" in a, f"{name}: {a} is neither a principal nor a pattern"
        namespaces = caller_namespaces(svc["allow"])
        for under in ("inbound/direct", "inbound/east-west"):
            path, se = service_entries_for(under, vm_services)[name]
            assert set(se["spec"].get("exportTo", ["*"])) == namespaces, f"{path}: exportTo should be {sorted(namespaces)}"


def test_inbound_sni_and_identity_in_the_docs():
    """The README names the SNI sidecars send for each vm_service and meshgate's identity; the
    old reverse way points at it."""
    ex, inbound_port, vm_services = inbound_example()
    readme = (ISTIO / "inbound/README.md").read_text()
    for svc in vm_services.values():
        for host in svc["hosts"]:
            assert f"outbound_.{svc['port']}_._.{host}" in readme, host
    assert ex["spiffe_id"] in readme and f":{inbound_port}" in readme
    assert "../inbound" in (ISTIO / "reverse/README.md").read_text()
    assert "(inbound/README.md)" in (ISTIO / "README.md").read_text()
