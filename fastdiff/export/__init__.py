"""ONNX deployment: export (onnx.py, needs torch), a torch-free sampler (runtime.py: NumPy + onnxruntime)
and INT8 quantization (quantize.py: imports without torch, but its calibration data and paired measure need it).
Import the submodules directly; this package imports nothing."""
