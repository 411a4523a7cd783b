# fleetbus: the worker, the KME simulator and the CLI in one image.
#   docker build -t fleetbus:0.1.0 .
#   docker run --rm fleetbus:0.1.0 --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/src/constraints.txt

WORKDIR /src
# The locked dependencies first, in a layer of their own: a code change rebuilds only the
# layers below. PIP_CONSTRAINT also pins the build backend pip fetches for `pip install .`.
COPY constraints.txt ./
RUN grep -v '^setuptools==\|^wheel==' constraints.txt > /tmp/runtime.txt \
    && pip install -r /tmp/runtime.txt \
    && rm /tmp/runtime.txt
COPY pyproject.toml README.md ./
COPY bus ./bus
COPY sdk ./sdk
COPY cli ./cli
COPY devtools ./devtools
COPY kmesim ./kmesim
COPY providers ./providers
COPY processors ./processors
COPY observability ./observability
RUN pip install . \
    && pip check \
    && rm -rf /src/build /src/*.egg-info

# Non-root, fixed uid/gid (Kubernetes runAsUser in the Helm chart uses the same 10001).
# /exports/* are docker-compose.yml's mount points for the key exports of `init`: a named
# volume takes the owner of the image's folder it is mounted on, and init runs as 10001.
RUN groupadd --system --gid 10001 fleetbus \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin fleetbus \
    && mkdir -p /var/lib/fleetbus /keys /pki /exports/worker-keys /exports/worker-pki /exports/fleet-keys \
    && chown -R 10001:10001 /var/lib/fleetbus /keys /pki /exports
WORKDIR /var/lib/fleetbus
USER 10001:10001
ENV FLEETBUS_DATA_DIR=/var/lib/fleetbus/state \
    FLEETBUS_KEYS_DIR=/keys

# /metrics of the worker (FLEETBUS_METRICS_PORT), faust web, KME-A, KME-B.
EXPOSE 9100 6066 8443 8444
ENTRYPOINT ["fleetbus"]
CMD ["worker"]
