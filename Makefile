# Flotilla: `make demo` and `make test` each do their own set-up on a fresh Debian.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# A real Home Assistant core for the bridge's tests. 2024.3.3 is the newest release for
# Python 3.11; it pins pydantic 1 and paho-mqtt 1.6.1, so it has its own venv. janus is
# what its file_upload integration (an MQTT dependency) would pip-install at start-up.
HA_VENV := .venv-ha
HA_STAMP := $(HA_VENV)/.installed-stamp
HA_PACKAGES := homeassistant==2024.3.3 paho-mqtt==1.6.1 janus==1.0.0
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test lint typecheck fuzz bench clean

setup: system-deps $(STAMP) $(HA_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# setuptools' notice about editable installs is not for our users: hide it.
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

$(HA_STAMP):
	$(PYTHON) -m venv $(HA_VENV)
	$(HA_VENV)/bin/python -m pip install -q --upgrade pip
	$(HA_VENV)/bin/python -m pip install -q $(HA_PACKAGES)
	touch $(HA_STAMP)

# mosquitto (the broker the tests and demo start), nats-server (the clustered broker the
# cross-broker tests start), nix-instantiate (parses nixos/*.nix) and chromium (the web
# dashboard's tests drive it with Playwright; never `playwright install`).
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v mosquitto_passwd >/dev/null 2>&1 || missing="$$missing mosquitto"; \
	command -v mosquitto_pub >/dev/null 2>&1 || missing="$$missing mosquitto-clients"; \
	command -v nats-server >/dev/null 2>&1 || missing="$$missing nats-server"; \
	command -v nix-instantiate >/dev/null 2>&1 || missing="$$missing nix-bin"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing system packages:$$missing"; \
	    echo "install them with: sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi; \
	if [ ! -d /nix/var/nix/db ] && [ "$$(id -u)" = 0 ]; then \
	  echo "initialising the single-user Nix store (nix-store --init)"; \
	  NIX_REMOTE= nix-store --init; \
	fi

demo: setup
	$(VENV)/bin/fleetctl demo --hosts 12

lint: setup
	$(VENV)/bin/ruff check protocol client controller tests bench

typecheck: setup
	$(VENV)/bin/mypy

test: setup lint typecheck
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Hypothesis profile `fuzz` (2,000 examples per property, >20,000 in all; registered in
# tests/test_fuzz.py). Needs no broker, so only the Python set-up. Failing examples are
# kept in .hypothesis/ and replayed first next time.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(VENV)/bin/pytest -q -p no:cacheprovider tests/test_fuzz.py

bench: setup
	$(PY) bench/fanout.py 1000

clean:
	rm -rf $(VENV) $(HA_VENV) .mypy_cache .ruff_cache .pytest_cache
