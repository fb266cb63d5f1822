"""ONNX deployment: export (onnx.py, needs torch), a torch-free sampler (runtime.py: NumPy + onnxruntime)
and INT8 quantization (quantize.py). Import the submodules directly; this package imports nothing."""
