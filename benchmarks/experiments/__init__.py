"""One-off investigations kept for the record: each wrote a results file that docs/results.md
cites. Not part of the suite and not tested in CI; they may need updating before they run again."""
