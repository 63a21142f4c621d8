# Two commands do everything on a fresh machine:
#   make demo   creates .venv, installs pinned deps, runs the whole DAG once on configs/demo.yaml
#   make test   same venv, the whole test suite (starts its own Ray head, MLflow and S3 servers)

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt

export AIRFLOW_HOME := $(CURDIR)/.local/airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install browser demo test test-unit lint format mlflow-ui ray-head ray-stop airflow-ui bench gpu-check gpu-wheels lock clean

install: $(STAMP)

# torch first: deepspeed is an sdist that builds against the installed torch, without build
# isolation (an isolated build would fetch an unpinned, multi-GB CUDA torch). Last, DeepSpeed's
# CPU Adam (optimizer offload) and shared-memory collectives ops, which it JIT-builds on first
# use (a minute or more each on two cores): built once here so that the first training job and
# its timeouts do not pay for them,
# in the trainer's environment (CPU accelerator, this venv's ninja first on PATH).
$(STAMP): requirements/cpu.txt requirements/dev.txt requirements/constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check pip==25.3 setuptools==84.2.1 wheel
	$(PIP) torch==2.13.0
	$(PIP) --no-build-isolation -r requirements/dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	DS_ACCELERATOR=cpu PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -c \
		"from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(); \
		from deepspeed.accelerator import get_accelerator; \
		get_accelerator().create_op_builder('ShareMemCommBuilder').load()" > /dev/null
	touch $@

$(AIRFLOW_HOME)/airflow.db: | $(STAMP)
	mkdir -p $(AIRFLOW_HOME)
	$(VENV)/bin/airflow db migrate > $(AIRFLOW_HOME)/migrate.log

# `pipeline demo` migrates .local/airflow itself; the tests migrate their own .local/airflow-test-*.
demo: $(STAMP)
	$(VENV)/bin/pipeline demo

# The browser test (the second run of tests/e2e/test_dag_e2e.py) drives Debian's chromium through Playwright;
# nothing downloads a browser. Installed here when missing (as root, else with sudo).
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }
	@test -x $(CHROMIUM) || { echo "$(CHROMIUM) is still missing after installing chromium"; exit 1; }

# Two pytest-xdist workers, each taking whole files (module fixtures such as the e2e DAG run are
# built once): much of the suite waits on one core (imports, in-process training, servers
# starting), so two lanes fill the CI's two cores. Files go out in collection order (not
# largest first): the end-to-end files start first, and in-process ray.init modules run before
# the ones that leave DeepSpeed engines mapped. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP) browser
	PIPELINE_CHROMIUM=$(CHROMIUM) $(VENV)/bin/pytest -ra --durations=40 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-unit: $(STAMP)
	$(VENV)/bin/pytest -ra tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.local/mlflow/mlflow.db --port 5000

# A long-lived local Ray head for the Airflow UI (the demo and tests start private ones).
# Token auth on: the token is generated once into ~/.ray/auth_token, where the hook finds it.
ray-head: $(STAMP)
	$(VENV)/bin/ray get-auth-token --generate > /dev/null
	RAY_AUTH_MODE=token PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/ray start --head \
		--dashboard-host=127.0.0.1 --dashboard-port=8265 --num-cpus=4 --disable-usage-stats \
		--resources='{"driver": 8}'

ray-stop: $(STAMP)
	$(VENV)/bin/ray stop

# standalone starts its components as `airflow ...` subprocesses, so the venv must be on PATH.
# Triggered runs submit to the head of `make ray-head` unless AIRFLOW_CONN_RAY_DEFAULT says otherwise.
airflow-ui: $(STAMP) $(AIRFLOW_HOME)/airflow.db
	AIRFLOW_CONN_RAY_DEFAULT=$${AIRFLOW_CONN_RAY_DEFAULT:-http://127.0.0.1:8265} \
		PATH=$(CURDIR)/$(VENV)/bin:$$PATH airflow standalone

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

# One call on a GPU machine with no internet: installs what it lacks from .whl/ (see gpu-wheels),
# then resumes, checks packed attention and measures MFU (benchmarks/README.md). No venv there.
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

# Here, with PyPI: fills .whl/ (gitignored, ~35 MB) with the wheels gpu-check installs there.
gpu-wheels: $(STAMP)
	GPU_CHECK_PYTHON=$(PY) bash benchmarks/gpu_check.sh --wheels

lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | sed -e 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements/constraints.txt

clean:
	rm -rf .local
