# qtool: `make demo` (install, then convert, inspect and run the bundled sample) and `make test`.
HERE := $(dir $(abspath $(lastword $(MAKEFILE_LIST))))
PYTHON ?= python3
PIP := $(PYTHON) -m pip
QTOOL := $(PYTHON) -m qtool
SAMPLE := examples/stories260K
OUT := build

.PHONY: install install-dev test demo bench fuzz clean

install:  ## qtool and its runtime dependencies
	$(PIP) install -q -e .

# llama.cpp is built for this CPU but without AMX: CPUs may report AMX that their (virtual) machine does not let a
# program use (SIGILL in ggml's AMX matrix product). GCC keeps explicit -mno-* over -march=native whatever the order.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'

install-dev:  ## plus the test tools and the reference oracles (llama.cpp built from source, torch CPU, transformers)
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q -e '.[test,reference]'

# one pytest worker per core, a test file to a worker (its module fixtures built once): on a fresh machine most
# of the suite's time is numba compiling kernels, which runs on one core per process (2 cores, AVX2: 29 -> 13 min)
test: install-dev
	$(PYTHON) -m pytest -q -n auto --dist loadfile tests

demo: install
	@mkdir -p $(OUT)
	$(QTOOL) convert $(SAMPLE) -o $(OUT)/stories260K.Q8_0.gguf --type Q8_0
	$(QTOOL) inspect $(OUT)/stories260K.Q8_0.gguf
	$(QTOOL) inspect $(SAMPLE)
	$(QTOOL) run $(OUT)/stories260K.Q8_0.gguf -p "Once upon a time" --temp 0 -n 80
	$(QTOOL) perplexity $(OUT)/stories260K.Q8_0.gguf --text examples/tinystories_style_eval.txt --ctx 256

bench: install-dev
	$(PYTHON) scripts/bench_convert.py

# the long fuzz runs (a short deterministic one is part of `make test`): FUZZ_GGUF byte mutants of the sample's
# F32 file through the reader, inspect and run; FUZZ_CKPT mutated checkpoint folders through convert; every bad
# option of tests/fuzz/option_mutants.py and every hostile chat template of tests/fuzz/template_fuzz.py
FUZZ_GGUF ?= 100000
FUZZ_CKPT ?= 1000
fuzz: install-dev
	@mkdir -p $(OUT)
	$(QTOOL) convert $(SAMPLE) -o $(OUT)/stories260K.F32.gguf --type F32 --quiet
	$(PYTHON) tests/fuzz/gguf_fuzz.py $(OUT)/stories260K.F32.gguf $(FUZZ_GGUF)
	$(PYTHON) tests/fuzz/checkpoint_fuzz.py $(FUZZ_CKPT)
	$(PYTHON) tests/fuzz/option_fuzz.py
	$(PYTHON) tests/fuzz/template_fuzz.py

clean:
	rm -rf $(OUT) bench-out

# Batch conversion: for a checkpoint folder models/foo/ (config.json + safetensors),
#   make -j4 models/foo.Q4_K_M.gguf models/foo.Q8_0.gguf models/bar.Q4_K_M.gguf
# converts each in its own process; outputs appear only when complete, and a failure stops make with its error.
# the --type names, read from formats/constants.py's FILE_TYPES (stdlib only: no install, no numba compile needed)
QTYPES := $(shell $(PYTHON) -c "import runpy; print(*runpy.run_path('$(HERE)formats/constants.py')['FILE_TYPES'])")
define QTYPE_RULE
%.$(1).gguf: %/config.json
	$$(QTOOL) convert $$* -o $$@ --type $(1) --quiet
endef
$(foreach t,$(QTYPES),$(eval $(call QTYPE_RULE,$(t))))
