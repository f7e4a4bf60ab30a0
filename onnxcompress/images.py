"""Folders of images as model inputs: the preprocessing spec (`--preprocess`), decoding with
Pillow, and labels files."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxcompress.errors import CompressError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass
class Preprocess:
    """How an image becomes model input: value = (pixel * scale - mean) / std, per channel.

    mean and std are in the model's channel order (after the BGR swap when `bgr`). `resize`
    is the shorter side (an int, aspect kept) or (height, width); `crop` is a centre crop.
    dtype "" follows the model input.
    """

    resize: int | tuple[int, int] | None = None
    crop: int | tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0
    layout: str = "NCHW"
    bgr: bool = False
    grayscale: bool = False
    dtype: str = ""


PREPROCESS_HELP = (
    "key=value items, e.g. 'resize=256,crop=224,scale=1/255,mean=0.485,0.456,0.406,"
    "std=0.229,0.224,0.225': resize=224 (shorter side) or H,W, crop=224 or H,W, mean, std "
    "(one value or one per channel), scale, layout=NCHW|NHWC, bgr, grayscale, dtype=float16; "
    "items and list values split by commas, semicolons or spaces, list values also by "
    "slashes (a single a/b is a fraction, e.g. scale=1/255)"
)
_FLAGS = {"bgr", "grayscale"}
_LIST_KEYS = {"resize", "crop", "mean", "std"}
# What users type between items and between list values: "mean=1,2,3", "mean=1;2;3", "1 2 3".
_SEPARATORS = re.compile(r"[,;\s]+")
# Larger than any model's image input; Pillow would allocate H*W*3 bytes, 30 GB at 100000.
MAX_IMAGE_SIDE = 8192
# No classifier has more classes; a larger "label" is another column (an id) read by mistake.
MAX_CLASS_INDEX = 2**31 - 1


def parse_preprocess(spec: str) -> Preprocess:
    """Parse e.g. "resize=224,mean=104,117,123,bgr" (see PREPROCESS_HELP)."""
    fields: dict = {}
    valid = [f.name for f in dataclasses.fields(Preprocess)]
    for key, value in _items(spec, valid):
        has_value = value is not None
        if key not in valid:
            raise CompressError(f"preprocess: unknown key '{key}'; valid keys: {', '.join(valid)}")
        if key in fields:
            raise CompressError(f"preprocess: '{key}' given twice")
        try:
            fields[key] = _parse_value(key, value if has_value else None)
        except ValueError as exc:
            raise CompressError(f"preprocess: bad value for '{key}': {exc}") from exc
    return Preprocess(**fields)


def _items(spec: str, keys: list[str]) -> list[tuple[str, str | None]]:
    """(key, value) pairs, a list's values joined by ';': a token that names no key and
    follows a list key ("mean=1,2,3" → mean=1, 2, 3) is that list's next value."""
    items: list[tuple[str, str | None]] = []
    for token in filter(None, _SEPARATORS.split(re.sub(r"\s*=\s*", "=", spec.strip()))):
        key, has_value, value = token.partition("=")
        after_value = bool(items) and items[-1][1] is not None
        if not has_value and after_value and key.lower() not in keys:
            if items[-1][0] not in _LIST_KEYS:
                raise CompressError(
                    f"preprocess: '{token}' follows '{items[-1][0]}', which takes one value"
                )
            items[-1] = (items[-1][0], ";".join(filter(None, (items[-1][1], token))))
        else:
            items.append((key.lower(), value if has_value else None))
    return items


def _list_values(value: str, fractions: bool) -> list[str]:
    """A list's values split by ';', then by '/' (for numbers that may be fractions, only a
    part with two or more slashes: "1/255" is one value, "0.4/0.5/0.6" three)."""
    parts = []
    for part in value.split(";"):
        split = not fractions or part.count("/") > 1
        parts.extend(re.split(r"[/xX]" if not fractions else "/", part) if split else [part])
    return parts


def _parse_value(key: str, value: str | None):
    if key in _FLAGS:
        if value is None or value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"'{value}' is not a yes/no value")
    if not value:
        raise ValueError("missing value")
    if key in ("resize", "crop"):
        return _sizes(value)
    if key in ("mean", "std"):
        numbers = tuple(_number(part) for part in _list_values(value, fractions=True))
        if key == "std" and min(numbers) <= 0:
            raise ValueError(f"'{value}': std must be > 0")
        return numbers
    if key == "scale":
        scale = _number(value)
        if scale == 0:
            raise ValueError("scale 0 would make every image the same")
        return scale
    if key == "layout":
        if value.upper() not in ("NCHW", "NHWC"):
            raise ValueError(f"'{value}' is not NCHW or NHWC")
        return value.upper()
    try:
        return np.dtype(value).name
    except TypeError:
        raise ValueError(f"'{value}' is not a numpy dtype name") from None


def _sizes(value: str) -> int | tuple[int, int]:
    """SIZE or HEIGHT;WIDTH (or HEIGHTxWIDTH, HEIGHT/WIDTH), each from 1 to MAX_IMAGE_SIDE."""
    try:
        sizes = [int(part) for part in _list_values(value, fractions=False)]
    except ValueError:
        sizes = []
    if not 1 <= len(sizes) <= 2 or min(sizes) < 1:
        raise ValueError(f"'{value}' is not SIZE or HEIGHT;WIDTH with sizes >= 1")
    if max(sizes) > MAX_IMAGE_SIDE:
        raise ValueError(f"'{value}': sizes are at most {MAX_IMAGE_SIDE} pixels")
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def _number(text: str) -> float:
    """A finite number, or a fraction such as 1/255."""
    numerator, _, denominator = text.partition("/")
    value = float(numerator)
    if denominator:
        if float(denominator) == 0:
            raise ValueError(f"'{text}' divides by 0")
        value /= float(denominator)
    if not math.isfinite(value):
        raise ValueError(f"'{text}' is not a finite number")
    return value


# torchvision's ImageNet recipe: the shorter side to 256/224 of the crop, then the centre crop.
_IMAGENET_RESIZE = 256 / 224
_IMAGENET_NORMALISE = "scale=1/255,mean=0.485,0.456,0.406,std=0.229,0.224,0.225"


def suggested_preprocess(shape: list[int]) -> str:
    """The --preprocess of an ImageNet-style (torchvision) model with this input shape."""
    nhwc = shape[-1] in (1, 3) and shape[1] not in (1, 3)
    height, width = (shape[1], shape[2]) if nhwc else (shape[-2], shape[-1])
    crop = f"{height}" if height == width else f"{height},{width}"
    resize = round(min(height, width) * _IMAGENET_RESIZE)
    layout = ",layout=NHWC" if nhwc else ""
    return f"resize={resize},crop={crop},{_IMAGENET_NORMALISE}{layout}"


def preprocess_for(
    spec: Preprocess | str | None, shape: list[int], flag: str = "--images"
) -> Preprocess:
    """The preprocessing of images for an input of `shape`; none given is refused, with the
    option to add: pixels fed the wrong way would make every figure of the run wrong, quietly."""
    if spec is None:
        raise CompressError(
            f"{flag} needs --preprocess to say how pixels become the model's input; for an "
            f"ImageNet-style model: --preprocess '{suggested_preprocess(shape)}' "
            "(caffe-style: 'mean=104,117,123,bgr'; raw 0..255 RGB: 'scale=1')"
        )
    return parse_preprocess(spec) if isinstance(spec, str) else spec


def load_images(
    folder: str | Path,
    preprocess: Preprocess,
    input_shape: list[int],
    limit: int | None = None,
    labels_path: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Decode and preprocess the images of a folder (sorted, not recursive) into one array
    [N, *input_shape[1:]] of `preprocess.dtype` (float32 if empty), with labels and file names.

    A labels file holds "<file or path>, <int>" or "<file> <int>" per line (matched on the file
    name), or one int per line in sorted file order.
    """
    files = image_files(folder)
    labels = read_labels(labels_path, [p.name for p in files]) if labels_path else None
    if limit is not None:
        files = files[:limit]
        labels = None if labels is None else labels[:limit]
    return decode_images(files, preprocess, input_shape), labels, [p.name for p in files]


def image_files(folder: str | Path) -> list[Path]:
    """The image files of a folder, sorted (subfolders are not searched); refused if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CompressError(f"{folder}: not a folder")
    files = sorted(
        entry
        for entry in folder.iterdir()
        if entry.suffix.lower() in IMAGE_SUFFIXES and entry.is_file()
    )
    if not files:
        raise CompressError(
            f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}); subfolders are not searched"
        )
    return files


def decode_images(files: list[Path], preprocess: Preprocess, input_shape: list[int]) -> np.ndarray:
    """The images of `files` decoded and preprocessed into one array [N, *input_shape[1:]] of
    `preprocess.dtype` (float32 if empty)."""
    height, width, channels = _image_geometry(preprocess, input_shape)
    # One array of the final dtype: no float64 or per-image copies kept around.
    images = np.empty((len(files), *input_shape[1:]), np.dtype(preprocess.dtype or "float32"))
    for index, path in enumerate(files):
        images[index] = _preprocess_image(path, preprocess, height, width, channels)
    return images


def image_input(
    dtypes: dict[str, np.dtype],
    shapes: dict[str, list[int]],
    spec: Preprocess | str | None,
    flag: str,
) -> tuple[str, Preprocess]:
    """The one input images feed (`dtypes` are the model's inputs) and the preprocessing
    that makes them, in that input's dtype; `flag` names the option in the refusals."""
    if len(dtypes) != 1:
        raise CompressError(
            f"{flag}: images feed a model with one input; this one has {', '.join(dtypes)}: "
            "give the inputs in .npz files, one array per input name"
        )
    ((name, dtype),) = dtypes.items()
    preprocess = preprocess_for(spec, shapes[name], flag)
    if preprocess.dtype and np.dtype(preprocess.dtype) != dtype:
        raise CompressError(
            f"preprocess dtype={preprocess.dtype}, but input '{name}' takes {dtype}"
        )
    return name, dataclasses.replace(preprocess, dtype=dtype.name)


def read_labels(path: str | Path, names: list[str]) -> np.ndarray:
    """Integer labels for the given file names, in their order (see load_images)."""
    entries = _label_lines(path)
    if all(re.fullmatch(r"[-+]?\d+", line) for _, line in entries):
        if len(entries) != len(names):
            raise CompressError(f"{path}: {len(entries)} labels for {len(names)} images")
        return np.array([_class_index(path, n, line) for n, line in entries], np.int64)
    by_name: dict[str, int] = {}
    for number, line in entries:
        name, _, label = line.rpartition(",") if "," in line else line.rpartition(" ")
        if not name.strip() or not re.fullmatch(r"\s*[-+]?\d+\s*", label):
            raise CompressError(
                f"{path}:{number}: expected '<file>, <int>' or '<file> <int>', got '{line[:80]}'"
            )
        name, index = Path(name.strip()).name, _class_index(path, number, label.strip())
        if by_name.setdefault(name, index) != index:
            raise CompressError(f"{path}: file name {name} has two different labels")
    missing = [name for name in names if name not in by_name]
    if missing:
        raise CompressError(f"{path}: no label for {len(missing)} image(s), e.g. {missing[0]}")
    return np.array([by_name[name] for name in names], np.int64)


def _label_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines of a UTF-8 text file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CompressError(f"{path}: cannot read labels: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise CompressError(f"{path}: not a text file; labels are UTF-8 text, one label a line")
    return [
        (number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()
    ]


def _class_index(path: str | Path, number: int, text: str) -> int:
    # Python refuses int() of over 4300 digits: length first.
    short = len(text.lstrip("+-").lstrip("0")) <= len(str(MAX_CLASS_INDEX))
    value = int(text) if short else None
    if value is None or not 0 <= value <= MAX_CLASS_INDEX:
        raise CompressError(
            f"{path}:{number}: expected a class index from 0 to {MAX_CLASS_INDEX}, got {text[:24]}"
        )
    return value


def _image_geometry(preprocess: Preprocess, shape: list[int]) -> tuple[int, int, int]:
    """Height, width and channels the input takes, checked against the preprocessing."""
    if len(shape) != 4:
        raise CompressError(f"images need a 4-D input; the input has shape {list(shape)}")
    if preprocess.layout == "NCHW":
        channels, height, width = shape[1:]
    else:
        height, width, channels = shape[1:]
    if channels not in (1, 3) or (preprocess.grayscale and channels != 1):
        raise CompressError(
            f"input shape {list(shape)} has {channels} channel(s) in layout {preprocess.layout}; "
            "images give 3 (RGB) or 1 (grayscale): check layout= and grayscale"
        )
    for key in ("mean", "std"):
        if len(getattr(preprocess, key)) not in (1, channels):
            raise CompressError(f"preprocess {key}: give 1 or {channels} values")
    return height, width, channels


def _preprocess_image(
    path: Path, preprocess: Preprocess, height: int, width: int, channels: int
) -> np.ndarray:
    from PIL import Image  # only image calibration needs Pillow

    try:
        with Image.open(path) as opened:
            image = opened.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CompressError(f"{path}: cannot decode image: {exc}") from exc
    if preprocess.resize is not None:
        image = image.resize(_resized(image.size, preprocess.resize), Image.BILINEAR)
    crop_height, crop_width = _pair(preprocess.crop) if preprocess.crop else (height, width)
    if image.width >= crop_width and image.height >= crop_height:
        left = round((image.width - crop_width) / 2)
        top = round((image.height - crop_height) / 2)
        image = image.crop((left, top, left + crop_width, top + crop_height))
    if image.size != (width, height):
        raise CompressError(
            f"{path.name}: after resize/crop the image is {image.width}x{image.height} (WxH), "
            f"the input takes {width}x{height}: set resize= and crop= in the preprocessing"
        )
    pixels = np.asarray(image, np.float32).reshape(height, width, channels)
    if preprocess.bgr and channels == 3:
        pixels = pixels[..., ::-1]
    mean = np.asarray(preprocess.mean, np.float32)
    std = np.asarray(preprocess.std, np.float32)
    values = (pixels * np.float32(preprocess.scale) - mean) / std
    return values.transpose(2, 0, 1) if preprocess.layout == "NCHW" else values


def _resized(size: tuple[int, int], resize: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) after resizing: the shorter side to an int, or exactly (height, width)."""
    if isinstance(resize, tuple):
        return resize[1], resize[0]
    width, height = size
    if width <= height:
        return resize, max(1, round(height * resize / width))
    return max(1, round(width * resize / height)), resize


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return size if isinstance(size, tuple) else (size, size)
