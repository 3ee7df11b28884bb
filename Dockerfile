# clipforge service image: `clipforge serve` by default, and the same image trains and indexes.
#
#   docker build -t clipforge .                                    # torch from pip's default index
#   docker build --build-arg TORCH_INDEX_URL=URL -t clipforge .    # torch from another index (e.g. a CPU-only build)
#   pip wheel --wheel-dir deploy/wheelhouse . && docker build -t clipforge .   # air-gapped: wheels only
#
# When deploy/wheelhouse/ holds wheels, everything is installed from them with --no-index and
# no index is ever contacted. Configuration is by CLIPFORGE_* environment variables; the
# checkpoint, index and images live on volumes under /var/lib/clipforge.

FROM python:3.11-slim AS builder

# Empty: leave pip's own index configuration alone. Set it to install torch from another index.
ARG TORCH_INDEX_URL=""
# Keep in step with the torch pin in pyproject.toml (tests/test_deploy_files.py checks it).
ARG TORCH_VERSION=2.13.0
# Optional extras of clipforge to install, comma-separated (e.g. "milvus" for a Milvus index store).
ARG CLIPFORGE_EXTRAS=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv /opt/venv

# torch first, in its own layer: it is most of the image and changes least often.
COPY deploy/wheelhouse/ /wheels/
RUN if compgen -G "/wheels/*.whl" > /dev/null; then \
        pip install --no-cache-dir --no-index --find-links /wheels "torch==${TORCH_VERSION}"; \
    elif [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi

# Then the other dependencies, from pyproject.toml alone: editing the sources keeps this layer.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && if compgen -G "/wheels/*.whl" > /dev/null; then \
        pip install --no-cache-dir --no-index --find-links /wheels -r /tmp/requirements.txt; \
    else \
        pip install --no-cache-dir -r /tmp/requirements.txt; \
    fi

COPY README.md clipforge_cli.py ./
COPY model/ model/
COPY training/ training/
COPY index/ index/
COPY app/ app/
RUN if compgen -G "/wheels/*.whl" > /dev/null; then \
        pip install --no-cache-dir --no-index --find-links /wheels "/src${CLIPFORGE_EXTRAS:+[${CLIPFORGE_EXTRAS}]}"; \
    else \
        pip install --no-cache-dir "/src${CLIPFORGE_EXTRAS:+[${CLIPFORGE_EXTRAS}]}"; \
    fi \
    && python -c "import model, training, index, app, clipforge_cli"


FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CLIPFORGE_HOST=0.0.0.0 \
    CLIPFORGE_PORT=8000 \
    CLIPFORGE_CHECKPOINT=/var/lib/clipforge/checkpoints/demo/best \
    CLIPFORGE_INDEX=/var/lib/clipforge/index/demo

RUN groupadd --gid 10001 clipforge \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin clipforge \
    && mkdir -p /var/lib/clipforge/checkpoints /var/lib/clipforge/index /var/lib/clipforge/images \
    && chown -R clipforge:clipforge /var/lib/clipforge

COPY --from=builder /opt/venv /opt/venv

# the numeric id, so that runtimes can check it is not root without reading /etc/passwd
USER 10001:10001
WORKDIR /var/lib/clipforge
VOLUME ["/var/lib/clipforge/checkpoints", "/var/lib/clipforge/index", "/var/lib/clipforge/images"]
EXPOSE 8000

# Ready means model and index loaded (GET /readyz answers 200); urllib raises on anything else.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('CLIPFORGE_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["clipforge"]
CMD ["serve"]
