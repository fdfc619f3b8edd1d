# Two commands on a fresh machine: `make run` and `make test`. Everything they need is installed here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CERTS := certs/dev
ORIGIN := example-origin

.PHONY: run test lint typecheck unit install certs origin system-deps deploy-check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# sslyze, the TLS scanner the tests judge the listener with, in its own venv: it pins an older cryptography.
SCAN_STAMP := .venv-scan/.installed
$(SCAN_STAMP):
	$(PYTHON) -m venv .venv-scan
	.venv-scan/bin/python -m pip install -q --upgrade pip
	.venv-scan/bin/python -m pip install -q 'sslyze>=6.1,<7'
	touch $(SCAN_STAMP)

# Debian tools the tests drive from outside: curl and openssl as clients, promtool (package prometheus), a
# redis-server for the shared state store, systemd-analyze for the unit in deploy/systemd; for the container test
# unshare/nsenter/setpriv and ip (a network namespace, uid 10001) and Debian's python3 with venv (uid 10001
# cannot enter a Python installed under /root).
system-deps:
	@missing=""; for t in curl:curl openssl:openssl promtool:prometheus redis-server:redis-server \
	  systemd-analyze:systemd setpriv:util-linux nsenter:util-linux ip:iproute2; do \
	  command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(CERTS)/ca.pem: | $(STAMP)
	$(BIN)/ota-gateway certs init --dir $(CERTS)

certs: $(CERTS)/ca.pem

$(ORIGIN)/com.example.app/releases.yaml: examples/build-origin.sh $(wildcard examples/webapp/*) | $(STAMP)
	examples/build-origin.sh $(BIN)/ota-gateway $(ORIGIN)

origin: $(ORIGIN)/com.example.app/releases.yaml

run: $(STAMP) certs origin
	@echo
	@echo "Try (in another terminal):"
	@echo "  curl --cacert $(CERTS)/ca.pem --cert $(CERTS)/client.pem --key $(CERTS)/client.key \\"
	@echo "       https://127.0.0.1:8443/bundles/com.example.app/1.1.0.zip -o b.zip"
	@echo "  curl --cacert $(CERTS)/ca.pem https://127.0.0.1:8443/bundles/com.example.app/1.1.0.zip   # no client cert: refused"
	@echo "  $(BIN)/ota-gateway device --gateway https://127.0.0.1:8443 --ca $(CERTS)/ca.pem \\"
	@echo "       --cert $(CERTS)/client.pem --key $(CERTS)/client.key --app com.example.app --version 1.0.0"
	@echo "  curl http://127.0.0.1:9901/metrics"
	@echo
	$(BIN)/ota-gateway serve --config gateway.yaml

lint: $(STAMP)
	$(BIN)/ruff check gateway tests $(wildcard bench)
	$(BIN)/ruff format --check gateway tests $(wildcard bench)

typecheck: $(STAMP)
	$(BIN)/mypy gateway

unit: $(STAMP) $(SCAN_STAMP) system-deps
	$(BIN)/pytest -q -rs -p no:cacheprovider

deploy-check: $(STAMP) system-deps
	$(BIN)/kubectl kustomize deploy/k8s >/dev/null
	promtool check rules deploy/alerts.yml
	promtool test rules deploy/alerts_test.yml
	$(PYTHON) -c "import json; json.load(open('deploy/grafana-dashboard.json'))"

test: lint typecheck deploy-check unit

bench: $(STAMP)
	$(PY) bench/run.py
	$(PY) bench/rollout.py
	$(PY) bench/feature_cost.py
	$(PY) bench/hostile.py
	$(PY) bench/slow_readers.py
	PYTHONPATH=. $(PY) bench/bundle_get_cost.py 300 65536
	PYTHONPATH=. $(PY) bench/zipscan_cost.py
	$(PY) bench/scaling.py
	$(PY) bench/floor.py
	$(PY) bench/stream_floor.py --runs 7

clean:
	rm -rf $(VENV) .venv-scan $(CERTS) $(ORIGIN) state .pytest_cache .mypy_cache .ruff_cache
