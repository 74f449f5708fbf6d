# Thin wrapper: everything real lives in scripts/setup and CMakeLists.txt.
#   make serve   set up, build, and run the daemon on the default model (127.0.0.1:8080)
#   make test    set up, build (plain and sanitized), and run every test
#   make docker  build the container image and check that it answers /ready (tools/docker.sh)
MODEL ?= models/SmolLM2-135M-Instruct.Q4_1.gguf
VENV  ?= $(HOME)/.cache/ebb/venv
JOBS  ?= $(shell nproc)

.PHONY: setup build build-asan serve test unit test-asan pytest docker clean

setup:
	@scripts/setup

build: setup
	@cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
	@cmake --build build -j $(JOBS)

build-asan: setup
	@cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEBB_SANITIZE=ON -DEBB_CUDA=OFF >/dev/null
	@cmake --build build-asan -j $(JOBS)

# The daemon with conf/ebb.json; any EBB_* variable or extra flags in ARGS override it.
serve: build
	./build/ebb serve --config conf/ebb.json $(ARGS)

# Every step uses every core: ctest starts the long unit tests first (their
# COST in CMakeLists.txt) and pytest runs a file per worker (pytest-xdist),
# each daemon on a port of its own. On the 2-core machines CI runs on, a clean
# clone's `bash .ci/run` took 27 minutes (setup and builds 3, plain ctest 3,
# sanitized ctest 8, pytest 14), under the 30-minute aim with little to spare.
test: build build-asan
	cd build && ctest -j $(JOBS) --output-on-failure
	cd build-asan && ctest -j $(JOBS) --output-on-failure
	EBB_BIN=$(CURDIR)/build/ebb EBB_BIN_ASAN=$(CURDIR)/build-asan/ebb $(VENV)/bin/python -m pytest -q -n $(JOBS) --dist loadfile tests

docker:
	tools/docker.sh

clean:
	rm -rf build build-asan
