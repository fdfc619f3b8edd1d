# ota-gateway: config, policies, certificates (and a directory origin, if used) are mounted as volumes.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /opt/ota-gateway
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-compile . \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin ota \
 && mkdir -p /etc/ota-gateway /var/lib/ota-gateway \
 && chown ota /var/lib/ota-gateway

USER ota
WORKDIR /etc/ota-gateway
VOLUME ["/etc/ota-gateway", "/var/lib/ota-gateway"]
EXPOSE 8443 9901

HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('OTA_ADMIN_PORT', '9901') + '/healthz', timeout=2)"]

ENTRYPOINT ["ota-gateway", "serve"]
CMD ["--config", "/etc/ota-gateway/gateway.yaml"]
