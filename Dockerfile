# sinkserve: OpenAI-compatible chat server with a StreamingLLM attention-sink KV cache.
#
#   docker build -t sinkserve .                                # CUDA build of torch (GPU hosts)
#   docker build --build-arg TORCH_VARIANT=cpu -t sinkserve:cpu .
#   docker run --gpus all -p 8000:8000 -v sinkserve-data:/data sinkserve
#
# Installs through the same scripts/install.sh as a native checkout. The CUDA wheels of torch on PyPI
# bring their own CUDA libraries, so a slim Python base is enough; the host needs only the NVIDIA driver
# and the NVIDIA Container Toolkit.
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

WORKDIR /app

# torch first, in its own layer: by far the largest download, and it changes only with the lock file.
COPY scripts/install.sh scripts/install.sh
COPY requirements.lock ./
RUN scripts/install.sh --torch-only

COPY . .
RUN scripts/install.sh --no-editable --no-extras \
    && useradd --system --create-home --uid 10001 --user-group sinkserve \
    && mkdir -p /data/models /data/sessions \
    && chown -R sinkserve:sinkserve /data

# Converted weights (/data/models) and saved sessions (/data/sessions) live on the volume.
ENV SINKSERVE_HOME=/data \
    HF_HOME=/data/hf \
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
