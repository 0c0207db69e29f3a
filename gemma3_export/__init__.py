"""gemma3-export: Gemma 3 to ExecuTorch, Core ML and ONNX, quantized and measured."""

__version__ = "0.1.0"
