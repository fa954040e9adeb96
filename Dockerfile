# syntax=docker/dockerfile:1.7
# One image for every Kiln service: the first argument names what the container runs.
#
#   docker build -t kiln .                                  # CPU torch (quota, context, delivery; CPU render)
#   docker build -t kiln:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
#   docker run kiln quota | context | delivery | render [--gpu N]
#   docker run kiln keys     # mint the deployment's keys and NATS credentials into $KILN_DATA_DIR
#   docker run kiln setup    # quota migrations (as the owner) + Kiln's streams (as the admin)
#   docker run kiln kiln …   # the CLI (accounts, audit, nats-config, …)
#
# The services join an external NATS cluster and PostgreSQL (KILN_NATS_URL, the
# KILN_*_DATABASE_URL variables), so the `embedded` extra is not installed. What each
# deployment sets is in infra/deploy/README.md.
FROM python:3.11-slim

# torch first, pinned: a torch range in the project's dependencies (or none) lets pip pull a
# multi-GB CUDA build. CPU by default; a GPU image takes a CUDA build of the same version
# from another index (the build arg above).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    KILN_DATA_DIR=/var/lib/kiln \
    KILN_METRICS_HOST=0.0.0.0 \
    KILN_HTTP_HOST=0.0.0.0 \
    KILN_TRACING_UI=off

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app

# The project's dependencies in a layer of their own, so that a code change does not
# reinstall them: pyproject.toml alone, over empty packages, then the code.
COPY pyproject.toml README.md ./
RUN mkdir -p kiln shared services infra \
    && pip install . \
    && pip uninstall -y kiln

# The code, installed in place: settings find the shipped model (services/render/models),
# plans.toml, context.toml and the playground's files beside the code (shared.settings.PROJECT_ROOT).
COPY . .
RUN pip install --no-deps -e . \
    && python -c "import services.quota, services.context, services.render, services.delivery"

# One process per container, as a user of its own; /var/lib/kiln holds the keys and
# credentials a deployment mounts (KILN_DATA_DIR).
# (/nats-auth: where the `keys` step writes nats-server's auth include under compose; an
# empty volume mounted there takes its owner from the image.)
RUN useradd --system --uid 10001 --home-dir /var/lib/kiln --shell /usr/sbin/nologin kiln \
    && mkdir -p /var/lib/kiln /nats-auth \
    && chown kiln:kiln /var/lib/kiln /nats-auth

COPY --chmod=0755 <<'EOF' /usr/local/bin/kiln-entrypoint
#!/bin/sh
# `kiln-entrypoint NAME [ARGS…]`: run one Kiln process in the foreground (exec: the
# service is PID 1 and gets SIGTERM itself; each drains, then exits 0).
set -eu
what="${1:-}"
[ $# -gt 0 ] && shift
case "$what" in
  quota|context|delivery|render)
    exec python -m "services.$what" "$@"
    ;;
  keys|setup)
    # Before the services: keys and credentials; migrations and streams (infra/deploy_steps.py).
    exec python -m infra.deploy_steps "$what"
    ;;
  kiln)
    exec kiln "$@"
    ;;
  *)
    echo "usage: kiln-entrypoint quota|context|delivery|render|keys|setup|kiln [ARGS…]" >&2
    exit 64
    ;;
esac
EOF

USER kiln
EXPOSE 8480 9461 9462 9463 9464
ENTRYPOINT ["kiln-entrypoint"]
CMD ["delivery"]
