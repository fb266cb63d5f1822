"""The fastdiff ONNX file format keys (defined in fastdiff.onnx_format, a lower layer the engine's runtimes
share; re-exported here for the export package)."""
from ..onnx_format import (FORMAT, FORMAT_VERSION, KEY_CLASSES, KEY_FORMAT, KEY_FORMAT_VERSION,  # noqa: F401
                           KEY_MODEL, KEY_PRECISION, KEY_SCHEDULE, KEY_SHAPE, KEY_VERSION, REQUIRED_KEYS)
