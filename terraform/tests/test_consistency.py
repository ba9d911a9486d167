"""Terraform and the binaries it deploys agree: the NLB health check hits what meshgate serves,
the deregistration delay is meshgate's drain delay, the PROXY protocol setting matches on both
sides, systemd waits for the drain, the lifecycle hook fits the autoscaler, the autoscaler's
config is accepted by meshgate-autoscaler and its IAM is exactly the calls its source makes, and
the security groups open only what the design says. Where it can, a test runs the real meshgate
on the rendered config."""

from __future__ import annotations

import http.client
import ipaddress
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import yaml

import tfeval
from conftest import INBOUND_OFF, MODULES, REPO, deployment, heredoc, run, tfvars

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# LOCAL (version 2, command 0), no address: what an NLB's health checks carry.
PROXY_V2_LOCAL = PROXY_V2_SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00])


def proxy_v2(src: str, src_port: int, dst: str, dst_port: int) -> bytes:
    """A PROXY v2 header, PROXY command (0x21), TCP over IPv4 (0x11)."""
    addrs = socket.inet_aton(src) + socket.inet_aton(dst) + src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big")
    return PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + len(addrs).to_bytes(2, "big") + addrs


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert m, duration
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def fleet(identity, **overrides):
    return deployment(module_overrides={"fleet": {"identity_dir": str(identity), **overrides}})


def config_of(d) -> dict:
    return yaml.safe_load(d.local("fleet", "meshgate_config"))


def unit_of(d) -> dict:
    unit = heredoc(d.local("fleet", "user_data"), "MESHGATE_UNIT_EOF")
    return dict(l.split("=", 1) for l in unit.splitlines() if "=" in l and not l.startswith("#"))


def port_of(bind: str) -> int:
    return int(bind.rsplit(":", 1)[1])


@pytest.mark.parametrize("pp", [False, True], ids=["plain", "proxy-protocol"])
def test_target_group_matches_meshgate_config(identity, pp):
    d = fleet(identity, proxy_protocol_v2=pp)
    cfg = config_of(d)
    tg = d.resource("fleet", "aws_lb_target_group", "proxy")
    hc = d.block("fleet", "aws_lb_target_group", "proxy", "health_check")
    listener = cfg["listeners"][0]
    # Traffic: the target group port is the proxy listener.
    assert d.eval_in("fleet", tg["port"]) == port_of(listener["bind"])
    assert d.eval_in("fleet", tg["protocol"]) == "TCP"
    # Drain: the NLB stops new flows and keeps old ones for exactly meshgate's drain.delay, and
    # never cuts connections itself (meshgate's drain closes them).
    assert d.eval_in("fleet", tg["deregistration_delay"]) == seconds(cfg["drain"]["delay"])
    assert d.eval_in("fleet", tg["connection_termination"]) is False
    ths = d.block("fleet", "aws_lb_target_group", "proxy", "target_health_state")
    assert ths["enable_unhealthy_connection_termination"] is False
    # The NLB must notice readiness going off within drain.delay.
    assert hc["interval"] * hc["unhealthy_threshold"] <= seconds(cfg["drain"]["delay"])
    assert seconds(cfg["drain"]["delay"]) + seconds(cfg["drain"]["spread"]) <= seconds(cfg["drain"]["timeout"])
    # PROXY protocol: both sides or neither; trusted proxies = the NLB's subnets.
    assert d.eval_in("fleet", tg["proxy_protocol_v2"]) is pp
    assert d.eval_in("fleet", tg["preserve_client_ip"]) == ("false" if pp else "true")
    if pp:
        # The NLB's nodes (its subnets) are trusted: their PROXY headers are read on the listener
        # and, on health checks, on the admin port.
        assert listener["proxy_protocol"] == "required"
        assert listener["trusted_proxies"] == sorted(d.subnet_cidrs.values())
    else:
        assert listener["proxy_protocol"] == "off" and "trusted_proxies" not in listener
    # Health check: /readyz on meshgate's admin port, 200 only, in both modes.
    assert (hc["protocol"], hc["port"], hc["path"], hc["matcher"]) == ("HTTP", port_of(cfg["admin"]["bind"]), "/readyz", "200")
    assert hc["enabled"] is True
    # ... and the security groups let the NLB reach that port in both modes.
    assert d.count("fleet", "aws_vpc_security_group_egress_rule", "nlb_health_check") == 1
    assert d.count("fleet", "aws_vpc_security_group_ingress_rule", "admin_from_nlb") == 1
    for rtype, name in (("aws_vpc_security_group_egress_rule", "nlb_health_check"), ("aws_vpc_security_group_ingress_rule", "admin_from_nlb")):
        rule = d.resource("fleet", rtype, name)
        assert d.eval_in("fleet", rule["from_port"]) == d.eval_in("fleet", rule["to_port"]) == hc["port"], name


# ----------------------------------------------------------------------------------------------
# The mesh → VM direction (mesh_inbound, vm_services)


@pytest.mark.parametrize("pp", [False, True], ids=["plain", "proxy-protocol"])
def test_mesh_inbound_listener_and_target_group_match_meshgate_config(identity, pp):
    d = fleet(identity, proxy_protocol_v2=pp)
    cfg = config_of(d)
    inbound = d.inputs("fleet")["mesh_inbound"]
    (listener,) = [l for l in cfg["listeners"] if l["protocol"] == "mesh-inbound"]
    port = port_of(listener["bind"])
    assert port == inbound["port"] == d.eval_in("fleet", d.child("fleet").outputs["mesh_inbound_port"]["value"])
    # An NLB listener of its own on that port (no service port shares it), TCP to the
    # mesh-inbound target group, which sends to the same port on the instances.
    assert d.count("fleet", "aws_lb_listener", "mesh_inbound") == d.count("fleet", "aws_lb_target_group", "mesh_inbound") == 1
    nlb_listener = d.resource("fleet", "aws_lb_listener", "mesh_inbound")
    assert d.eval_in("fleet", nlb_listener["port"]) == port
    assert d.eval_in("fleet", nlb_listener["protocol"]) == "TCP"
    assert tfeval.expr_source(nlb_listener["default_action"][0]["target_group_arn"]) == "aws_lb_target_group.mesh_inbound[0].arn"
    assert str(port) not in d.for_each_keys("fleet", "aws_lb_listener", "service")
    tg = d.resource("fleet", "aws_lb_target_group", "mesh_inbound")
    assert d.eval_in("fleet", tg["port"]) == port and d.eval_in("fleet", tg["protocol"]) == "TCP"
    assert len(d.eval_in("fleet", tg["name"])) <= 32, "target group names are at most 32 characters"
    # Client IPs preserved and no PROXY header in both modes, and the listener expects none.
    assert d.eval_in("fleet", tg["proxy_protocol_v2"]) is False
    assert d.eval_in("fleet", tg["preserve_client_ip"]) == "true"
    assert "proxy_protocol" not in listener and "trusted_proxies" not in listener
    # One meshgate process behind both target groups: the same readiness and drain.
    assert d.block("fleet", "aws_lb_target_group", "mesh_inbound", "health_check") == d.block("fleet", "aws_lb_target_group", "proxy", "health_check")
    assert d.eval_in("fleet", tg["deregistration_delay"]) == seconds(cfg["drain"]["delay"])
    assert d.eval_in("fleet", tg["connection_termination"]) is False
    assert d.block("fleet", "aws_lb_target_group", "mesh_inbound", "target_health_state")["enable_unhealthy_connection_termination"] is False
    asg = d.resource("fleet", "aws_autoscaling_group", "this")
    assert tfeval.expr_source(asg["target_group_arns"]) == "concat([aws_lb_target_group.proxy.arn], aws_lb_target_group.mesh_inbound[*].arn)"
    # vm_services reach meshgate's config as given.
    assert cfg["vm_services"] == d.inputs("fleet")["vm_services"]


def test_mesh_inbound_security_groups(identity):
    d = fleet(identity)
    inbound = d.inputs("fleet")["mesh_inbound"]
    services = d.inputs("fleet")["vm_services"]
    ingress, egress = "aws_vpc_security_group_ingress_rule", "aws_vpc_security_group_egress_rule"
    # The mesh's CIDRs reach the port on the NLB and, client IPs being preserved, on the instances.
    for name in ("nlb_from_mesh", "mesh_inbound_from_mesh"):
        assert d.for_each_keys("fleet", ingress, name) == sorted(inbound["source_cidrs"]), name
        assert d.eval_in("fleet", d.resource("fleet", ingress, name)["from_port"]) == inbound["port"], name
    for rtype, name in ((egress, "nlb_to_mesh_inbound"), (ingress, "mesh_inbound_from_nlb")):
        assert d.count("fleet", rtype, name) == 1, name
        assert d.eval_in("fleet", d.resource("fleet", rtype, name)["from_port"]) == inbound["port"], name
    # The instances reach the backends' ports on backend_cidrs, nothing more.
    ports = sorted({b.rsplit(":", 1)[1] for s in services.values() for b in s["backends"]})
    assert d.for_each_keys("fleet", egress, "to_vm_backends") == sorted(f"{c}:{p}" for c in inbound["backend_cidrs"] for p in ports)
    # Backends given as addresses lie in backend_cidrs, so those rules cover them.
    for name, s in services.items():
        for b in s["backends"]:
            try:
                ip = ipaddress.ip_address(b.rsplit(":", 1)[0])
            except ValueError:
                continue
            assert any(ip in ipaddress.ip_network(c) for c in inbound["backend_cidrs"]), (name, b)


def test_mesh_inbound_off_adds_nothing(identity):
    d = fleet(identity, **INBOUND_OFF)
    assert d.check_all("fleet") == []
    cfg = config_of(d)
    assert [l["protocol"] for l in cfg["listeners"]] == ["http"] and "vm_services" not in cfg
    for rtype, name in (("aws_lb_listener", "mesh_inbound"), ("aws_lb_target_group", "mesh_inbound"),
                        ("aws_vpc_security_group_egress_rule", "nlb_to_mesh_inbound"),
                        ("aws_vpc_security_group_ingress_rule", "mesh_inbound_from_nlb")):
        assert d.count("fleet", rtype, name) == 0, name
    for rtype, name in (("aws_vpc_security_group_ingress_rule", "nlb_from_mesh"),
                        ("aws_vpc_security_group_ingress_rule", "mesh_inbound_from_mesh"),
                        ("aws_vpc_security_group_egress_rule", "to_vm_backends")):
        assert d.for_each_keys("fleet", rtype, name) == [], name
    assert d.eval_in("fleet", d.child("fleet").outputs["mesh_inbound_port"]["value"]) is None


def test_systemd_waits_for_the_drain(identity):
    d = fleet(identity)
    unit = unit_of(d)
    cfg = config_of(d)
    assert unit["KillSignal"] == "SIGTERM"
    assert int(unit["TimeoutStopSec"]) > seconds(cfg["drain"]["timeout"])
    assert unit["Restart"] == "always"
    assert int(unit["LimitNOFILE"]) >= 65536
    assert unit["ExecStart"] == "/usr/local/bin/meshgate run -c /etc/meshgate/meshgate.yaml"


def test_one_listener_per_service_port(identity):
    d = fleet(identity)
    ports = sorted({s["port"] for s in d.inputs("fleet")["services"].values()})
    assert [int(p) for p in d.for_each_keys("fleet", "aws_lb_listener", "service")] == sorted(ports)
    listener = d.resource("fleet", "aws_lb_listener", "service")
    assert tfeval.expr_source(listener["default_action"][0]["target_group_arn"]) == "aws_lb_target_group.proxy.arn"
    lb = d.resource("fleet", "aws_lb", "this")
    assert d.eval_in("fleet", lb["internal"]) is True
    assert d.eval_in("fleet", lb["load_balancer_type"]) == "network"
    assert d.eval_in("fleet", lb["enable_cross_zone_load_balancing"]) is True


def test_lifecycle_hooks_fit_the_autoscaler(identity):
    d = fleet(identity)
    hook = {k: d.eval_in("fleet", v) for k, v in d.resource("fleet", "aws_autoscaling_lifecycle_hook", "terminating").items() if not k.startswith("__")}
    assert hook["lifecycle_transition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    assert hook["default_result"] == "CONTINUE"
    scaler = yaml.safe_load(d.local("autoscaler", "autoscaler_config"))
    group = scaler["groups"][0]
    cfg = config_of(d)
    assert hook["heartbeat_timeout"] > seconds(group["heartbeat_interval"])
    assert seconds(group["drain_timeout"]) > seconds(cfg["drain"]["timeout"])
    assert group["admin_port"] == port_of(cfg["admin"]["bind"])
    asg = d.resource("fleet", "aws_autoscaling_group", "this")
    assert group["name"] == d.eval_in("fleet", asg["name"])
    assert d.eval_in("fleet", asg["health_check_type"]) == "ELB"
    launching = asg["dynamic"][0]['"initial_lifecycle_hook"'] if "dynamic" in asg else None
    content = launching["content"][0]
    assert d.eval_in("fleet", content["lifecycle_transition"]) == "autoscaling:EC2_INSTANCE_LAUNCHING"
    assert d.eval_in("fleet", content["default_result"]) == "CONTINUE"
    assert d.eval_in("fleet", launching["for_each"]) == ["launching"], "the example enables the Pending:Wait hook"
    assert "desired_capacity" in tfeval.expr_source(asg["lifecycle"][0]["ignore_changes"])


def test_autoscaler_config_passes_check(meshgate_autoscaler, tmp_path):
    d = deployment()
    text = heredoc(d.local("autoscaler", "user_data"), "AUTOSCALER_CONFIG_EOF")
    assert text == d.local("autoscaler", "autoscaler_config") + "\n"
    (tmp_path / "autoscaler.yaml").write_text(text)
    out = run([meshgate_autoscaler, "check", "-c", tmp_path / "autoscaler.yaml"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "group meshgate" in out.stdout
    # A variant with every optional key.
    d = deployment(module_overrides={"autoscaler": {
        "query": 'sum(meshgate_requests_in_flight{job="meshgate"}) / clamp_min(sum(meshgate_ready{job="meshgate"}), 1)',
        "extra_signals": [{"name": "cpu", "query": 'avg(rate(process_cpu_seconds_total{job="meshgate"}[2m]))', "target": 0.6}],
        "admin_token_secret_arn": "arn:aws:secretsmanager:eu-west-1:111122223333:secret:meshgate/admin-XyZ123",
        "dry_run": True,
    }})
    text = d.local("autoscaler", "autoscaler_config").replace("/etc/meshgate-autoscaler/admin-token", str(tmp_path / "token"))
    (tmp_path / "token").write_text("t\n")
    (tmp_path / "autoscaler.yaml").write_text(text)
    out = run([meshgate_autoscaler, "check", "-c", tmp_path / "autoscaler.yaml"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cpu" in out.stdout
    (tmp_path / "ud.sh").write_text(d.local("autoscaler", "user_data"))
    assert run(["bash", "-n", tmp_path / "ud.sh"]).returncode == 0


# ----------------------------------------------------------------------------------------------
# IAM


def autoscaler_source_calls() -> set[str]:
    """The AWS API calls in infra/autoscaler/src: SDK client calls (Auto Scaling) and signed
    query calls (`Action=...` with the service named in signed_query)."""
    calls = set()
    for path in sorted((REPO / "infra/autoscaler/src").glob("*.rs")):
        src = path.read_text()
        src = src.split("#[cfg(test)]")[0]
        for m in re.finditer(r"self\.client\s*\.\s*([a-z_]+)\(\)", src):
            calls.add("autoscaling:" + "".join(w.capitalize() for w in m.group(1).split("_")))
        for m in re.finditer(r'Action=([A-Za-z]+)', src):
            service = re.search(r'signed_query\([^;]*?"([a-z0-9]+)"', src, re.S)
            assert service, f"{path}: Action= without signed_query(..., \"service\", ...)"
            calls.add(f"{service.group(1)}:{m.group(1)}")
        # The retry labels name the same operations; a call added without a label is caught too.
        for m in re.finditer(r'self\.retry\("([A-Za-z]+)"', src):
            assert any(c.endswith(":" + m.group(1)) for c in calls), m.group(1)
    return calls


def test_autoscaler_source_calls_are_found():
    calls = autoscaler_source_calls()
    assert calls == {
        "autoscaling:DescribeAutoScalingGroups",
        "autoscaling:SetDesiredCapacity",
        "autoscaling:DescribeLifecycleHooks",
        "autoscaling:CompleteLifecycleAction",
        "autoscaling:RecordLifecycleActionHeartbeat",
        "ec2:DescribeInstances",
    }, calls
    readme = (REPO / "infra/autoscaler/README.md").read_text()
    for c in calls:
        assert f"`{c}`" in readme, f"{c} missing from the autoscaler README's IAM list"


@pytest.mark.parametrize("variant", [{}, {"binary_s3_uri": None, "binary_url": "https://a.example.com/x"}])
def test_autoscaler_iam_is_exactly_its_calls(variant):
    d = deployment(module_overrides={"autoscaler": variant})
    statements = d.policy_statements("autoscaler", "autoscaler")
    arn = d.inputs("autoscaler")["group_arn"]
    granted = {}
    for st in statements:
        assert st.get("effect", "Allow") == "Allow"
        for a in st["actions"]:
            granted.setdefault(a, set()).update(st["resources"])
    service_actions = {a for a in granted if a.split(":")[0] in ("autoscaling", "ec2")}
    assert service_actions == autoscaler_source_calls()
    # What can be scoped to the group is; the rest has no resource-level permissions in IAM.
    for a in ("autoscaling:SetDesiredCapacity", "autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat"):
        assert granted[a] == {arn}, (a, granted[a])
    for a in ("autoscaling:DescribeAutoScalingGroups", "autoscaling:DescribeLifecycleHooks", "ec2:DescribeInstances"):
        assert granted[a] == {"*"}
    # Bootstrap reads only: the binary object (when from S3), never a wildcard.
    others = set(granted) - service_actions
    assert others <= {"s3:GetObject", "secretsmanager:GetSecretValue"}, others
    for a in others:
        assert "*" not in "".join(granted[a]), (a, granted[a])
    assert ("s3:GetObject" in others) == (variant.get("binary_s3_uri", "set") is not None)


@pytest.mark.parametrize("source", ["secretsmanager", "ssm", "vault-agent"])
def test_instance_iam_is_least_privilege(identity, source):
    over = {"identity_source": source, "identity_kms_key_arn": "arn:aws:kms:eu-west-1:111122223333:key/0a1b2c3d-0000-4000-8000-000000000000"}
    if source != "secretsmanager":
        over["identity_secret_arn"] = None
    if source == "ssm":
        over["identity_ssm_prefix"] = "/meshgate/identity"
    if source == "vault-agent":
        over["vault"] = {"address": "https://vault.example.internal:8200", "auth_role": "meshgate", "pki_issue_path": "pki/issue/meshgate", "root_ca_path": "pki/cert/ca", "egress_cidrs": ["10.0.50.0/24"]}
    d = fleet(identity, **over)
    statements = d.policy_statements("fleet", "instance")
    granted = {(a, r) for st in statements for a in st["actions"] for r in st["resources"]}
    expected = {("s3:GetObject", "arn:aws:s3:::example-artifacts/meshgate/0.1.0/meshgate")}
    if source == "secretsmanager":
        expected.add(("secretsmanager:GetSecretValue", d.inputs("fleet")["identity_secret_arn"]))
    if source == "ssm":
        for f in ("cert-chain.pem", "key.pem", "root-cert.pem"):
            expected.add(("ssm:GetParameter", f"arn:aws:ssm:eu-west-1:111122223333:parameter/meshgate/identity/{f}"))
    if source != "vault-agent":
        expected.add(("kms:Decrypt", over["identity_kms_key_arn"]))
    assert granted == expected
    for st in statements:
        if "kms:Decrypt" in st["actions"]:
            assert st["condition"][0]["variable"] == "kms:ViaService"


# ----------------------------------------------------------------------------------------------
# Security groups (static: who may reach which port)


def test_security_groups_open_only_the_design():
    mod = tfeval.Module(MODULES["fleet"])
    rules = {name: body for (rtype, name), body in mod.resources.items() if rtype in ("aws_vpc_security_group_ingress_rule", "aws_vpc_security_group_egress_rule")}
    assert not any(rtype == "aws_security_group_rule" for rtype, _ in mod.resources)
    for (rtype, name), body in mod.resources.items():
        if rtype == "aws_security_group":
            assert "ingress" not in body and "egress" not in body, f"{name}: inline rules"
    for name, body in rules.items():
        src = {k: tfeval.expr_source(v) for k, v in body.items() if not k.startswith("__")}
        assert "description" in src, name
        assert src.get("ip_protocol") == '"tcp"', name
        port = src["from_port"]
        assert src["to_port"] == port, f"{name}: port ranges"
        if name.startswith(("admin_from", "nlb_health", "admin_client")):
            assert port == "var.admin_port", name
            assert "referenced_security_group_id" in src and "cidr_ipv4" not in src, f"{name}: admin port only from security groups"
        if name in ("proxy_from_vms", "nlb_from_vms"):
            assert "var.vm_cidrs" in (src.get("for_each", "") + str(body.get("for_each"))), name
        # The mesh-inbound port: from the mesh's CIDRs (NLB, and instances as client IPs are
        # preserved) or from the NLB's group; nothing of it exists while mesh_inbound is null.
        if "mesh" in name:
            assert port == "local.inbound_port", name
            assert src.get("for_each") == "toset(local.inbound_source_cidrs)" or src.get("count") == "var.mesh_inbound == null ? 0 : 1", name
            assert ("cidr_ipv4" in src) == ("for_each" in src), name
    ingress = [n for (t, n) in mod.resources if t == "aws_vpc_security_group_ingress_rule"]
    assert sorted(ingress) == sorted(["nlb_from_vms", "proxy_from_nlb", "proxy_from_vms", "admin_from_nlb", "admin_from_admin_client", "admin_from_monitoring",
                                      "nlb_from_mesh", "mesh_inbound_from_nlb", "mesh_inbound_from_mesh"])
    egress = [n for (t, n) in mod.resources if t == "aws_vpc_security_group_egress_rule"]
    assert sorted(egress) == sorted(["nlb_to_proxy", "nlb_health_check", "to_gateway", "https", "vault", "admin_client_to_admin",
                                     "nlb_to_mesh_inbound", "to_vm_backends"])


# ----------------------------------------------------------------------------------------------
# The real meshgate on the rendered config


def free_port() -> int:
    # The rendered config binds 0.0.0.0, so check the port there.
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, prefix: bytes = b"", timeout: float = 2.0, source: str | None = None):
    """GET over one connection to 127.0.0.1:port (from `source`, another loopback address, if
    given), optionally after `prefix`; (status, body), status None if no response came."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None) as s:
        s.sendall(prefix + f"GET {path} HTTP/1.1\r\nHost: health\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head else None
    return status, body


class Meshgate:
    def __init__(self, binary, config: Path):
        self.config = config
        self.proc = subprocess.Popen([str(binary), "run", "-c", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def wait_ready(port, path, deadline=15.0, m=None):
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        if m is not None and m.proc.poll() is not None:
            out = m.proc.stdout.read().decode(errors="replace")
            raise AssertionError(f"meshgate exited with {m.proc.returncode} before it was ready:\n{out}")
        try:
            status, _ = http_get(port, path)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.1)
    raise AssertionError(f"meshgate never became ready on port {port} (last: {last})")


@pytest.fixture
def running(meshgate, identity, tmp_path):
    started = []

    def start(subnet_cidrs=None, **fleet_overrides):
        # A port found free may be taken again before the binary binds it (an ephemeral port of
        # some other connection): then start again on fresh ports.
        for _ in range(5):
            d, m = start_once(subnet_cidrs, **fleet_overrides)
            end = time.monotonic() + 3
            while m.proc.poll() is None and time.monotonic() < end:
                try:
                    http_get(d.block("fleet", "aws_lb_target_group", "proxy", "health_check")["port"], "/healthz")
                    return d, m
                except OSError:
                    time.sleep(0.05)
            if m.proc.poll() is None:
                return d, m
            out = m.proc.stdout.read().decode(errors="replace")
            if "Address already in use" not in out:
                raise AssertionError(f"meshgate exited with {m.proc.returncode}:\n{out}")
        raise AssertionError("no free ports after 5 tries")

    def start_once(subnet_cidrs=None, **fleet_overrides):
        proxy, admin = free_port(), free_port()
        # The example's mesh-inbound listener too, on a free port of its own.
        inbound = {"mesh_inbound": {**tfvars()["mesh_inbound"], "port": free_port()}}
        d = deployment(
            # A loopback gateway: the example's DNS name would make the binary ask a resolver at
            # start (slow when it times out, and traffic off the machine); nothing is sent to it.
            module_overrides={
                "fleet": {
                    "identity_dir": str(identity),
                    "proxy_port": proxy,
                    "admin_port": admin,
                    "mesh_gateways": ["127.0.0.1:15443"],
                    **inbound,
                    **fleet_overrides,
                }
            },
            subnet_cidrs=subnet_cidrs,
        )
        cfg = tmp_path / f"meshgate-{len(started)}.yaml"
        cfg.write_text(heredoc(d.local("fleet", "user_data"), "MESHGATE_CONFIG_EOF"))
        m = Meshgate(meshgate, cfg)
        started.append(m)
        return d, m

    yield start
    for m in started:
        m.stop()


def test_health_check_and_sigterm_drain_on_the_real_binary(running):
    # Short drain so the test is quick; the preconditions' production values are tested above.
    d, m = running(drain_delay_seconds=1, drain_spread_seconds=1, drain_timeout_seconds=5)
    hc = d.block("fleet", "aws_lb_target_group", "proxy", "health_check")
    wait_ready(hc["port"], hc["path"], m=m)
    status, body = http_get(hc["port"], hc["path"])
    assert (status, body.strip()) == (200, b"ready")
    status, body = http_get(hc["port"], "/metrics")
    assert status == 200 and b"meshgate_ready 1" in body
    timeout_stop = int(unit_of(d)["TimeoutStopSec"])
    t0 = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    status, body = http_get(hc["port"], hc["path"])
    assert status == 503 and b"not ready" in body, "readiness must turn off at once, so the NLB stops new flows"
    rc = m.proc.wait(timeout=timeout_stop)
    elapsed = time.monotonic() - t0
    assert rc == 0
    assert 1.0 <= elapsed <= 5 + 2, elapsed


def test_mesh_inbound_listener_is_what_the_istio_manifests_expect(running, identity):
    """Behind the NLB's mesh-inbound port the real meshgate speaks Istio mTLS as
    infra/istio/inbound expects of it: its workload certificate (the SPIFFE ID the ServiceEntry
    and DestinationRule pin) for the SNI a sidecar sends, a client certificate required, and
    HTTP/1.1 chosen from an HTTP/1.1 sidecar's ALPN list."""
    d, m = running()
    hc = d.block("fleet", "aws_lb_target_group", "mesh_inbound", "health_check")
    wait_ready(hc["port"], hc["path"], m=m)
    (listener,) = [l for l in config_of(d)["listeners"] if l["protocol"] == "mesh-inbound"]
    port = port_of(listener["bind"])
    assert port == d.eval_in("fleet", d.resource("fleet", "aws_lb_target_group", "mesh_inbound")["port"])
    name, svc = sorted(d.inputs("fleet")["vm_services"].items())[0]
    sni = f"outbound_.{svc['port']}_._.{svc['hosts'][0]}"

    def client(with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # Istio checks the URI SAN, below
        ctx.load_verify_locations(identity / "root-cert.pem")
        if with_cert:
            ctx.load_cert_chain(identity / "cert-chain.pem", identity / "key.pem")
        ctx.set_alpn_protocols(["istio-http/1.1", "istio", "http/1.1"])
        return ctx

    with socket.create_connection(("127.0.0.1", port), timeout=3) as raw:
        with client(True).wrap_socket(raw, server_hostname=sni) as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"
            sans = tls.getpeercert()["subjectAltName"]
            assert ("URI", d.inputs("fleet")["spiffe_id"]) in sans, sans
    # Without a client certificate no request gets through (TLS 1.3 reports it at the first read).
    with socket.create_connection(("127.0.0.1", port), timeout=3) as raw:
        try:
            with client(False).wrap_socket(raw, server_hostname=sni) as tls:
                tls.sendall(f"GET / HTTP/1.1\r\nHost: {svc['hosts'][0]}\r\n\r\n".encode())
                data = tls.recv(1)
        except (ssl.SSLError, OSError):
            data = b""
    assert data == b"", f"{name}: answered a caller without a client certificate"


def test_proxy_protocol_listener_with_nlb_style_peers(running):
    """With proxy_protocol_v2 the listener requires a header from trusted_proxies (here the
    stand-in 'subnets' are loopback): a PROXY LOCAL header, then close, is accepted, a request
    after one is served, a trusted peer without a header is disconnected."""
    d, m = running(subnet_cidrs=["127.0.0.0/24", "127.0.1.0/24", "127.0.2.0/24"], proxy_protocol_v2=True)
    hc = d.block("fleet", "aws_lb_target_group", "proxy", "health_check")
    wait_ready(hc["port"], hc["path"], m=m)
    port = port_of(config_of(d)["listeners"][0]["bind"])
    assert port == d.inputs("fleet")["proxy_port"]
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(PROXY_V2_LOCAL)
    # A request after a LOCAL header is served (routing answers; the peer is no tenant).
    status, body = http_get(port, "/", prefix=PROXY_V2_LOCAL)
    assert status in (403, 404), (status, body)
    assert body.startswith(b"meshgate: ")
    # Without the header a trusted peer gets no HTTP answer.
    try:
        status, _ = http_get(port, "/")
    except (ConnectionResetError, BrokenPipeError):
        status = None
    assert status is None, status


# Trusted proxies in the tests are loopback only: 127.0.2.0/24 etc. stand in for the NLB's
# subnets, 127.0.0.1 (outside them) for any other peer.
LOOPBACK_SUBNETS = ["127.0.2.0/24", "127.0.3.0/24", "127.0.4.0/24"]
NLB_NODE = "127.0.2.10"


def test_admin_readyz_health_check_through_proxy_protocol(running):
    """With proxy_protocol_v2 the NLB prefixes its health checks with a PROXY v2 header; the
    real meshgate on the rendered config answers the target group's health check (port, path)
    with 200 `ready` after one from a trusted address, and 503 once draining."""
    d, m = running(subnet_cidrs=LOOPBACK_SUBNETS, proxy_protocol_v2=True,
                   drain_delay_seconds=1, drain_spread_seconds=1, drain_timeout_seconds=5)
    cfg = yaml.safe_load(m.config.read_text())
    assert cfg["listeners"][0]["proxy_protocol"] == "required"
    assert cfg["listeners"][0]["trusted_proxies"] == LOOPBACK_SUBNETS
    hc = d.block("fleet", "aws_lb_target_group", "proxy", "health_check")
    assert d.eval_in("fleet", d.resource("fleet", "aws_lb_target_group", "proxy")["proxy_protocol_v2"]) is True
    assert (hc["protocol"], hc["port"], hc["path"], hc["matcher"]) == ("HTTP", port_of(cfg["admin"]["bind"]), "/readyz", "200")
    wait_ready(hc["port"], hc["path"], m=m)  # from 127.0.0.1: not trusted, no header
    headers = {
        "v2 LOCAL": PROXY_V2_LOCAL,
        "v2 PROXY": proxy_v2(NLB_NODE, 43210, "127.0.0.1", hc["port"]),
        "v1": f"PROXY TCP4 {NLB_NODE} 127.0.0.1 43210 {hc['port']}\r\n".encode(),
    }
    for name, header in headers.items():
        status, body = http_get(hc["port"], hc["path"], prefix=header, source=NLB_NODE)
        assert (status, body.strip()) == (200, b"ready"), (name, status, body)
    # The header is optional there: a trusted peer without one (a monitor in the NLB's subnets)
    # is served too.
    status, body = http_get(hc["port"], hc["path"], source=NLB_NODE)
    assert (status, body.strip()) == (200, b"ready")
    # Only trusted peers' headers are read: from elsewhere the bytes reach HTTP as they are.
    try:
        status, _ = http_get(hc["port"], hc["path"], prefix=PROXY_V2_LOCAL)
    except (ConnectionResetError, BrokenPipeError):
        status = None
    assert status in (400, None), status
    # Readiness reaches the NLB in this mode too: draining turns the health check to 503.
    m.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    for name, header in headers.items():
        status, body = http_get(hc["port"], hc["path"], prefix=header, source=NLB_NODE)
        assert status == 503 and b"not ready" in body, (name, status, body)
    assert m.proc.wait(timeout=int(unit_of(d)["TimeoutStopSec"])) == 0
