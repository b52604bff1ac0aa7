"""The Python packages the CUDA suite carries to a GPU machine as wheels, and the check that the list is whole.

The lent GPU machines (``/work/.library/device/KINDS.md``) run Python 3.12 with torch 2.11 (CUDA 13) and
transformers 5.17 but no fastapi, pydantic, uvicorn, sse-starlette or gguf, and cannot reach a package
index. ``scripts/gpu_check.sh --download-wheels DIR`` downloads ``CARRIED`` (the versions pinned in
requirements.lock) for CPython 3.12 on manylinux x86-64 into DIR; on the GPU machine they are installed
with ``pip install --no-index --no-deps --target`` and put first on ``PYTHONPATH``.

``python -m tests.gpu.wheels check [DIR]`` (the dry run's check, no network):

1. every requirement of every carried package (its installed metadata here, markers evaluated for
   CPython 3.12 on Linux x86-64) is carried or among the GPU image's packages (``GPU_IMAGE``), with the
   version range met where that version is known;
2. every third-party module that ``engine``, ``server``, ``bench`` and ``tests`` import comes from a
   carried package or the GPU image;
3. with DIR: a wheel of each carried pin is there, built for CPython 3.12 (or pure Python) on x86-64 Linux.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
#: packages the suite and bench_gpu.sh need that the GPU image lacks, or has too old (transformers: the
#: runner passes ``cache=``, accepted from 5.24; the image has 5.17)
CARRIED = (
    "fastapi", "starlette", "pydantic", "pydantic-core", "pydantic-settings", "python-dotenv", "annotated-types",
    "annotated-doc", "typing-inspection", "typing-extensions", "uvicorn", "sse-starlette", "transformers", "gguf",
    "redis", "prometheus-client", "anyio", "opentelemetry-api", "llguidance",
)
#: the GPU image's packages (KINDS.md, "Python packages already there", read 2026-11-17)
GPU_IMAGE = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp
""".split())
#: versions seen there (KINDS.md's pip list row), checked against requirements' ranges
GPU_VERSIONS = {"huggingface-hub": "1.33.0", "tokenizers": "0.23.2", "safetensors": "0.8.0", "numpy": "2.5.2",
                "torch": "2.11.0", "accelerate": "1.15.0", "transformers": "5.17.0"}
#: the interpreter there, for evaluating environment markers
GPU_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
           "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
#: where the code that runs there lives, and the packages of this repository
SOURCES = ("engine", "server", "bench", "tests/gpu", "tests/engine/reference_cache.py", "tests/conftest.py")
LOCAL = {"engine", "server", "bench", "tests"}


def pins() -> dict[str, str]:
    """requirements.lock as {canonical name: version}."""
    out = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonicalize_name(name)] = version.strip()
    return out


def carried_pins() -> dict[str, str]:
    locked = pins()
    missing = [n for n in CARRIED if canonicalize_name(n) not in locked]
    if missing:
        raise SystemExit(f"carried packages not pinned in requirements.lock: {missing}")
    return {canonicalize_name(n): locked[canonicalize_name(n)] for n in CARRIED}


def requirement_problems(carried: dict[str, str]) -> list[str]:
    """Requirements of carried packages met neither by the carried set nor by the GPU image."""
    problems = []
    for name, version in carried.items():
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            problems.append(f"{name}=={version}: not installed here, its requirements cannot be read")
            continue
        if canonicalize_name(dist.version) != canonicalize_name(version):
            problems.append(f"{name}: installed {dist.version} here, pinned {version}")
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(GPU_ENV):
                continue
            dep = canonicalize_name(req.name)
            have = carried.get(dep) or (GPU_VERSIONS.get(dep) if dep in GPU_IMAGE else None)
            if dep not in carried and dep not in GPU_IMAGE:
                problems.append(f"{name} needs {req}: neither carried nor in the GPU image")
            elif have and req.specifier and not req.specifier.contains(Version(have), prereleases=True):
                problems.append(f"{name} needs {req}: the GPU machine would have {dep} {have}")
    return problems


def imported_modules() -> set[str]:
    """Top-level names of the modules imported anywhere under ``SOURCES``."""
    names = set()
    for source in SOURCES:
        path = ROOT / source
        for file in [path] if path.is_file() else sorted(path.rglob("*.py")):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def import_problems(carried: dict[str, str]) -> list[str]:
    """Third-party modules the code imports that the GPU machine would not have."""
    owners = md.packages_distributions()
    problems = []
    for module in sorted(imported_modules() - LOCAL - set(sys.stdlib_module_names)):
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        if not dists:
            problems.append(f"import {module}: no installed distribution provides it here")
        elif not dists & (set(carried) | GPU_IMAGE):
            problems.append(f"import {module} (from {sorted(dists)}): neither carried nor in the GPU image")
    return problems


def _runs_there(tag) -> bool:
    """A wheel tag CPython 3.12 on manylinux x86-64 installs: pure Python, cp312, or the stable ABI (abi3)."""
    python = tag.interpreter in ("py3", "cp312") or (
        tag.abi == "abi3" and re.fullmatch(r"cp3\d+", tag.interpreter) and int(tag.interpreter[3:]) <= 12)
    return bool(python) and (tag.platform == "any" or (tag.platform.startswith("manylinux")
                                                       and tag.platform.endswith("x86_64")))


def wheel_problems(folder: Path, carried: dict[str, str]) -> list[str]:
    """Carried pins without a wheel for CPython 3.12 / x86-64 Linux in ``folder``."""
    found: dict[str, list] = {}
    for wheel in folder.glob("*.whl"):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        found.setdefault(canonicalize_name(name), []).append((str(version), tags, wheel.name))
    problems = []
    for name, version in carried.items():
        wheels = found.pop(name, [])
        good = [w for v, tags, w in wheels if canonicalize_name(v) == canonicalize_name(version)
                and any(_runs_there(t) for t in tags)]
        if not good:
            problems.append(f"{name}=={version}: no wheel for CPython 3.12 x86-64 in {folder} "
                            f"(found {[w for _, _, w in wheels]})")
        elif len(wheels) > 1:
            problems.append(f"{name}: {len(wheels)} wheels in {folder}; keep one version")
    problems += [f"{name}: not in the carried list, remove {[w for *_, w in wheels]}" for name, wheels in found.items()]
    return problems


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("check", "list"):
        sys.stderr.write("usage: python -m tests.gpu.wheels {list | check [DIR]}\n")
        return 2
    carried = carried_pins()
    if argv[0] == "list":
        sys.stdout.write("".join(f"{name}=={version}\n" for name, version in carried.items()))
        return 0
    problems = requirement_problems(carried) + import_problems(carried)
    if len(argv) > 1:
        folder = Path(argv[1])
        problems += wheel_problems(folder, carried) if folder.is_dir() else [f"{folder}: no such folder"]
    for problem in problems:
        sys.stdout.write(f"[wheels] missing: {problem}\n")
    checked = "requirements and imports" + (f", wheels in {argv[1]}" if len(argv) > 1 else "")
    sys.stdout.write(f"[wheels] {len(carried)} carried packages; {checked}: "
                     f"{'OK' if not problems else f'{len(problems)} problems'}\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
