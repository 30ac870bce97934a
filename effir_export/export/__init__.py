"""Deployment exports: ONNX graphs with pooling inside (fp32, fp16/bf16, 4-bit weight-only) and the
mandatory numeric check of every export against the PyTorch model."""
