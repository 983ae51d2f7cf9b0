"""Operator fusions: -O2 portable (standard ONNX ops) and -O3 onnxruntime contrib ops."""
