# syntax=docker/dockerfile:1
# The hub's image: the wheel of this checkout and its runtime dependencies on a slim Python,
# run as an unprivileged user. No test or lint tools, no source tree. See docs/operations.md, "Deploy".

# Build stage: wheels for the hub and everything it declares in pyproject.toml.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
# The package and the two top-level folders pyproject.toml maps into it (hub.builtin, hub.migrations).
COPY hub ./hub
COPY connectors ./connectors
COPY migrations ./migrations
# With the `otel` extra: HUB_OTEL=true turns traces on without another image (docs/tracing.md).
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[otel]"

# Runtime stage: installs those wheels only (no compiler, no index, no pip cache).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HUB_ENV=production \
    HUB_HOST=0.0.0.0 \
    HUB_PORT=8000 \
    HUB_DATA_DIR=/usr/local/var/hub-instance
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "webhook-hub[otel]"
# The hub runs as `hub` (uid 10001), owning nothing but its data directory (HUB_DATA_DIR,
# set above; without it an installed hub would use ~/.local/share/webhook-hub), and the
# metrics directory in it (compose mounts one volume there for web and workers: a new
# volume takes this directory's owner).
RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin hub \
    && mkdir -p /app /usr/local/var/hub-instance/metrics \
    && chown hub:hub /usr/local/var/hub-instance /usr/local/var/hub-instance/metrics
WORKDIR /app
COPY gunicorn.conf.py /app/gunicorn.conf.py
USER hub
EXPOSE 8000
# /health answers 200 while gunicorn serves; no curl in a slim image, so Python asks.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/health' % os.environ.get('HUB_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(url, timeout=3).status == 200 else 1)"]
CMD ["gunicorn", "-c", "/app/gunicorn.conf.py", "hub:create_app()"]
