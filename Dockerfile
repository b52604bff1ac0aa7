# sinkserve: OpenAI-compatible chat server with a StreamingLLM attention-sink KV cache.
#
#   docker build -t sinkserve .                                # CUDA build of torch (GPU hosts)
#   docker build --build-arg TORCH_VARIANT=cpu -t sinkserve:cpu .
#   docker run --gpus all -p 8000:8000 -v sinkserve-data:/data sinkserve
#
# Installs through the same scripts/install.sh as a native checkout. The CUDA wheels of torch on PyPI
# bring their own CUDA libraries, so a slim Python base is enough; the host needs only the NVIDIA driver
# (new enough for the CUDA of the torch build: the entry point logs torch.version.cuda) and the NVIDIA
# Container Toolkit. The CUDA image refuses to start without a usable GPU (SINKSERVE_REQUIRE_CUDA, set
# from TORCH_VARIANT by docker/entrypoint.sh; 0 allows the CPU). A C compiler is installed because
# `--compile` needs one: Inductor builds C++ kernels on a CPU and Triton builds its launcher on a GPU; their
# caches live on the volume, so a restart does not compile again. On a CPU the engine also builds its own
# decode kernels with it at start (engine/model/kernels/native.py; without one PyTorch's operations stand in).
FROM python:3.11.11-slim-bookworm

ARG TORCH_VARIANT=cuda

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SINKSERVE_VENV=/opt/venv \
    SINKSERVE_TORCH=${TORCH_VARIANT} \
    SINKSERVE_EDITABLE=0 \
    PATH=/opt/venv/bin:${PATH}

# gcc and the C library headers for torch.compile (Triton's launcher, Inductor's C++ kernels) and the CPU
# decode kernels (engine/model/kernels/*.c); unpinned on purpose: build tools of the pinned Debian release, with
# its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# torch first, in its own layer: by far the largest download, and it changes only with the lock file.
COPY scripts/install.sh scripts/install.sh
COPY requirements.lock ./
RUN scripts/install.sh --torch-only

COPY . .
RUN scripts/install.sh --no-editable --no-extras \
    && useradd --system --create-home --uid 10001 --user-group sinkserve \
    && mkdir -p /data/models /data/sessions /data/cache/inductor /data/cache/triton \
    && chown -R sinkserve:sinkserve /data

# Converted weights (/data/models), saved sessions (/data/sessions) and compiled kernels (/data/cache) live
# on the volume. NVIDIA_*: what the NVIDIA Container Toolkit exposes (all GPUs; CUDA and nvidia-smi).
ENV SINKSERVE_HOME=/data \
    HF_HOME=/data/hf \
    TORCHINDUCTOR_CACHE_DIR=/data/cache/inductor \
    TRITON_CACHE_DIR=/data/cache/triton \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SINKSERVE_HOST=0.0.0.0 \
    SINKSERVE_PORT=8000
VOLUME ["/data"]

# Numeric ids (the user "sinkserve" made above) so that runtimes can check for non-root without /etc/passwd.
USER 10001:10001
EXPOSE 8000

# The first start converts the embedded GGUF model into /data/models (about 2 minutes), hence the long
# start period. slim images have no curl: use the venv's python.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SINKSERVE_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["serve"]
