"""dashboards/prometheus.ec2.yml: promtool accepts it, and it discovers and scrapes what the
Terraform modules deploy (tags, ports, job names the alerts and the autoscaler query expect)."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

import tfeval
from conftest import MODULES, REPO, deployment, run

CONFIG = REPO / "dashboards" / "prometheus.ec2.yml"


def jobs():
    return {j["job_name"]: j for j in yaml.safe_load(CONFIG.read_text())["scrape_configs"]}


def test_promtool_accepts_it():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: scripts/test.sh installs the prometheus package")
    out = run([promtool, "check", "config", CONFIG.name], cwd=CONFIG.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def _sd(job):
    (sd,) = job["ec2_sd_configs"]
    filters = {f["name"]: f["values"] for f in sd["filters"]}
    address = next(r for r in job["relabel_configs"] if r.get("target_label") == "__address__")
    return sd, filters, address


def test_fleet_job_matches_the_fleet_module():
    d = deployment()
    job = jobs()["meshgate"]
    sd, filters, address = _sd(job)
    admin_port = d.eval_in("fleet", "var.admin_port")
    assert sd["port"] == admin_port and address["replacement"] == f"${{1}}:{admin_port}"
    assert address["source_labels"] == ["__meta_ec2_private_ip"]
    # Every instance of an Auto Scaling group carries aws:autoscaling:groupName = the group name.
    asg_name = d.eval_in("fleet", d.resource("fleet", "aws_autoscaling_group", "this")["name"])
    assert filters["tag:aws:autoscaling:groupName"] == [asg_name]
    assert job["metrics_path"] == "/metrics"
    # The alerts, the dashboard and the autoscaler's default query select job="meshgate".
    alerts = (REPO / "dashboards/rules/meshgate-alerts.yml").read_text()
    assert 'job="meshgate"' in alerts
    query = (REPO / "infra/autoscaler/src/config.rs").read_text()
    assert re.search(r'meshgate_requests_in_flight\{job="meshgate"\}', query)


def test_autoscaler_job_matches_the_autoscaler_module():
    d = deployment()
    job = jobs()["meshgate-autoscaler"]
    sd, filters, address = _sd(job)
    port = d.eval_in("autoscaler", "var.metrics_port")
    assert sd["port"] == port and address["replacement"] == f"${{1}}:{port}"
    tags = d.local("autoscaler", "tags")
    for name, values in filters.items():
        if name.startswith("tag:"):
            assert tags.get(name[4:]) in values, (name, tags)
    scaler = yaml.safe_load(d.local("autoscaler", "autoscaler_config"))
    assert scaler["bind"].endswith(f":{port}")


def test_fleet_instances_are_not_scraped_as_autoscaler():
    d = deployment()
    fleet_tags = d.local("fleet", "tags")
    asg = tfeval.expr_source(d.resource("fleet", "aws_autoscaling_group", "this")["dynamic"][1]['"tag"']["for_each"])
    assert '"meshgate:role" = "proxy"' in asg
    assert fleet_tags.get("meshgate:role") != "autoscaler"


def test_readme_lists_it():
    assert "prometheus.ec2.yml" in (REPO / "dashboards/README.md").read_text()
