#!/usr/bin/env python
"""Dependency audit for CI: pip-audit over requirements.lock; fails on any known vulnerability.

``scripts/audit_deps.py [--venv DIR] [--lock FILE] [-- extra pip-audit args]`` runs
``pip-audit -r requirements.lock --no-deps --disable-pip -f json`` (pip-audit's default vulnerability
service is PyPI's JSON API, https://pypi.org/pypi/<name>/<version>/json). Exit status:

* 1 when any pinned package has a known vulnerability (listed with its fix versions), or when pip-audit
  fails for any other reason than the network;
* 0 when nothing is known to be vulnerable;
* 0 with a ``SKIPPED`` message when the vulnerability service cannot be used: pip-audit cannot connect
  to it, or it answers for none of the pins (every package "not found": a registry mirror or proxy that
  does not serve PyPI's per-version JSON). Set ``SINKSERVE_AUDIT_STRICT=1`` to fail instead.

Packages the service does not know (skipped) while others were audited are listed as a warning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NETWORK_HINTS = ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Max retries exceeded", "NameResolution",
                 "Temporary failure in name resolution", "Network is unreachable", "Connection refused",
                 "ServiceError", "SSLError", "ProxyError")


def skip(reason: str) -> int:
    strict = os.environ.get("SINKSERVE_AUDIT_STRICT", "") not in ("", "0")
    print(f"[audit] {'FAILED' if strict else 'SKIPPED'}: the vulnerability service could not be used ({reason})")
    return 1 if strict else 0


def main(argv: list[str]) -> int:
    venv, lock, extra = ROOT / ".venv", ROOT / "requirements.lock", []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--venv" and args:
            venv = Path(args.pop(0))
        elif arg == "--lock" and args:
            lock = Path(args.pop(0))
        elif arg == "--":
            extra, args = args, []
        else:
            print(f"usage: {sys.argv[0]} [--venv DIR] [--lock FILE] [-- pip-audit args]", file=sys.stderr)
            return 2
    tool = venv / "bin" / "pip-audit"
    if not tool.exists():
        print(f"[audit] {tool} is missing (install the test extras: scripts/install.sh --extras test)")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "audit.json"
        proc = subprocess.run([str(tool), "-r", str(lock), "--no-deps", "--disable-pip", "--progress-spinner",
                               "off", "-f", "json", "-o", str(out), *extra], capture_output=True, text=True)
        report = json.loads(out.read_text()) if out.exists() and out.stat().st_size else None
    log = (proc.stdout + proc.stderr).strip()
    if report is None:
        if any(hint in log for hint in NETWORK_HINTS):
            return skip(log.splitlines()[-1] if log else "no answer")
        print(log)
        print(f"[audit] pip-audit failed (exit {proc.returncode})")
        return 1
    deps = report.get("dependencies", [])
    vulnerable = [d for d in deps if d.get("vulns")]
    skipped = [d for d in deps if "skip_reason" in d]
    audited = len(deps) - len(skipped)
    for dep in vulnerable:
        for vuln in dep["vulns"]:
            fixes = ", ".join(vuln.get("fix_versions") or []) or "no fix released"
            print(f"[audit] VULNERABLE {dep['name']}=={dep['version']}: {vuln['id']} "
                  f"({', '.join(vuln.get('aliases') or [])}) fixed in: {fixes}")
    if vulnerable:
        print(f"[audit] {sum(len(d['vulns']) for d in vulnerable)} known vulnerabilities in "
              f"{len(vulnerable)} of {len(deps)} pinned packages")
        return 1
    if deps and not audited:
        return skip(f"it knew none of the {len(deps)} pins, e.g. {skipped[0]['skip_reason']}")
    if skipped:
        print(f"[audit] warning: {len(skipped)} pins could not be audited: "
              + ", ".join(d["name"] for d in skipped))
    print(f"[audit] no known vulnerabilities in {audited} audited pins of {lock.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
