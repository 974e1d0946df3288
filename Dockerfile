# Headwater agent image. Two stages: the build stage installs the package and its dependencies into a
# virtual environment; the final stage is the same slim Python base with only that environment.
#   docker build -t headwater:0.1.0 .
#   docker run --rm --read-only -p 8125:8125/udp -p 9102:9102 \
#     -v "$PWD/config.yaml:/etc/headwater/config.yaml:ro" headwater:0.1.0
# The agent runs as PID 1 (no init needed: it starts no child processes) and handles SIGTERM itself:
# receivers stop and flush, exporters drain until service.shutdown_timeout, a disk queue keeps the rest
# for the next start, exit 0. Liveness and readiness are /healthz and /readyz on the telemetry
# endpoint (8888): Kubernetes probes use them, so there is no Dockerfile HEALTHCHECK.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent/ agent/
COPY receivers/ receivers/
COPY processors/ processors/
COPY exporters/ exporters/
COPY connectors/ connectors/
COPY config.example.yaml ./
# The image's default config is config.example.yaml listening on all interfaces: inside a container,
# 127.0.0.1 is unreachable through published ports (`docker run -p`).
RUN sed 's/127\.0\.0\.1:/0.0.0.0:/' config.example.yaml > config.yaml
# Binary wheels only: every dependency ships manylinux wheels, so no compiler is needed.
RUN python -m venv /opt/headwater \
    && /opt/headwater/bin/pip install --no-cache-dir --only-binary=:all: /src \
    && /opt/headwater/bin/pip uninstall -y pip setuptools

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="headwater" \
      org.opencontainers.image.description="Headwater telemetry agent: StatsD/OTLP/JSON in; Prometheus, remote-write, OTLP out" \
      org.opencontainers.image.licenses="Apache-2.0"
# Bytecode was compiled at install time: nothing is written at run time, so a read-only root works.
ENV PATH=/opt/headwater/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/headwater /opt/headwater
COPY --from=build /src/config.yaml /etc/headwater/config.yaml
# The queue and socket directories are volumes in Kubernetes (emptyDir or hostPath); these are the
# mount points, owned by the agent's user for `docker run` without volumes.
RUN mkdir -p /var/lib/headwater/queue /var/run/headwater \
    && chown -R 10001:10001 /var/lib/headwater /var/run/headwater
USER 10001:10001
WORKDIR /var/lib/headwater
# StatsD (UDP and TCP), OTLP gRPC and HTTP, JSON HTTP, Prometheus pull endpoint, the agent's own endpoint.
EXPOSE 8125/udp 8125/tcp 4317/tcp 4318/tcp 8080/tcp 9102/tcp 8888/tcp
ENTRYPOINT ["headwater"]
CMD ["run", "-c", "/etc/headwater/config.yaml"]
