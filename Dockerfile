# The Plateforme gateway image (also runs `plateforme sim` for the compose dev profile).
#
#   docker build -t plateforme .
#   docker run -p 8000:8000 -e PLATEFORME_ADMIN_TOKEN=... \
#     -v $PWD/deploy/compose/config.yaml:/etc/plateforme/config.yaml:ro plateforme
#
# Two stages: dependencies and the package are installed into a virtualenv in the builder, and
# only that virtualenv is copied into the runtime image (no pip cache, no build tools). No dev
# extras and no SkyPilot: the image serves; provisioning GPUs runs from an operator's machine.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so a source change does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps))" \
 && pip install -r /tmp/requirements.txt
COPY gateway/ gateway/
COPY deploy/ deploy/
RUN pip install --no-deps . && plateforme --help >/dev/null

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PLATEFORME_LOG_FORMAT=json \
    PLATEFORME_STATE_DIR=/var/lib/plateforme
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/plateforme plateforme \
 && mkdir -p /etc/plateforme /var/lib/plateforme \
 && chown plateforme:plateforme /var/lib/plateforme
COPY --from=builder /opt/venv /opt/venv
USER plateforme
WORKDIR /home/plateforme
EXPOSE 8000
# Liveness only (/ready also needs the store and a healthy replica per model); python because
# the slim image has no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=3)"]
CMD ["plateforme", "gateway", "serve", "--config", "/etc/plateforme/config.yaml", "--host", "0.0.0.0", "--port", "8000"]
