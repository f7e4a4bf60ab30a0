"""Small seeded ONNX fixture models, built in code (see `models.fixtures`)."""
