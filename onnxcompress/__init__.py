"""onnxcompress: make trained ONNX models smaller and faster after training, measured.

from onnxcompress import compress, CompressOptions
result = compress("model.onnx", CompressOptions(passes=["fold_bn"]))
"""

from onnxcompress.errors import CompressError

__all__ = ["CompressError", "CompressOptions", "CompressResult", "compress"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import onnxcompress.io` should not pay for onnxruntime and the passes.
    if name in ("CompressOptions", "CompressResult", "compress"):
        from onnxcompress import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'onnxcompress' has no attribute {name!r}")
