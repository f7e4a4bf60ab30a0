"""--preprocess: list values take the separators users type, and --images without it is
refused in one line that names the option to add, sized to the model's input."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from onnxcompress.cli import main
from onnxcompress.errors import CompressError
from onnxcompress.images import parse_preprocess, suggested_preprocess


@pytest.mark.parametrize(
    "spec",
    [
        "resize=256,crop=224,scale=1/255,mean=0.485;0.456;0.406,std=0.229;0.224;0.225",
        "resize=256,crop=224,scale=1/255,mean=0.485,0.456,0.406,std=0.229,0.224,0.225",
        "resize=256 crop=224 scale=1/255 mean=0.485 0.456 0.406 std=0.229 0.224 0.225",
        "resize = 256; crop = 224; scale = 1/255; "
        "mean = 0.485, 0.456, 0.406; std = 0.229, 0.224, 0.225",
        "resize=256,crop=224,scale=1/255,mean=0.485/0.456/0.406,std=0.229/0.224/0.225",
    ],
    ids=["semicolons", "commas", "spaces", "spaced", "slashes"],
)
def test_list_values_take_the_separators_users_type(spec):
    parsed = parse_preprocess(spec)
    assert (parsed.resize, parsed.crop, parsed.scale) == (256, 224, 1 / 255)
    assert parsed.mean == (0.485, 0.456, 0.406) and parsed.std == (0.229, 0.224, 0.225)


def test_one_slash_is_a_fraction_and_sizes_take_pairs():
    assert parse_preprocess("mean=123/255").mean == (123 / 255,)
    assert parse_preprocess("mean=1/2/4").mean == (1.0, 2.0, 4.0)
    for sizes in ("crop=224,200", "crop=224 200", "crop=224x200", "crop=224/200", "crop=224;200"):
        assert parse_preprocess(sizes).crop == (224, 200), sizes
    assert parse_preprocess("mean=104,117,123,bgr").bgr  # a key ends the list


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("scale=1/255,0.5", "'0.5' follows 'scale', which takes one value"),
        ("resize=1,2,3", "is not SIZE or HEIGHT;WIDTH"),
        ("std=1 inf 1", "'inf' is not a finite number"),
    ],
)
def test_values_that_fit_no_key_are_refused(spec, words):
    with pytest.raises(CompressError, match="preprocess: ") as refused:
        parse_preprocess(spec)
    assert words in str(refused.value)


def test_suggestion_is_the_imagenet_recipe_at_224_and_scales_with_the_input():
    at_224 = parse_preprocess(suggested_preprocess([1, 3, 224, 224]))
    assert (at_224.resize, at_224.crop) == (256, 224)
    assert at_224.mean == (0.485, 0.456, 0.406) and at_224.std == (0.229, 0.224, 0.225)
    wide = parse_preprocess(suggested_preprocess([1, 48, 192, 3]))
    assert wide.crop == (48, 192) and wide.layout == "NHWC"
    assert wide.resize == round(48 * at_224.resize / at_224.crop)


def _image_model(tmp_path, side):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, side, side])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    pool = helper.make_node("GlobalAveragePool", ["x"], ["p"])
    flat = helper.make_node("Flatten", ["p"], ["y"])
    graph = helper.make_graph([pool, flat], "g", [x], [y])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _images(tmp_path, side, count=4):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (side + 7, side + 3, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return folder


def test_images_without_preprocess_name_the_option_and_it_works(tmp_path, capsys):
    side = 40
    model, images, out = _image_model(tmp_path, side), _images(tmp_path, side), tmp_path / "o.onnx"
    args = [model, "--passes", "identity", "--images", images, "-o", out, "--no-bench", "-q"]
    assert main([str(a) for a in args]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    suggested = suggested_preprocess([1, 3, side, side])
    assert line.startswith("error: --images needs --preprocess")
    assert f"--preprocess '{suggested}'" in line and not out.exists()
    assert main([str(a) for a in [*args, "--preprocess", suggested]]) == 0
    assert out.exists()
