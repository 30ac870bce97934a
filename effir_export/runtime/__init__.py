"""Inference backends for exported models (ONNX Runtime)."""
