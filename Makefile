# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deltaray-installed

.PHONY: demo test install clean

install: $(STAMP)

# torch first, pinned to the CPU build when none is present (a plain `torch` pulls GBs of CUDA).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The main job: a Ray Data batch run over the sample corpus in examples/ on the demo preset.
demo: $(STAMP)
	rm -rf out/demo
	$(VENV)/bin/deltaray batch run examples/jobs/demo.yaml
	$(PY) -m cluster.demo out/demo

# pytest exits 5 when it collects no tests; that is not a failure of the suite. Tests marked
# own_process start their own Ray head and run in a fresh pytest process after the rest (after a
# long run of other Ray tests in the same process, the head's Ray Data actors were cancelled).
PYTEST := $(PY) -m pytest -q -p no:cacheprovider
test: $(STAMP)
	$(PYTEST) --durations=20 -m "not own_process"; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]
	$(PYTEST) -m own_process; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

clean:
	rm -rf $(VENV) .pytest_cache
