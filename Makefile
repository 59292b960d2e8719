# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: demo test install install-dev browser clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/foundry demo --out demo-out --overwrite

# The playground's tests drive a real headless Chromium: Debian's chromium and chromium-driver, installed
# here where they are missing and apt-get may run (as root, or through sudo without a password); elsewhere
# those tests are skipped and pytest's summary (-rs) says why.
browser:
	@if command -v chromedriver >/dev/null && (command -v chromium || command -v chromium-browser) >/dev/null; then :; \
	elif ! command -v apt-get >/dev/null; then echo "browser tests will be skipped: no chromium and no apt-get"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi; \
	  if [ "$$sudo" = none ]; then echo "browser tests will be skipped: installing chromium needs root"; \
	  else echo "installing chromium and chromium-driver for the browser tests (log: $(VENV)/apt-chromium.log)"; \
	    ($$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q chromium chromium-driver) \
	      > $(VENV)/apt-chromium.log 2>&1 || echo "browser tests will be skipped: apt-get failed (see $(VENV)/apt-chromium.log)"; \
	  fi; \
	fi

test: install-dev browser
	$(PY) -m pytest tests -rs --durations=25

clean:
	rm -rf $(VENV) demo-out demo-sft-out examples-out runs test-artifacts
