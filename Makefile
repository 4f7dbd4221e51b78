# The README's commands. `make serve` is the whole product on a fresh machine; `make test` the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= train,serve,test
DATASET ?= digits
RUN_DIR ?= runs/$(DATASET)
MODEL_DIR ?= models/$(DATASET)
PORT ?= 8000

.PHONY: setup test lint train export serve clean

setup: $(VENV)/.installed

# Re-installs when the dependency files change. torch is pinned in constraints.txt.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest

# Train the bundled default when no finished run is there (idempotent).
$(RUN_DIR)/metrics.json: | setup
	$(BIN)/hff-train --dataset $(DATASET) --out $(RUN_DIR) $(if $(wildcard $(RUN_DIR)/train_state.pt),--resume,)

train: $(RUN_DIR)/metrics.json

# Export the run into the model dir when no manifest is there yet (idempotent; hff-export
# verifies against torch and writes into a temp dir, so a failed export leaves nothing behind).
$(MODEL_DIR)/manifest.json: | train
	$(BIN)/hff-export $(RUN_DIR) --out $(MODEL_DIR)

export: $(MODEL_DIR)/manifest.json

clean:
	rm -rf runs models
