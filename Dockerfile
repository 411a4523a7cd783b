# fleetbus: the worker, the KME simulator and the CLI in one image.
#   docker build -t fleetbus:0.1.0 .
#   docker run --rm fleetbus:0.1.0 --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY bus ./bus
COPY providers ./providers
COPY processors ./processors
COPY observability ./observability
RUN pip install . \
    && rm -rf /src/build /src/*.egg-info

# Non-root, fixed uid/gid (Kubernetes runAsUser in the Helm chart uses the same 10001).
RUN groupadd --system --gid 10001 fleetbus \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin fleetbus \
    && mkdir -p /var/lib/fleetbus /keys /pki \
    && chown -R 10001:10001 /var/lib/fleetbus /keys /pki
WORKDIR /var/lib/fleetbus
USER 10001:10001
ENV FLEETBUS_DATA_DIR=/var/lib/fleetbus/state \
    FLEETBUS_KEYS_DIR=/keys

# /metrics of the worker (FLEETBUS_METRICS_PORT), faust web, KME-A, KME-B.
EXPOSE 9100 6066 8443 8444
ENTRYPOINT ["fleetbus"]
CMD ["worker"]
