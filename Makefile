# `make run` serves the hub on the embedded SQLite default; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint docs format clean bench screenshots

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	@# The project itself, editable: it declares the `routes` CLI group (see pyproject.toml).
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/flask --app hub init
	@echo "Open http://$${HUB_HOST:-127.0.0.1}:$${HUB_PORT:-8000}/ : the dashboard's sign-in page."
	@echo "Sign in with an admin key: the one printed above on the first run, or a new one from"
	@echo "    $(BIN)/flask --app hub keys create --admin NAME"
	$(BIN)/gunicorn -c gunicorn.conf.py "hub:create_app()"

# Two passes: every test but the timing ones on $(TEST_WORKERS) processes (a test file stays on
# one process, with its servers), then the tests marked `serial` (they assert latency, rates or
# fairness in seconds) alone, so no neighbour's load can fail them. Exit status 5 is "this pass
# selected nothing" (PYTEST_ARGS naming one file), not a failure. Three processes on two cores:
# most tests wait on servers and subprocesses (1,636 s of tests ran in 456 s on four, but four
# left too little margin for tests that wait a few seconds for a server).
TEST_WORKERS ?= 3
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not serial" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/python -m pytest -p no:xdist -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@# The direction of imports between the layers (pyproject.toml [tool.importlinter]).
	$(BIN)/lint-imports --no-cache
	@# Every model change has its migration: migrate scratch databases (SQLite, and PostgreSQL
	@# when HUB_TEST_DATABASE_URL is set), then compare each with the models (`alembic check`).
	$(BIN)/python -m tests.schema_check
	@# The docs site, warnings as errors (a broken link between pages fails it).
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The docs site from docs/ (mkdocs.yml) into site/; open site/index.html.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The hub beside bare Flask under wrk; PostgreSQL rows too with HUB_BENCH_DATABASE_URL set.
bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || { echo "make bench needs wrk: apt-get install wrk"; exit 1; }
	@test -x /usr/sbin/nginx || command -v nginx >/dev/null 2>&1 || { echo "make bench needs nginx (the http drains' receiver): apt-get install nginx-light"; exit 1; }
	$(BIN)/python -m bench.throughput $(BENCH_ARGS)

# The dashboard screenshots of docs/admin.md, taken by the browser tests (Debian's chromium).
screenshots: $(STAMP)
	HUB_TEST_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest tests/test_dashboard_browser.py

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
