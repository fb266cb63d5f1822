"""The fastdiff ONNX file format: the metadata_props keys an exported denoiser carries (written by
fastdiff.onnx_export, read by the torch-free fastdiff.export.runtime and by fastdiff.runtimes). Torch-free."""
FORMAT, FORMAT_VERSION = "fastdiff-denoiser", "1"
KEY_FORMAT, KEY_FORMAT_VERSION, KEY_VERSION = "fastdiff.format", "fastdiff.format_version", "fastdiff.version"
KEY_SCHEDULE, KEY_SHAPE, KEY_CLASSES = "fastdiff.schedule", "fastdiff.image_shape", "fastdiff.num_classes"
KEY_PRECISION, KEY_MODEL = "fastdiff.precision", "fastdiff.model_config"
KEY_WEIGHTS = "fastdiff.weights_sha256"  # optional: sha256 of the exported state_dict (onnx_export.weights_digest)
REQUIRED_KEYS = (KEY_FORMAT_VERSION, KEY_VERSION, KEY_SCHEDULE, KEY_SHAPE, KEY_CLASSES)
