# syntax=docker/dockerfile:1
# Charter's image: the control plane only (no torch, no dev extras), run as a non-root user
# on a read-only root filesystem. The Helm chart's default image is built from this file:
#
#   docker build -t charter:0.1.0 .
#   scripts/build-image        # podman, on a Debian base made here (no registry needed)
#
# BASE_IMAGE is any Debian-based image with Python 3.11 or newer as `python3`: the
# official Python image by default; pin it by digest (`...@sha256:<digest>`) once you have
# mirrored it (`crane digest` / `skopeo inspect`, see docs/operations/helm.md).
ARG BASE_IMAGE=docker.io/library/python:3.11.13-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/charter/venv
# Charter finds its migrations/ and policies/ beside its package (charter/migrate.py and
# charter/policy/bundle.py look two and three folders above their own file), so it is
# installed in place from the source tree in /opt/charter/app rather than into
# site-packages, where those folders would be missing.
WORKDIR /opt/charter/app
COPY pyproject.toml README.md ./
COPY platform ./platform
COPY migrations ./migrations
COPY policies ./policies
RUN /opt/charter/venv/bin/pip install --upgrade pip \
 && /opt/charter/venv/bin/pip install -e ".[inspect]"
# The control plane installs light: torch belongs to the `node` extra only. Content
# inspection (Presidio's pattern recognizers, no language model) is in: policy data turns
# it on without a new image.
RUN ! /opt/charter/venv/bin/python -c "import torch" 2>/dev/null
# Python extension modules ship with their symbol tables (spaCy's alone: 126 MB, 29 MB
# stripped); nothing at run time reads them. The libraries auditwheel vendored (`*.libs`
# folders) are left alone: they were patched in place, and stripping them breaks them.
RUN apt-get update && apt-get install -y --no-install-recommends binutils \
 && find /opt/charter/venv -path "*.libs" -prune -o -name "*.cpython-*.so" -type f \
      -exec strip --strip-unneeded {} + \
 && apt-get purge -y binutils && rm -rf /var/lib/apt/lists/* \
 && /opt/charter/venv/bin/python -c "import numpy, spacy, tokenizers, pydantic_core, \
      psycopg, regex, cryptography.hazmat.bindings._rust, presidio_analyzer, transformers"
# The root filesystem is read-only at run time: compile the bytecode now.
RUN /opt/charter/venv/bin/python -m compileall -q /opt/charter/app/platform

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="Charter" \
      org.opencontainers.image.description="Sovereign-AI governance: approved-model registry, policy-enforced dispatch, tamper-evident audit." \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 charter \
 && useradd --system --uid 10001 --gid charter --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin charter
COPY --from=build /opt/charter /opt/charter
ENV PATH=/opt/charter/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HOME=/tmp
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["charter"]
CMD ["serve", "--bind", "0.0.0.0:8080", "--workers", "2"]
