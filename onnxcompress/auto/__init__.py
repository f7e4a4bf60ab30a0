"""The per-layer search behind the auto pass; its methods are handed in by passes/auto.py."""
