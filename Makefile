# Every public target sets itself up first: a fresh machine needs only Python 3.11 and make.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
DEEPSPEED_VERSION := 0.19.8
export DS_ACCELERATOR ?= cpu
# DeepSpeed JIT-builds ops with gcc; keep the build cache with the venv so it happens once.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

# Debian's Prometheus for the dashboards test, unpacked here (its system service is never started).
PROMETHEUS := .tools/prometheus/usr/bin/prometheus

.PHONY: setup demo test test-fast bench mlflow-ui clean

setup: $(STAMP)

# torch first (the local CPU wheel), then DeepSpeed without build isolation (its build
# imports torch; isolation would pull a CUDA torch), then the package and test extras.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) -m raytron.demo

test: setup $(PROMETHEUS)
	$(PY) -m pytest tests

# Done once: `apt-get download` (no install, no service) then unpack; apt's lists are fetched if missing.
$(PROMETHEUS):
	mkdir -p .tools
	cd .tools && (apt-get download prometheus || (apt-get update -q && apt-get download prometheus))
	dpkg-deb -x .tools/prometheus_*.deb .tools/prometheus
	rm -f .tools/prometheus_*.deb

test-fast: setup
	$(PY) -m pytest tests -m "not slow"

# bench/bench_mfu.py needs a GPU: run it by hand there (bench/README.md)
bench: setup
	$(PY) bench/bench_model.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_startup.py
	$(PY) bench/bench_prepare.py --mbytes 100
	$(PY) bench/bench_data_wait.py
	$(PY) bench/bench_serve.py

# The MLflow UI over the embedded store that `make demo` and `raytron train` write by default.
mlflow-ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) .pytest_cache
