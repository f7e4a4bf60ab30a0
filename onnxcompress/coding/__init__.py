"""Entropy coding, SuRP and the .onnxc format: bytes in, bytes out."""
