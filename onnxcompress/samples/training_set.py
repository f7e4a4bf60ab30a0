"""The training set of a run (`--train-data`): .npz files, folders of them, or folders of
images, made into one lazily read source and checked against the model's inputs up front."""

from __future__ import annotations

from pathlib import Path

import onnx

from onnxcompress.calibration import input_dtypes
from onnxcompress.errors import CompressError
from onnxcompress.images import IMAGE_SUFFIXES, Preprocess, image_input, read_labels
from onnxcompress.samples.image_stream import ImageStream
from onnxcompress.samples.npz_stream import NpzStream
from onnxcompress.samples.source import SampleSource, WatchedSource

FLAG = "--train-data"


def watched_training_set(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]],
    paths: list[str | Path],
    preprocess: Preprocess | str | None,
    labels: str | Path | None,
) -> WatchedSource | None:
    """The run's training set (see `training_source`), remembering whether a pass read it;
    None without `paths`."""
    if not paths:
        if labels is not None:
            raise CompressError(f"--train-labels labels {FLAG} images; give {FLAG} too")
        return None
    return WatchedSource(training_source(model, input_shapes, paths, preprocess, labels))


def training_source(
    model: onnx.ModelProto,
    input_shapes: dict[str, list[int]],
    paths: list[str | Path],
    preprocess: Preprocess | str | None = None,
    labels: str | Path | None = None,
) -> SampleSource:
    """One source over every path: each an .npz file or a folder of .npz files (read one file
    at a time), or a folder of images (decoded a batch at a time with `preprocess`, labelled
    by the `labels` file as `--labels` labels `--images`). Kinds cannot be mixed."""
    npz_files, image_files = [], []
    for path in map(Path, paths):
        found_npz, found_images = _files(path)
        npz_files += found_npz
        image_files += found_images
    if npz_files and image_files:
        raise CompressError(
            f"{FLAG}: give either .npz files or image folders, not both "
            f"({npz_files[0].name}, {image_files[0].name})"
        )
    dtypes = input_dtypes(model)
    if npz_files:
        if labels is not None:
            raise CompressError(
                f"--train-labels goes with image folders; put the labels of {FLAG} .npz files "
                "in them as an int array named 'labels'"
            )
        return NpzStream(npz_files, dtypes, input_shapes)
    name, preprocess = image_input(dtypes, input_shapes, preprocess, FLAG)
    names = [path.name for path in image_files]
    if len(set(names)) < len(names) and labels is not None:
        raise CompressError(f"{FLAG}: two images share a file name; labels match on file names")
    found = read_labels(labels, names) if labels is not None else None
    return ImageStream(image_files, name, input_shapes[name], preprocess, found)


def _files(path: Path) -> tuple[list[Path], list[Path]]:
    """(.npz files, image files) that `path` names: itself, or the files of a folder
    (sorted, subfolders not searched)."""
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise CompressError(f"{FLAG} {path}: expected an .npz file or a folder")
        return [path], []
    if not path.is_dir():
        raise CompressError(f"{FLAG} {path}: no such file or folder")
    files = sorted(entry for entry in path.iterdir() if entry.is_file())
    npz = [entry for entry in files if entry.suffix.lower() == ".npz"]
    images = [entry for entry in files if entry.suffix.lower() in IMAGE_SUFFIXES]
    if npz and images:
        raise CompressError(f"{FLAG} {path}: holds both .npz files and images; give one kind")
    if not npz and not images:
        raise CompressError(
            f"{FLAG} {path}: no .npz or image files ({', '.join(IMAGE_SUFFIXES)}); "
            "subfolders are not searched"
        )
    return npz, images
