"""Shared fixtures: repository paths, the real meshgate binaries, openssl-made identities and the
example deployment evaluated offline (tfeval.Deployment)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tfeval  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TF = REPO / "terraform"
EXAMPLE = TF / "examples" / "complete"
MODULES = {name: TF / "modules" / name for name in ("fleet", "dns", "autoscaler")}

SPIFFE_ID = "spiffe://cluster.local/ns/meshgate/sa/meshgate"


def tf_dirs() -> list[Path]:
    return [*MODULES.values(), EXAMPLE]


def tfvars() -> dict:
    raw = tfeval.load_hcl(EXAMPLE / "terraform.tfvars")
    scope = tfeval.Scope({}, EXAMPLE)
    return {k: tfeval.evaluate(tfeval.parse_expr(tfeval.expr_source(v)), scope) for k, v in raw.items() if not k.startswith("__")}


def fake_subnet_cidrs(values: dict) -> dict:
    """The CIDRs data.aws_subnet would return for the example's subnets (known after apply)."""
    return {sid: f"10.10.{i}.0/24" for i, sid in enumerate(values["subnet_ids"])}


def deployment(root_overrides: dict | None = None, module_overrides: dict | None = None,
               subnet_cidrs: list[str] | None = None) -> tfeval.Deployment:
    values = {**tfvars(), **(root_overrides or {})}
    cidrs = fake_subnet_cidrs(values)
    if subnet_cidrs is not None:
        cidrs = dict(zip(values["subnet_ids"], subnet_cidrs))
    return tfeval.Deployment(EXAMPLE, values, cidrs, module_overrides=module_overrides)


@pytest.fixture(scope="session")
def meshgate() -> Path:
    try:
        return tfeval.meshgate_binary(REPO, "meshgate")
    except FileNotFoundError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def meshgate_autoscaler() -> Path:
    try:
        return tfeval.meshgate_binary(REPO, "meshgate-autoscaler")
    except FileNotFoundError as e:
        pytest.fail(str(e))


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_identity(directory: Path, spiffe_id: str = SPIFFE_ID, days: int = 2) -> Path:
    """A mesh CA and a workload certificate shaped like Istio's (empty subject, critical URI SAN,
    client+server auth, EC P-256), as cert-chain.pem / key.pem / root-cert.pem in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=directory)
    _openssl(
        "req", "-x509", "-new", "-key", "ca.key", "-subj", "/O=mesh/CN=test mesh root", "-days", str(days),
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", "root-cert.pem", cwd=directory,
    )
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "key.pem", cwd=directory)
    _openssl("req", "-new", "-key", "key.pem", "-subj", "/", "-out", "leaf.csr", cwd=directory)
    (directory / "leaf.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        f"subjectAltName=critical,URI:{spiffe_id}\n"
    )
    _openssl(
        "x509", "-req", "-in", "leaf.csr", "-CA", "root-cert.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "1", "-extfile", "leaf.ext", "-out", "cert-chain.pem", cwd=directory,
    )
    for f in ("ca.key", "leaf.csr", "leaf.ext", "root-cert.srl"):
        (directory / f).unlink(missing_ok=True)
    return directory


@pytest.fixture(scope="session")
def identity(tmp_path_factory) -> Path:
    return make_identity(tmp_path_factory.mktemp("identity"))


# The fleet without the mesh → VM direction (mesh_inbound and vm_services off).
INBOUND_OFF = {"mesh_inbound": None, "vm_services": {}}


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def heredoc(script: str, delimiter: str) -> str:
    """The body of `<<'DELIMITER'` in a rendered script."""
    start = script.index(f"<<'{delimiter}'\n") + len(f"<<'{delimiter}'\n")
    end = script.index(f"\n{delimiter}\n", start)
    return script[start:end] + "\n"
