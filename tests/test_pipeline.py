"""The uint8 data path (``timm_bninit.data.pipeline``): the fast decoder reads every stored image as PIL does, the
fast twins take the PIL steps' crops, flips and jitter, and the ``pil`` pipeline followed by ``DeviceNormalize`` is
``ToTensor`` + ``Normalize`` bit for bit."""

import io
import random

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F2

from timm_bninit.data import pipeline
from timm_bninit.data.pipeline import DeviceNormalize, ImagePipeline, decode_pil, decode_rgb, uint8_pipeline
from timm_bninit.errors import BNInitError
from timm_bninit.experiment.seeding import seed_globals

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's ImageNet defaults


def photo(width: int = 60, height: int = 45, seed: int = 0) -> Image.Image:
    """A smooth random field plus grain, as a photograph: resampling and JPEG coding have something to round."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray((rng.random((5, 5, 3)) * 255).astype(np.uint8)).resize((width, height),
                                                                                   Image.Resampling.BICUBIC)
    pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 10, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def stored(image: Image.Image, fmt: str = "JPEG", **save) -> dict:
    """The image as a split's ``image`` column holds it undecoded (``datasets.Image(decode=False)``)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}), **save)
    return {"bytes": buffer.getvalue(), "path": None}


def rotated_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return exif.tobytes()


FILES = {
    "RGB JPEG": lambda: stored(photo()),
    "progressive JPEG": lambda: stored(photo(), progressive=True),
    "greyscale JPEG": lambda: stored(photo().convert("L")),
    "CMYK JPEG": lambda: stored(photo().convert("CMYK")),
    "JPEG with EXIF orientation": lambda: stored(photo(), exif=rotated_exif()),
    "RGBA PNG": lambda: stored(photo().convert("RGBA"), "PNG"),
    "palette PNG": lambda: stored(photo().convert("P"), "PNG"),
}


@pytest.mark.parametrize("kind", FILES)
def test_fast_decoding_reads_each_kind_of_file_as_pil_does(kind):
    value = FILES[kind]()
    image = decode_rgb(value)
    expected = F2.pil_to_tensor(decode_pil(value))  # what a run decoded so far: datasets' decode, then RGB
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert torch.equal(image, expected)
    if kind == "greyscale JPEG":
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    if kind == "JPEG with EXIF orientation":
        assert tuple(image.shape[1:]) == (60, 45)  # stored 60 wide, 45 high; shown turned


def test_a_file_on_disk_decodes_from_its_path(tmp_path):
    path = tmp_path / "bird.jpg"
    photo().save(path, quality=90)
    expected = F2.pil_to_tensor(decode_pil(str(path)))
    assert torch.equal(decode_rgb({"bytes": None, "path": str(path)}), expected)
    assert torch.equal(decode_rgb(str(path)), expected)


def test_rgb_jpegs_take_the_fast_decoder_and_cmyk_or_refused_ones_pil(monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "decode_pil", lambda value: calls.append(value) or decode_pil(value))
    rgb, cmyk = stored(photo()), stored(photo().convert("CMYK"))
    decode_rgb(rgb)
    assert calls == []
    decode_rgb(cmyk)
    assert calls == [cmyk]  # torchvision's CMYK conversion assumes Adobe's inversion; PIL's reads the marker

    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported JPEG")  # as libjpeg-turbo refuses a 12-bit or damaged file

    monkeypatch.setattr(pipeline, "decode_jpeg", refuse)
    assert torch.equal(decode_rgb(rgb), F2.pil_to_tensor(decode_pil(rgb)))
    assert calls == [cmyk, rgb]


# ---- the pil pipeline + DeviceNormalize is ToTensor + Normalize --------------------------------------------------

TRANSFORMS = {
    "resize_crop": lambda: T.Compose([T.Resize((40, 40)), T.RandomCrop(32), T.RandomHorizontalFlip(), T.ToTensor(),
                                      T.Normalize(MEAN, STD)]),
    "rrc": lambda: timm.data.create_transform(32, is_training=True),  # random-resized crop, flip, colour jitter
    "rrc, random interpolation": lambda: timm.data.create_transform(32, is_training=True, interpolation="random"),
    "timm eval": lambda: timm.data.create_transform(32, crop_pct=0.875, interpolation="bicubic"),
    "input_bn": lambda: T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize((0.0,) * 3, (1.0,) * 3)]),
}


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_pil_pipeline_normalised_on_the_device_is_totensor_normalize_bit_for_bit(name, channels_last):
    transform = TRANSFORMS[name]()
    handoff = uint8_pipeline(transform, "pil")
    values = [stored(photo(seed=seed)) for seed in range(3)]
    uint8, floats = [], []
    for index, value in enumerate(values):
        seed_globals(index)
        uint8.append(handoff(value))
        seed_globals(index)
        floats.append(transform(decode_pil(value)))
    assert all(image.dtype == torch.uint8 for image in uint8)
    inputs = DeviceNormalize(handoff.mean, handoff.std, "cpu", channels_last=channels_last)(torch.stack(uint8))
    assert inputs.dtype == torch.float32 and torch.equal(inputs, torch.stack(floats))  # not close: equal
    assert inputs.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_device_normalize_takes_uint8_only():
    normalize = DeviceNormalize(MEAN, STD, "cpu")
    with pytest.raises(BNInitError, match="expects the uint8 batch a pipeline hands over, got torch.float32"):
        normalize(torch.zeros(1, 3, 4, 4))


# ---- the fast twins draw what the PIL steps draw -----------------------------------------------------------------

GEOMETRY = {
    "resize_crop": TRANSFORMS["resize_crop"],
    "rrc without jitter": lambda: timm.data.create_transform(32, is_training=True, color_jitter=None),
    "rrc, random interpolation": lambda: timm.data.create_transform(32, is_training=True, color_jitter=None,
                                                                    interpolation="random"),
    "flip": lambda: T.Compose([T.Resize(32), T.CenterCrop(32), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(MEAN, STD)]),
    "timm eval": TRANSFORMS["timm eval"],
}
# Both resamplers filter separably in two passes and round each pass to uint8 (torchvision's uint8 kernel follows
# Pillow's). Their weights are quantised differently, so the first pass may round one level apart; the second pass
# weighs those by coefficients whose absolute sum is 1 (bilinear) or at most ~1.3 (bicubic, a = -0.5), which with
# its own rounding bounds the output difference by 2 levels. A different crop or flip moves whole edges of the
# photo-like image, tens of levels.
RESAMPLING_LEVELS = 2


def rng_states() -> tuple:
    return torch.get_rng_state().tolist(), random.getstate(), np.random.get_state()[1].tolist()


@pytest.mark.parametrize("name", GEOMETRY)
def test_fast_twins_draw_the_pil_steps_crops_and_flips(name):
    transform = GEOMETRY[name]()
    fast, pil = uint8_pipeline(transform, "fast"), uint8_pipeline(transform, "pil")
    assert fast.decode_with == "fast" and pil.decode_with == "pil" and (fast.mean, fast.std) == (pil.mean, pil.std)
    value = stored(photo(90, 70))
    ours, theirs = [], []
    for seed in range(8):
        seed_globals(seed)
        ours.append(fast(value))
        after_fast = rng_states()
        seed_globals(seed)
        theirs.append(pil(value))
        assert rng_states() == after_fast  # the same draws from every generator, no more, no fewer
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (3, 32, 32)
        assert (a.int() - b.int()).abs().max() <= RESAMPLING_LEVELS
    if name != "timm eval":  # a random mode: other seeds take other crops, which the bound tells apart
        assert max(int((ours[0].int() - b.int()).abs().max()) for b in theirs[1:]) > 10 * RESAMPLING_LEVELS


def test_colour_jitter_twin_keeps_channel_order_and_pils_arithmetic():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, 8, 8), dtype=np.uint8))
    halve = uint8_pipeline(T.Compose([T.ColorJitter(brightness=(0.5, 0.5)), T.ToTensor(), T.Normalize(MEAN, STD)]))
    assert torch.equal(halve.transform(image), image // 2)  # PIL blends with black in float, then truncates
    grey = uint8_pipeline(T.Compose([T.ColorJitter(saturation=(0.0, 0.0)), T.ToTensor(), T.Normalize(MEAN, STD)]))
    r, g, b = image.long()
    luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16  # PIL's RGB -> L: ITU-R 601-2 weights, 16-bit fixed point
    assert torch.equal(grey.transform(image), luma.to(torch.uint8).expand(3, -1, -1))


# ---- refusals --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform, words", [
    (T.Compose([T.RandomRotation(10), T.ToTensor(), T.Normalize(MEAN, STD)]), "no uint8 twin of RandomRotation"),
    (T.Compose([T.Resize(8, interpolation=T.InterpolationMode.BOX), T.ToTensor(), T.Normalize(MEAN, STD)]),
     "cannot resample uint8 tensors with InterpolationMode.BOX"),
    (T.Compose([T.RandomCrop(8, padding=2), T.ToTensor(), T.Normalize(MEAN, STD)]), "no uint8 twin of a padding"),
])
def test_a_step_without_a_uint8_twin_is_refused_with_the_way_out(transform, words):
    with pytest.raises(BNInitError, match=words) as caught:
        uint8_pipeline(transform, "fast")
    assert "decode: pil" in str(caught.value)
    assert isinstance(uint8_pipeline(transform, "pil"), ImagePipeline)  # the pil pipeline runs any PIL step


def test_a_transform_not_ending_in_normalisation_or_an_unknown_decoder_is_refused():
    with pytest.raises(BNInitError, match="expects a Compose ending in ToTensor and Normalize"):
        uint8_pipeline(T.Compose([T.Resize(8), T.ToTensor()]))
    with pytest.raises(BNInitError, match="unknown decode 'simd'; choose one of fast, pil"):
        uint8_pipeline(TRANSFORMS["resize_crop"](), "simd")
