# Two entry points for a fresh clone:
#   make repro   install everything into .venv, then run the whole pipeline (dvc repro)
#   make test    install everything into .venv, then run the tests
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install repro test

# llama-cpp-python is built from its pinned source (it vendors llama.cpp): a C/C++ compiler is
# needed (CMake too, which pip fetches when the machine has none). pip keeps the built wheel in
# its cache, so a second install does not rebuild. The CPU build skips the multimodal library.
# On x86-64 it is built without Intel AMX: llama.cpp's native build uses AMX on CPUs that have it
# (Sapphire Rapids and later), and its AMX matrix product crashed (SIGSEGV) on the first token of any
# q8_0 file on such a 2-core machine (ggml-org/llama.cpp#20824); AVX-512 and VNNI stay on.
# (A compiler too old to know these flags knows no AMX either: then none are passed.)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
NO_AMX_ARGS = $(if $(filter x86_64 amd64,$(shell uname -m)),$(shell echo | c++ $(NO_AMX) -x c++ -E - >/dev/null 2>&1 && echo "-DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'"))
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF $(NO_AMX_ARGS)

$(BIN)/.installed: pyproject.toml constraints.txt
	@command -v c++ >/dev/null || { echo "error: building llama.cpp (llama-cpp-python) needs a C++ compiler: install g++ (Debian: apt install build-essential)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/.installed

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

# Two pytest workers, each file on one (module fixtures such as the e2e project are built once):
# much of the suite waits on interpreter start-up and DVC rather than computing.
test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest -q -n 2 --dist loadfile

# The experiment table with the columns that matter.
EXP_COLUMNS := Experiment|Created|lora\.rank|lora\.alpha|quantization\.load_in|training\.learning_rate|training\.max_steps|^eval_loss|base\.perplexity|finetuned\.perplexity|merged\.max_logit_diff|tokens_per_second
.PHONY: exps
exps: install
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc exp show --no-pager --md --drop '.*' --keep '$(EXP_COLUMNS)'

# dvc metrics diff without the rows every run changes (each phase's seconds, tokens/s, generation speed, memory);
# REV=... to compare the workspace with another revision than HEAD.
REV ?= HEAD
.PHONY: diff
diff: install
	@PATH="$(CURDIR)/$(BIN):$$PATH" dvc metrics diff --md $(REV) | grep -v -E '^\| [^|]*\| [^|]*(second|memory|peak_|speed\.|buffers_mb|gpu_gb)[^|]*\|' || true
