"""checkov (pinned in requirements-checkov.txt, its own venv: it needs bc-python-hcl2, which
installs the same `hcl2` module as python-hcl2) scans terraform/ with no failed check. Skips are
only inline `#checkov:skip=CKV_...:reason` comments, each with a written reason."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import tfeval
from conftest import MODULES, REPO, TF

CHECKOV = REPO / "target" / "checkov-venv" / "bin" / "checkov"


@pytest.fixture(scope="module")
def report():
    if not os.access(CHECKOV, os.X_OK):
        pytest.fail(f"{CHECKOV} is missing: scripts/test.sh installs terraform/tests/requirements-checkov.txt there")
    # Offline: no Prisma Cloud guideline download, no update check.
    out = subprocess.run(
        [str(CHECKOV), "--directory", str(TF), "--framework", "terraform", "--compact", "--skip-download",
         "--download-external-modules", "false", "--output", "json"],
        capture_output=True, text=True, env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "TRUE"}, timeout=300,
    )
    assert out.returncode in (0, 1), out.stderr[-3000:]
    data = json.loads(out.stdout)
    reports = data if isinstance(data, list) else [data]
    tf = [r for r in reports if r.get("check_type") == "terraform"]
    assert len(tf) == 1, [r.get("check_type") for r in reports]
    return tf[0]


def test_no_failed_checks(report):
    failed = [(f["check_id"], f["check_name"], f["resource"], f["file_path"]) for f in report["results"]["failed_checks"]]
    assert failed == []
    assert report["summary"]["parsing_errors"] == 0


def test_every_module_was_scanned(report):
    resources = {f["resource"] for kind in ("passed_checks", "skipped_checks") for f in report["results"][kind]}
    for name in MODULES:
        assert any(r.startswith(f"module.{name}.") for r in resources), f"no checkov result for module {name}"
    assert report["summary"]["passed"] >= 100, report["summary"]


def test_skips_are_inline_with_reasons(report):
    inline = tfeval.checkov_skips(TF)
    for check_id, reason, path in inline:
        assert len(reason) >= 30, f"{path}: skip of {check_id} needs a written reason, got {reason!r}"
    skipped = {(f["check_id"], f["check_result"].get("suppress_comment", "")) for f in report["results"]["skipped_checks"]}
    assert skipped, "expected the documented inline skips"
    for check_id, comment in skipped:
        assert (check_id, comment) in {(c, r) for c, r, _ in inline}, f"{check_id} skipped without an inline reason"
    assert not list(REPO.glob(".checkov.y*ml")) and not list(TF.rglob(".checkov.y*ml")), "no config-file skips"
