# Two commands do all set-up: `make demo` and `make test` (see README.md).
VENV   ?= .venv
PY     := $(VENV)/bin/python
FD     := $(VENV)/bin/fastdiff
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.14.1
RUN    ?= runs/digits
OUT    ?= samples
DEMO_STEPS ?= 1200

.PHONY: install demo test bench clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" numpy ninja pybind11 setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	$(FD) info
	touch $@

install: $(STAMP)

# Train on the bundled digits (skip with PRETRAINED=1 to use the shipped model), then sample.
demo: $(STAMP)
ifeq ($(PRETRAINED),1)
	$(eval CKPT := fastdiff/assets/digits)
else
	$(eval CKPT := $(RUN))
	rm -rf $(RUN)
	$(FD) train --data digits --preset digits --steps $(DEMO_STEPS) --out $(RUN)
endif
	$(FD) sample --ckpt $(CKPT) --sampler ddpm --steps 1000 --n 64 --seed 0 --out $(OUT)
	$(FD) sample --ckpt $(CKPT) --sampler ddim --steps 50 --eta 0 --n 64 --seed 0 --out $(OUT)
	$(FD) export --ckpt $(CKPT) --out $(OUT)/model.onnx
	$(FD) quantize --onnx $(OUT)/model.onnx --out $(OUT)/model.int8.onnx
	$(FD) sample --onnx $(OUT)/model.onnx --sampler ddim --steps 50 --n 64 --seed 0 --out $(OUT) --name onnx-ddim-50
	$(FD) sample --onnx $(OUT)/model.int8.onnx --sampler ddim --steps 50 --n 64 --seed 0 --out $(OUT) --name int8-ddim-50
	@echo "Grids: $(OUT)/{ddpm-1000,ddim-50,onnx-ddim-50,int8-ddim-50}_grid.png; INT8 report: $(OUT)/model.int8.onnx.report.md"

test: $(STAMP)
	FASTDIFF_REQUIRE_EXTENSION=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(FD) bench --quick

clean:
	rm -rf build *.egg-info fastdiff/_C*.so $(RUN) $(OUT)
