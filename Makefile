# Two entry points: `make demo` and `make test`. Both create .venv and install the project first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo_out

.PHONY: demo test test-fast bench clean

$(BIN)/mil: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

## demo: synthetic cohort -> tiles (thumbnails) -> features (one HDF5 per slide)
# Random encoder weights: nothing can be downloaded here. Use --weights imagenet or a MoCo checkpoint on real data.
demo: $(BIN)/mil
	$(BIN)/mil extract synthetic $(DEMO)/slides --n-slides 6 --size 8192 --seed 0
	$(BIN)/mil extract tiles $(DEMO)/slides/manifest.csv --out $(DEMO)/tiles --target-mpp 0.5 --tile-size 224
	$(BIN)/mil extract features $(DEMO)/slides/manifest.csv --coords-dir $(DEMO)/tiles --out $(DEMO)/features \
		--encoder resnet18 --weights none --batch-size 32 --workers 2

## test: the whole default suite (what CI runs)
test: $(BIN)/mil
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/mil
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(BIN)/mil
	$(BIN)/python benchmarks/tiling.py
	$(BIN)/python benchmarks/extract_throughput.py
	$(BIN)/python benchmarks/precision_agreement.py
	$(BIN)/python benchmarks/extract_memory.py

clean:
	rm -rf $(DEMO) build dist *.egg-info
