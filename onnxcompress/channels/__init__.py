"""Coupled-channel structured pruning: channel groups and their rules, importance, budget,
surgery and refit."""
