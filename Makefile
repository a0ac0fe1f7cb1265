# flaap-mq: every target installs what it needs first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
BROKER_URL ?= $(FLAAP_MQ_BROKER_URL)

.PHONY: install demo test test-faults test-slow test-systemd lint protos bench clean

install: $(STAMP)

# The lock holds every package at an exact version and is installed with
# --no-deps: TFF 0.87.0's own metadata pins a jaxlib that is not on the index
# (see docs/install.md), so pip must not re-resolve it. The editable install
# keeps setuptools' `compat` mode (the repository root on sys.path) without
# the notice, printed on every install, that the mode is transitional; the
# import check without TensorFlow's start-up chatter (a failure still shows).
# pip unpacks and byte-compiles one file at a time, and TensorFlow's wheel is
# half of the lock: so TensorFlow is installed beside the rest, and both are
# byte-compiled afterwards on every core (72 s for the lock here, 34 s so).
# Compiled they must be: where PYTHONDONTWRITEBYTECODE is set, nothing is
# cached at import, and each process that imports TFF would spend 7 s more.
# As pip does, a file that does not compile is skipped (vizier ships one).
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"
	grep -x 'tensorflow==.*' requirements.lock > $(VENV)/lock-tensorflow.txt
	grep -vx 'tensorflow==.*' requirements.lock > $(VENV)/lock-rest.txt
	$(PY) -m pip install --quiet --no-deps --no-compile -r $(VENV)/lock-tensorflow.txt & \
	  tensorflow=$$!; \
	  $(PY) -m pip install --quiet --no-deps --no-compile -r $(VENV)/lock-rest.txt; \
	  rest=$$?; \
	  wait $$tensorflow && test $$rest -eq 0
	$(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true
	PYTHONWARNINGS="ignore:Compat editable installs" \
	  $(PY) -m pip install --quiet --no-deps -e . --config-settings editable_mode=compat
	TF_CPP_MIN_LOG_LEVEL=3 $(PY) -c "import tensorflow_federated, pika, flaap_mq"
	touch $(STAMP)

demo: install
	$(VENV)/bin/flaap-mq demo

# Most tests wait (on brokers, executors, subprocesses), so six pytest-xdist
# workers share the 2 cores (four left them idle a fifth of the time; eight
# were no faster); --dist loadfile keeps a module's tests, and its
# module-scoped fleets and broker nodes, in one worker, and the longest modules
# are handed out first (tests/conftest.py), not by test count. Tests marked
# serial push a broker to its alarms and run alone, first: their run writes the
# bytecode caches, which the six workers then read instead of each writing them
# at once. Both runs run, so a failure in the first does not hide the second's.
TEST_WORKERS ?= 6
TEST_MARKS := not faults and not slow
# Where PYTHONDONTWRITEBYTECODE is set (this machine sets it), nothing is
# cached at import: every pytest process rewrote and compiled all 190 test
# modules again (4 of its 9 CPU-seconds of collection, in each of seven
# processes), and flaap_mq's modules too. The test targets let pytest's
# collection write the caches (to __pycache__/, which git ignores), and
# nothing after it (tests/conftest.py says why).
test test-faults test-slow test-systemd: export PYTHONDONTWRITEBYTECODE =
test: install
	$(PY) -m pytest tests -m "$(TEST_MARKS) and serial"; \
	  serial=$$?; \
	  $(PY) -m pytest tests -m "$(TEST_MARKS) and not serial" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder; \
	  parallel=$$?; \
	  test $$parallel -eq 0 -a $$serial -eq 0

# --tb=native: pytest's own traceback formatting crashed (INTERNALERROR, an
# AST recursion error in Python 3.11) on a failed fault test here, hiding it.
test-faults: install
	$(PY) -m pytest tests -m faults --tb=native

test-slow: install
	$(PY) -m pytest tests -m slow

# Boots the host's systemd as PID 1 of private namespaces (root, cgroup2) and
# starts the shipped worker unit in it: the hardening, verified for real.
test-systemd: install
	FLAAP_MQ_TEST_LIVE_SYSTEMD=1 $(PY) -m pytest tests/security/test_systemd_unit_live.py

lint: install
	$(VENV)/bin/ruff check flaap_mq tests bench
	$(VENV)/bin/ruff format --check flaap_mq tests bench

bench: install
	$(PY) -m bench.run

# Regenerates the envelope code and the worker's view of TFF's executor
# messages; the result is committed.
protos: install
	$(eval TMP := $(shell mktemp -d))
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(TMP) --pyi_out=$(TMP) \
	  protos/flaap_mq/v1/task.proto protos/flaap_mq/v1/tff_executor.proto
	cp $(TMP)/flaap_mq/v1/*_pb2.py $(TMP)/flaap_mq/v1/*_pb2.pyi flaap_mq/protocol/v1/
	rm -rf $(TMP)

clean:
	rm -rf $(VENV) build *.egg-info
