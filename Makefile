PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test install clean

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The tests also need torch (the torch trunk flavour's weights files) and pytest-xdist; the demo does not.
$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m sharpmask_tf.demo

# Two worker processes (more on a machine with more cores, at most 4), each test file on one of
# them so that its module fixtures are built once: 1.6x faster on 2 cores than one process.
test: $(TEST_STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile tests

clean:
	rm -rf $(VENV) demo_output
