"""The instance bootstrap the fleet module renders, checked against the real binaries: the
meshgate config written by the user data passes `meshgate check` (with an openssl-made identity),
the identity fetcher installs only the expected identity, every variant of the script is valid
bash, and the user data fits EC2's 16 KB limit."""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess

import pytest
import yaml

import tfeval
from conftest import INBOUND_OFF, SPIFFE_ID, deployment, heredoc, make_identity, run


def rendered(identity_dir, **fleet) -> tfeval.Deployment:
    return deployment(module_overrides={"fleet": {"identity_dir": str(identity_dir), **fleet}})


def config_from_user_data(d: tfeval.Deployment) -> str:
    return heredoc(d.local("fleet", "user_data"), "MESHGATE_CONFIG_EOF")


def test_user_data_config_passes_meshgate_check(meshgate, identity, tmp_path):
    d = rendered(identity)
    text = config_from_user_data(d)
    # The user data writes exactly the config the module renders (and outputs).
    assert text == d.local("fleet", "meshgate_config") + "\n"
    path = tmp_path / "meshgate.yaml"
    path.write_text(text)
    out = run([meshgate, "check", "-c", path])
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"identity: {SPIFFE_ID}" in out.stdout
    services = d.inputs("fleet")["services"]
    for name, s in services.items():
        subset = s.get("subset") or ""
        sni = f"outbound_.{s['port']}_.{subset}_.{s['host']}"
        assert name in out.stdout and f"sni={sni}" in out.stdout, (name, out.stdout)


def test_mesh_inbound_config_passes_meshgate_check(meshgate, identity, tmp_path):
    """The example's mesh-inbound listener and vm_services, as rendered, are what meshgate reads."""
    d = rendered(identity)
    path = tmp_path / "meshgate.yaml"
    path.write_text(config_from_user_data(d))
    out = run([meshgate, "check", "-c", path])
    assert out.returncode == 0, out.stdout + out.stderr
    inbound = d.inputs("fleet")["mesh_inbound"]
    assert re.search(rf"mesh-inbound\s+0\.0\.0\.0:{inbound['port']}\s", out.stdout), out.stdout
    for name, s in d.inputs("fleet")["vm_services"].items():
        line = next((l for l in out.stdout.splitlines() if l.strip().startswith(name + " ")), None)
        assert line, (name, out.stdout)
        for value in (*s["hosts"], f"port {s['port']}", *s["backends"], *s["allow"]):
            assert value in line, (value, line)


def test_meshgate_check_rejects_a_foreign_identity(meshgate, tmp_path):
    """The check really verifies the identity: a leaf from another trust domain fails."""
    other = make_identity(tmp_path / "other", spiffe_id="spiffe://other.domain/ns/meshgate/sa/meshgate")
    path = tmp_path / "meshgate.yaml"
    path.write_text(config_from_user_data(rendered(other)))
    out = run([meshgate, "check", "-c", path])
    assert out.returncode != 0 and "trust domain" in (out.stdout + out.stderr).lower(), out.stdout + out.stderr


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"proxy_protocol_v2": True},
        {"identity_source": "ssm", "identity_ssm_prefix": "/meshgate/identity", "identity_secret_arn": None},
        {
            "identity_source": "vault-agent",
            "identity_secret_arn": None,
            "vault": {
                "address": "https://vault.example.internal:8200",
                "auth_role": "meshgate",
                "pki_issue_path": "pki_meshgate/issue/meshgate",
                "root_ca_path": "pki_root/cert/ca",
                "egress_cidrs": ["10.0.50.0/24"],
            },
        },
        {"binary_s3_uri": None, "binary_url": "https://artifacts.example.com/meshgate/0.1.0/meshgate", "binary_sha256": "ab" * 32},
        {"admin_token_secret_arn": "arn:aws:secretsmanager:eu-west-1:111122223333:secret:meshgate/admin-XyZ123"},
        INBOUND_OFF,
    ],
    ids=["secretsmanager", "proxy-protocol", "ssm", "vault-agent", "binary-url", "admin-token", "inbound-off"],
)
def test_user_data_variants(variant, meshgate, identity, tmp_path):
    d = rendered(identity, **variant)
    assert d.check_all("fleet") == []
    script = d.local("fleet", "user_data")
    # EC2 limits user data to 16 KB before base64.
    assert len(script.encode()) <= 16384, len(script.encode())
    base64.b64decode(base64.b64encode(script.encode()))
    (tmp_path / "user_data.sh").write_text(script)
    out = run(["bash", "-n", tmp_path / "user_data.sh"])
    assert out.returncode == 0, out.stderr
    assert script.startswith("#!/bin/bash\n") and "set -euo pipefail" in script
    assert "${" not in script.replace("${MESHGATE_IDENTITY_GROUP:-meshgate}", ""), "an unrendered ${ or a bash ${ that Terraform would take"
    config = config_from_user_data(d)
    checked = config
    if "admin_token_secret_arn" in variant:
        # meshgate check reads the token file; point it at a stand-in for the fetched secret.
        (tmp_path / "admin-token").write_text("test-token\n")
        checked = config.replace('"/etc/meshgate/admin-token"', f'"{tmp_path}/admin-token"')
        assert checked != config
    (tmp_path / "meshgate.yaml").write_text(checked)
    out = run([meshgate, "check", "-c", tmp_path / "meshgate.yaml"])
    assert out.returncode == 0, out.stdout + out.stderr
    unit = heredoc(script, "MESHGATE_UNIT_EOF")
    assert "ExecStartPre=/usr/local/bin/meshgate check -c /etc/meshgate/meshgate.yaml" in unit
    source = variant.get("identity_source", "secretsmanager")
    if source == "vault-agent":
        agent = heredoc(script, "VAULT_AGENT_EOF")
        doc = tfeval.load_hcl_text(agent)
        assert f'uri_sans={SPIFFE_ID}' in agent and "pki_meshgate/issue/meshgate" in agent
        assert tfeval.unquote(doc["vault"][0]["address"]) == "https://vault.example.internal:8200"
        assert "After=vault-agent.service" in unit
    else:
        fetch = heredoc(script, "FETCH_IDENTITY_EOF")
        (tmp_path / "fetch").write_text(fetch)
        assert run(["bash", "-n", tmp_path / "fetch"]).returncode == 0
        assert f"URI:{SPIFFE_ID}" in fetch
    if "binary_sha256" in variant:
        assert "sha256sum --check" in script and variant["binary_sha256"] in script
    if "admin_token_secret_arn" in variant:
        assert yaml.safe_load(config)["admin"]["token_file"] == "/etc/meshgate/admin-token"
    cfg = yaml.safe_load(config)
    kinds = [listener["protocol"] for listener in cfg["listeners"]]
    if variant is INBOUND_OFF:
        assert kinds == ["http"] and "vm_services" not in cfg
    else:
        assert kinds == ["http", "mesh-inbound"] and set(cfg["vm_services"]) == set(d.inputs("fleet")["vm_services"])


def _fake_aws(bin_dir, secret_json):
    """An `aws` on PATH that answers `secretsmanager get-secret-value` with the given secret."""
    bin_dir.mkdir()
    (bin_dir / "secret.json").write_text(secret_json)
    aws = bin_dir / "aws"
    aws.write_text(
        "#!/bin/bash\n"
        'case "$1 $2" in\n'
        f'  "secretsmanager get-secret-value") cat "{bin_dir}/secret.json" ;;\n'
        '  *) echo "unexpected aws call: $*" >&2; exit 2 ;;\n'
        "esac\n"
    )
    aws.chmod(aws.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _secret_for(identity_dir) -> str:
    import json

    return json.dumps(
        {
            "cert_chain": (identity_dir / "cert-chain.pem").read_text(),
            "key": (identity_dir / "key.pem").read_text(),
            "root_cert": (identity_dir / "root-cert.pem").read_text(),
        }
    )


def _run_fetch(tmp_path, target, secret_json):
    d = rendered(target)
    fetch = tmp_path / "fetch-identity"
    fetch.write_text(heredoc(d.local("fleet", "user_data"), "FETCH_IDENTITY_EOF"))
    fetch.chmod(0o755)
    bin_dir = _fake_aws(tmp_path / "bin", secret_json)
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MESHGATE_IDENTITY_GROUP": group}
    return d, run([fetch], env=env)


def test_fetch_identity_installs_the_secret(meshgate, identity, tmp_path):
    """The JSON secret format of infra/istio/identity -> the fetcher -> files meshgate loads."""
    target = tmp_path / "certs"
    target.mkdir()
    d, out = _run_fetch(tmp_path, target, _secret_for(identity))
    assert out.returncode == 0, out.stderr
    for f in ("cert-chain.pem", "key.pem", "root-cert.pem"):
        assert (target / f).read_text() == (identity / f).read_text()
        assert stat.S_IMODE((target / f).stat().st_mode) == 0o640
    (tmp_path / "meshgate.yaml").write_text(config_from_user_data(d))
    check = run([meshgate, "check", "-c", tmp_path / "meshgate.yaml"])
    assert check.returncode == 0, check.stdout + check.stderr


def test_fetch_identity_refuses_another_identity(tmp_path):
    wrong = make_identity(tmp_path / "wrong", spiffe_id="spiffe://cluster.local/ns/meshgate/sa/someone-else")
    target = tmp_path / "certs"
    target.mkdir()
    _, out = _run_fetch(tmp_path, target, _secret_for(wrong))
    assert out.returncode != 0 and "is not for" in out.stderr, out.stderr
    assert list(target.iterdir()) == []


def test_fetch_identity_refuses_a_mismatched_key(identity, tmp_path):
    other = make_identity(tmp_path / "other")
    import json

    secret = json.loads(_secret_for(identity))
    secret["key"] = (other / "key.pem").read_text()
    target = tmp_path / "certs"
    target.mkdir()
    _, out = _run_fetch(tmp_path, target, json.dumps(secret))
    assert out.returncode != 0 and "does not match" in out.stderr, out.stderr
    assert list(target.iterdir()) == []
