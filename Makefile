# The two commands of the quick start. Both bootstrap themselves from a fresh clone on Debian with Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.midgate-installed
# torch is installed first and pinned: an unpinned torch makes pip fetch a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: demo test lint typecheck pytest mosquitto chromium deploy-tools bench clean

# The demo runs the Mosquitto `make test` installs; only where it cannot be installed, an embedded broker (amqtt, in a
# venv of its own so that its dependencies never touch midgate's), and the demo says so.
EMBEDDED_BROKER := $(VENV)/embedded-broker

demo: $(STAMP)
	@if $(MAKE) --no-print-directory mosquitto; then \
		$(BIN)/midgate demo; \
	else \
		echo "Mosquitto cannot be installed here: the demo runs an embedded broker (amqtt) instead"; \
		[ -x $(EMBEDDED_BROKER)/bin/amqtt ] || { $(PYTHON) -m venv $(EMBEDDED_BROKER) && \
			$(EMBEDDED_BROKER)/bin/pip install --quiet amqtt; } && \
		PATH="$(CURDIR)/$(EMBEDDED_BROKER)/bin:$$PATH" $(BIN)/midgate demo --broker embedded; \
	fi

test: $(STAMP) mosquitto chromium deploy-tools lint typecheck pytest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then :; \
	elif [ "$$(id -u)" = "0" ]; then \
		echo "installing mosquitto (the messaging tests run against a real broker)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; \
	else \
		echo "mosquitto is missing and this is not root: run 'sudo apt-get install mosquitto' and retry" >&2; exit 1; \
	fi

# The browser tests of the dashboard, job report and member page (tests/test_dashboard_browser.py) drive Debian's
# Chromium through its chromedriver with Selenium; without root they skip and say so.
chromium:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = "0" ]; then \
		echo "installing chromium and chromium-driver (the browser tests run in a real Chromium)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "chromium is missing and this is not root: the browser tests will skip ('sudo apt-get install chromium chromium-driver' runs them)" >&2; \
	fi

# The Raspberry Pi installer's tests (tests/test_deploy_files.py, tests/test_pi_install_e2e.py): shellcheck,
# systemd-analyze verify, and a throwaway Debian root built with debootstrap; without root they skip and say so.
deploy-tools:
	@if command -v shellcheck >/dev/null 2>&1 && command -v systemd-analyze >/dev/null 2>&1 && \
		{ command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ]; }; then :; \
	elif [ "$$(id -u)" = "0" ]; then \
		echo "installing shellcheck, systemd and debootstrap (the Raspberry Pi installer's tests)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck systemd debootstrap >/dev/null; \
	else \
		echo "shellcheck, systemd-analyze or debootstrap is missing and this is not root: the installer's tests will skip ('sudo apt-get install shellcheck systemd debootstrap' runs them)" >&2; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy protocol runtime coordinator

# Two workers (pytest-xdist) by default, as many as CI's cores; PYTEST_WORKERS=0 runs the suite in one process.
PYTEST_WORKERS ?= 2

pytest: $(STAMP)
	PATH="$(CURDIR)/$(BIN):/usr/sbin:$$PATH" $(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

bench: $(STAMP)
	@for b in bench/*_bench.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
