"""Every .tf file parses with a real HCL2 parser (python-hcl2), and the declarations are complete:
variables typed, described and used; outputs described; module calls match the modules;
templatefile() arguments match what the templates use; validations and preconditions hold for
the example's values and reject bad ones."""

from __future__ import annotations

import re
from pathlib import Path

import hcl2
import pytest

import tfeval
from conftest import EXAMPLE, MODULES, TF, deployment, tf_dirs

TF_FILES = sorted(TF.rglob("*.tf")) + sorted(TF.rglob("*.tfvars"))
INBOUND = {"port": 15443, "source_cidrs": ["10.0.0.0/16"], "backend_cidrs": ["10.20.1.0/24"]}
BILLING = {"hosts": ["billing.vms.internal"], "port": 8080, "protocol": "http1", "backends": ["10.20.1.5:8080"], "allow": ["ns/shop/*"]}


def test_there_is_terraform_to_check():
    assert len(TF_FILES) >= 15, TF_FILES
    for d in tf_dirs():
        assert (d / "variables.tf").is_file() and (d / "outputs.tf").is_file(), d


@pytest.mark.parametrize("path", TF_FILES, ids=lambda p: str(p.relative_to(TF)))
def test_file_parses(path: Path):
    with open(path) as f:
        doc = hcl2.load(f)
    assert doc, f"{path} is empty"
    # And with the serialization the evaluator uses.
    tfeval.load_hcl(path)


@pytest.mark.parametrize("directory", tf_dirs(), ids=lambda p: str(p.relative_to(TF)))
def test_versions_pinned(directory: Path):
    text = "\n".join(p.read_text() for p in directory.glob("*.tf"))
    assert re.search(r'required_version\s*=\s*">= 1\.5"', text), "terraform >= 1.5"
    assert re.search(r'source\s*=\s*"hashicorp/aws"', text)
    assert re.search(r'version\s*=\s*"~> 5\.\d+"', text), "aws provider ~> 5.x"


@pytest.mark.parametrize("directory", tf_dirs(), ids=lambda p: str(p.relative_to(TF)))
def test_variables_typed_described_used(directory: Path):
    mod = tfeval.Module(directory)
    assert mod.variables, directory
    uses = mod.text(exclude=("variables.tf",))
    for name, body in mod.variables.items():
        assert body.get("type"), f"var.{name} has no type"
        tfeval.parse_type(tfeval.expr_source(body["type"]))
        desc = tfeval.evaluate(tfeval.parse_expr(tfeval.expr_source(body.get("description", '""'))), tfeval.Scope({}, directory))
        assert isinstance(desc, str) and len(desc) >= 10, f"var.{name} has no real description"
        assert re.search(rf"\bvar\.{re.escape(name)}\b", uses), f"var.{name} is declared but never used"


@pytest.mark.parametrize("directory", tf_dirs(), ids=lambda p: str(p.relative_to(TF)))
def test_outputs_described(directory: Path):
    mod = tfeval.Module(directory)
    assert mod.outputs, directory
    for name, body in mod.outputs.items():
        desc = tfeval.evaluate(tfeval.parse_expr(tfeval.expr_source(body.get("description", '""'))), tfeval.Scope({}, directory))
        assert isinstance(desc, str) and len(desc) >= 10, f"output {name} has no real description"
        assert "value" in body, name


@pytest.mark.parametrize("directory", tf_dirs(), ids=lambda p: str(p.relative_to(TF)))
def test_no_hardcoded_account_or_region(directory: Path):
    text = "\n".join(p.read_text() for p in directory.glob("*.tf"))
    assert not re.search(r"\b\d{12}\b", text), "hard-coded account id"
    assert not re.search(r"\b(us|eu|ap|sa|ca|me|af|il)-(north|south|east|west|central|northeast|southeast)-\d\b", text), "hard-coded region"
    assert not re.search(r"arn:aws:", text), "hard-coded partition (use data.aws_partition)"


def test_module_calls_match_modules():
    root = tfeval.Module(EXAMPLE)
    assert set(root.module_calls) == set(MODULES), root.module_calls
    for call, body in root.module_calls.items():
        child = tfeval.Module((EXAMPLE / tfeval.unquote(body["source"])).resolve())
        args = {k for k in body if not k.startswith("__") and k != "source"}
        unknown = args - set(child.variables)
        assert not unknown, f"module.{call} passes unknown arguments {unknown}"
        required = {n for n, b in child.variables.items() if "default" not in b}
        missing = required - args
        assert not missing, f"module.{call} misses required arguments {missing}"
        # Pass-through variables keep the module's type.
        for arg in args:
            m = re.fullmatch(r"var\.([A-Za-z0-9_]+)", tfeval.expr_source(body[arg]))
            if m and "type" in root.variables.get(m.group(1), {}):
                assert root.variable_type(m.group(1)) == child.variable_type(arg), f"module.{call}.{arg}: type differs from var.{m.group(1)}"


def _templatefile_calls(mod: tfeval.Module):
    """(template path, argument names) of every templatefile() call in a module's locals."""
    out = []

    def walk(a):
        if isinstance(a, tuple):
            if a[0] == "call" and a[1] == "templatefile":
                path_src = tfeval.render_parts(a[2][0][1], tfeval.Scope({}, mod.path, names={"path": {"module": str(mod.path)}})) if a[2][0][0] == "tmpl" else None
                keys = {k[1] for k, _ in a[2][1][1]}
                out.append((Path(path_src), keys))
            for x in a[1:]:
                walk(x)
        elif isinstance(a, list):
            for x in a:
                walk(x)

    for value in mod.locals.values():
        walk(tfeval.parse_expr(tfeval.expr_source(value)))
    return out


@pytest.mark.parametrize("name", ["fleet", "autoscaler"])
def test_templatefile_arguments_match_templates(name):
    mod = tfeval.Module(MODULES[name])
    calls = _templatefile_calls(mod)
    templates = sorted((MODULES[name] / "templates").glob("*.tftpl"))
    assert {p.resolve() for p, _ in calls} == {p.resolve() for p in templates}, "every template is rendered, once"
    for path, keys in calls:
        refs = tfeval.template_references(path)
        assert refs <= keys, f"{path.name} uses {refs - keys}, not passed by templatefile()"
        assert keys <= refs, f"templatefile({path.name}) passes {keys - refs}, which the template never uses"


def test_example_values_pass_validations_and_preconditions():
    d = deployment()
    failures = d.root.check_variable_validations(d.root_scope)
    for call in MODULES:
        failures += d.check_all(call)
    assert failures == []


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"fleet": {"tenants": {"x": {"api_keys": ["plaintext-key"], "allow": ["*"]}}}}, "api_keys are sha256"),
        ({"fleet": {"binary_url": "https://example.com/meshgate"}}, "exactly one of binary_s3_uri and binary_url"),
        ({"fleet": {"drain_delay_seconds": 10}}, "must cover the health check"),
        ({"fleet": {"drain_spread_seconds": 40}}, "delay + spread <= drain timeout"),
        ({"fleet": {"spiffe_id": "spiffe://other.domain/ns/meshgate/sa/meshgate"}}, "must be in trust_domain"),
        ({"fleet": {"identity_secret_arn": None}}, "needs identity_secret_arn"),
        ({"fleet": {"mesh_inbound": {**INBOUND, "port": 8080}}}, "must differ from proxy_port and admin_port"),
        ({"fleet": {"mesh_inbound": {**INBOUND, "port": 9080}}}, "must not be a service port"),
        ({"fleet": {"mesh_inbound": {**INBOUND, "source_cidrs": []}}}, "at least one IPv4 CIDR in source_cidrs"),
        ({"fleet": {"mesh_inbound": None}}, "vm_services need mesh_inbound"),
        ({"fleet": {"vm_services": {}}}, "would open a port that serves nothing"),
        ({"fleet": {"vm_services": {"billing": {**BILLING, "allow": ["spiffe://other.domain/ns/shop/sa/cart"]}}}}, "vm_services allow: SPIFFE IDs and principals must be in trust_domain"),
        ({"fleet": {"vm_services": {"billing": {**BILLING, "allow": ["other.domain/ns/shop/sa/cart"]}}}}, "vm_services allow: SPIFFE IDs and principals must be in trust_domain"),
        ({"fleet": {"vm_services": {"billing": {**BILLING, "allow": ["spiffe://other.domain/*"]}}}}, "vm_services allow: SPIFFE IDs and principals must be in trust_domain"),
        ({"fleet": {"vm_services": {"billing": {**BILLING, "protocol": "grpc"}}}}, "protocol http1, http2 or tcp"),
        ({"fleet": {"vm_services": {"billing": {**BILLING, "backends": ["10.20.1.5"]}}}}, "one backend (host:port)"),
        ({"autoscaler": {"drain_timeout_seconds": 60}}, "must exceed the fleet's drain timeout"),
        ({"autoscaler": {"heartbeat_interval_seconds": 900}}, "below the lifecycle hook's heartbeat timeout"),
        ({"dns": {"record_names": ["reviews.bookinfo.example.org"]}}, "exactly one of zone_names"),
        ({"dns": {"zone_names": ["svc.cluster.local", "cluster.local"]}}, "inside another of zone_names"),
    ],
)
def test_validations_and_preconditions_reject(overrides, expected):
    d = deployment(module_overrides=overrides)
    failures = []
    for call in MODULES:
        failures += d.check_all(call)
    assert any(expected in f for f in failures), failures
