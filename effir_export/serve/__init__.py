"""Serving: a Triton Inference Server model repository from an ONNX export, and a local tritonserver."""
