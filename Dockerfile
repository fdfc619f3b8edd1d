# syntax=docker/dockerfile:1
# ota-gateway as a non-root container (uid/gid 10001). README "Deploy > Container" shows the run from
# `docker build` to a verified download. The image holds the installed wheel and deploy/container/gateway.yaml;
# certificates, policies and the origin are mounted read-only; /var/lib/ota-gateway is the state volume.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY --from=build /wheels /wheels
RUN pip install --no-compile /wheels/*.whl \
 && rm -rf /wheels \
 && groupadd --system --gid 10001 ota-gateway \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin ota-gateway \
 && install -d -o root -g root -m 0755 /etc/ota-gateway /etc/ota-gateway/certs /etc/ota-gateway/policies \
      /srv/ota-gateway /srv/ota-gateway/origin \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/ota-gateway
COPY --chown=root:root --chmod=0644 deploy/container/gateway.yaml /etc/ota-gateway/gateway.yaml

USER 10001:10001
WORKDIR /var/lib/ota-gateway
VOLUME ["/var/lib/ota-gateway"]
EXPOSE 8443 9901

# works with the admin listener in either mode: plain HTTP, or mTLS with admin.tls.health_cert/health_key
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["ota-gateway", "health", "--config", "/etc/ota-gateway/gateway.yaml"]

ENTRYPOINT ["ota-gateway"]
CMD ["serve", "--config", "/etc/ota-gateway/gateway.yaml"]
