"""neuroserve: a model server for ONNX models with dynamic batching."""

__version__ = "0.1.0"
