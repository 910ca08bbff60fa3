# neuroserve, CPU image. Build: docker build -t neuroserve .   Run: docker run -p 8000:8000 neuroserve
# Stage 1 builds a virtual environment with the serving dependencies only (no torch, no tests).
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-compile . \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

# Stage 2: the runtime, as a non-root user, with the model repository baked in at /models
# (mount another repository read-only over it, or point NEUROSERVE_REPOSITORY elsewhere).
FROM python:3.11-slim
RUN groupadd --system --gid 10001 neuroserve \
 && useradd --system --uid 10001 --gid neuroserve --no-create-home --shell /usr/sbin/nologin neuroserve \
 && mkdir /data && chown 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
COPY models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NEUROSERVE_REPOSITORY=/models \
    NEUROSERVE_GALLERY_PATH=/data/gallery.sqlite3 \
    NEUROSERVE_HOST=0.0.0.0 \
    NEUROSERVE_PORT=8000
USER 10001:10001
EXPOSE 8000
# SIGTERM: stop accepting, answer everything accepted (queued batches too), then exit.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status != 200)"]
CMD ["neuroserve", "serve"]
