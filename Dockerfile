# syntax=docker/dockerfile:1
# optserve images (docker-compose.yml builds them; tests/test_deploy.py checks this file against
# the code, since no Docker engine runs here).
#   server  the default (last) stage: the server and only its runtime dependencies on a slim
#           Python, run as a non-root user: `optserve serve --host 0.0.0.0`, settings from the
#           OPTSERVE_* environment (README, "Settings"), HEALTHCHECK on /readyz.
#   demo    the Python client with its demo extra and examples/: workers that train through
#           the service (`docker compose --profile demo up`).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a virtualenv with the server installed, copied whole into the runtime stage --------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/optserve
COPY service/pyproject.toml /src/service/pyproject.toml
COPY service/optserve /src/service/optserve
# A regular (non-editable) install without the `test` extra: no pytest, torch or ruff.
RUN /opt/optserve/bin/pip install /src/service

# -- demo: workers that train through the service --------------------------------------------
FROM ${PYTHON_IMAGE} AS demo
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY clients/python /src/clients/python
RUN pip install "/src/clients/python[demo]" \
    && useradd --system --uid 10001 --create-home --home-dir /home/optserve optserve \
    && mkdir /results && chown optserve /results
COPY examples /app/examples
WORKDIR /app
USER 10001
# Workers that reach the service at OPTSERVE_URL with OPTSERVE_API_KEY; results in /results.
CMD ["python", "examples/compare_optimizers.py", "--workers", "4", "--out", "/results"]

# -- server (default) ------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS server
# The user by number, so that a runtime (e.g. Kubernetes' runAsNonRoot) can tell it is not root.
# The embedded Valkey (used when OPTSERVE_REDIS_URL is unset) keeps its files in /data.
ENV PATH=/opt/optserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OPTSERVE_DATA_DIR=/data
RUN useradd --system --uid 10001 --create-home --home-dir /home/optserve optserve \
    && mkdir /data && chown optserve /data
COPY --from=build /opt/optserve /opt/optserve
WORKDIR /home/optserve
USER 10001
VOLUME ["/data"]
EXPOSE 8000
# No curl in a slim image: Python's urllib, which fails on a 503 from /readyz (store unreachable).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('OPTSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["optserve"]
CMD ["serve", "--host", "0.0.0.0"]
