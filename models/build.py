"""Write every fixture model to `<out>/<name>.onnx`; same bytes on every run.

Usage: python models/build.py [--out DIR]   (default: the folder of this script)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Run as a plain script, the repo root is not on sys.path; add it so `models` imports.
if __package__ in (None, ""):
    sys.path.insert(0, str(HERE.parent))

from models.fixtures import FIXTURES  # noqa: E402

logger = logging.getLogger("models.build")


def build_all(out_dir: Path) -> list[Path]:
    """Build every fixture with its default seed and write it; return the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, build in FIXTURES.items():
        path = out_dir / f"{name}.onnx"
        path.write_bytes(build().SerializeToString())
        logger.info("wrote %s (%d bytes)", path, path.stat().st_size)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write every fixture model to <out>/<name>.onnx.")
    parser.add_argument(
        "--out", type=Path, default=HERE, help="output folder (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_all(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
