"""The fine-grained baselines' augmentation, ``resize<S>_crop``: S×S resize, random ``img_size`` crop, horizontal flip,
no colour jitter; eval S×S resize and centre crop. Checked on an image whose pixel values say where they came from."""

from dataclasses import replace

import datasets
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from timm_bninit.data.pipeline import uint8_pipeline
from timm_bninit.experiment.layout import RunError
from timm_bninit.experiment.loaders import EpochIndex, SeededImageDataset, build_transforms, resize_crop_size
from timm_bninit.experiment.model import build_model
from timm_bninit.experiment.recipe import Recipe, RecipeError, apply_overrides, load_recipe
from timm_bninit.experiment.seeding import rng_scope

SIZE, RESIZE = 16, 20  # img_size and S: a 20×20 resize, 16×16 crops at offsets 0..4
BLUE = 100


def pattern() -> Image.Image:
    """40 wide × 20 high: red = 10·row (constant along a row, so resampling the width keeps it exactly), green 0 in
    the left half and 255 in the right, blue constant."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :, 0] = (10 * np.arange(20))[:, None]
    pixels[:, 20:, 1] = 255
    pixels[:, :, 2] = BLUE
    return Image.fromarray(pixels)


# Green of the 20×20 resize, by hand: halving the width with PIL's bilinear (triangle) filter averages source columns
# 2j-1 .. 2j+2 with weights 1/8, 3/8, 3/8, 1/8, so column 9 sees one right-half column (255/8 = 31.9 -> 32) and column
# 10 three of them (7·255/8 = 223.1 -> 223); every other column is all left (0) or all right (255).
GREEN_RESIZED = [0] * 9 + [32, 223] + [255] * 9


def config(**changes) -> Recipe:
    return replace(Recipe(input_bn=True, img_size=SIZE, augmentation=f"resize{RESIZE}_crop"), **changes)


@pytest.fixture(scope="module")
def transforms():
    # input_bn: mean 0, std 1, so a tensor value is pixel / 255; test_resnet's interpolation is bilinear, as
    # resnet50.tv_in1k's
    return build_transforms(config(), timm.create_model("test_resnet"))


def pixels(tensor: torch.Tensor) -> np.ndarray:
    return (tensor.numpy() * 255).round().astype(int)


def where_from(tensor: torch.Tensor) -> tuple[int, int, bool]:
    """(top, left, flipped) of a 16×16 crop of the 20×20 resize, read from its pixel values; asserts every pixel is
    the resize's pixel at that place."""
    assert tuple(tensor.shape) == (3, SIZE, SIZE)
    red, green, blue = pixels(tensor)
    top = red[0, 0] // 10
    assert 0 <= top <= RESIZE - SIZE
    assert (red == (10 * (top + np.arange(SIZE)))[:, None]).all()  # rows top .. top+15 of the resize, in order
    assert (blue == BLUE).all()  # no colour jitter
    row = green[0].tolist()
    assert all(green[r].tolist() == row for r in range(SIZE))
    for left in range(RESIZE - SIZE + 1):
        window = GREEN_RESIZED[left:left + SIZE]
        if row in (window, window[::-1]):
            return top, left, row != window
    raise AssertionError(f"green row {row} is no 16-wide window of the 20×20 resize {GREEN_RESIZED}")


def test_train_is_a_random_crop_of_the_square_resize_flipped_half_the_time(transforms):
    train, _ = transforms
    rows = datasets.Dataset.from_dict({"image": [pattern()], "label": [0]},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "label": datasets.Value("int64")}))
    places = {where_from(SeededImageDataset(rows, train, seed=seed)[EpochIndex(0, epoch)][0])
              for seed in (1, 2, 3) for epoch in range(12)}
    assert {flipped for _, _, flipped in places} == {True, False}  # the per-sample stream flips some, not others
    assert len({top for top, _, _ in places}) > 1 and len({left for _, left, _ in places}) > 1


def test_a_sample_draws_the_same_crop_and_flip_every_time_from_its_stream(transforms):
    train, _ = transforms
    image = pattern()
    with rng_scope(7):
        first = train(image)
    with rng_scope(7):
        assert torch.equal(train(image), first)


def test_eval_is_the_square_resize_and_centre_crop_without_randomness(transforms):
    _, evaluate = transforms
    image = pattern()
    with rng_scope(1):
        first = evaluate(image)
    with rng_scope(2):
        second = evaluate(image)
    assert torch.equal(first, second)
    # the centre 16×16 of the 20×20 resize starts at row 2 and column 2, unflipped
    assert where_from(first) == (2, 2, False)
    assert pixels(first)[1, 0].tolist() == [0] * 7 + [32, 223] + [255] * 7


@pytest.mark.parametrize("decode", ["fast", "pil"])
def test_the_uint8_pipelines_take_the_same_crops_and_pixels_as_the_float_transforms(transforms, decode):
    # the pattern's resampling is exact (whole rows kept, the width halved), so even the fast resampler's pixels
    # equal PIL's here; on photographs they may round a level apart (tests/test_pipeline.py)
    stored = datasets.Image().encode_example(pattern())  # as a split stores it: PNG bytes
    for transform in transforms:
        handoff = uint8_pipeline(transform, decode)
        for seed in range(6):
            with rng_scope(seed):
                expected = transform(pattern())
            with rng_scope(seed):
                image = handoff(stored)
            assert image.dtype == torch.uint8 and (image.numpy() == pixels(expected)).all()
            assert where_from(image.float() / 255) == where_from(expected)


def test_two_methods_with_one_seed_see_the_same_augmented_tensors():
    images = [pattern(), pattern().transpose(Image.Transpose.ROTATE_90)]
    rows = datasets.Dataset.from_dict({"image": images, "label": [0, 1]},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "label": datasets.Value("int64")}))
    samples = {}
    for method in ("null", "bn_gamma01"):
        recipe = apply_overrides(load_recipe("cub"), ["model=test_resnet", "pretrained=false", f"norm_layer={method}",
                                                      f"img_size={SIZE}", f"augmentation=resize{RESIZE}_crop"])
        train, _ = build_transforms(recipe, build_model(recipe, num_classes=2))
        for seed in (1, 2):
            dataset = SeededImageDataset(rows, train, seed=seed)
            samples[method, seed] = [dataset[EpochIndex(i, epoch)][0] for epoch in range(4) for i in range(2)]
    assert all(torch.equal(a, b) for seed in (1, 2) for a, b in zip(samples["null", seed], samples["bn_gamma01", seed]))
    assert not all(torch.equal(a, b) for a, b in zip(samples["null", 1], samples["null", 2]))  # the seed matters


def test_a_resize_smaller_than_the_crop_is_refused():
    with pytest.raises(RunError, match=r"resizes to 12×12, smaller than the img_size=16 crop"):
        build_transforms(config(augmentation="resize12_crop"), timm.create_model("test_resnet"))


def test_the_recipe_key_reads_the_resize_size_and_refuses_malformed_modes():
    assert resize_crop_size("resize600_crop") == 600 and resize_crop_size("rrc") is None
    assert apply_overrides(Recipe(), ["augmentation=resize512_crop"]).augmentation == "resize512_crop"
    for bad in ("resize_crop", "resize4_crop", "resize²_crop", "resize-5_crop", "resize600"):
        with pytest.raises(RecipeError, match=r"'augmentation' expects .*resize<S>_crop"):
            apply_overrides(Recipe(), [f"augmentation={bad}"])


def test_fine_tuning_recipes_resize_and_crop_as_the_cited_baseline():
    # mmclassification's resnet50_8xb8_cub / resnet50_8xb8_cars: Resize 600 and 512, crop 448
    assert [(resize_crop_size(load_recipe(name).augmentation), load_recipe(name).img_size)
            for name in ("cub", "cars")] == [(600, 448), (512, 448)]
