"""The coloured-shapes world (training/shapes_data.py) of the planned `shapes` demo models: the scene generator is
deterministic, the held-out split is disjoint, and the detector (the benchmark's oracle) recovers drawn layouts and
applies GenEval's rules; the training stages run end to end; the demo models together stay within 25 MB."""

from pathlib import Path

import numpy as np
from test_digits import run_stages

from mlx_flash import load_pipeline
from mlx_flash.loading import PACKAGED_MODELS
from training.shapes_data import Item, Spec, dataset, draw, holds, prompt, scene, split
from training.shapes_detector import correct, detect, layout_matches


def test_generator_is_deterministic():
    train, _ = split()
    a, texts_a, layouts_a = dataset(train, 24, seed=5)
    b, texts_b, layouts_b = dataset(train, 24, seed=5)
    c, _, _ = dataset(train, 24, seed=6)
    assert np.array_equal(a, b) and texts_a == texts_b and layouts_a == layouts_b
    assert not np.array_equal(a, c)
    assert a.shape == (24, 64, 64, 3) and a.dtype == np.uint8


def test_held_out_combinations_are_never_trained_on():
    train, held = split()
    assert not {s.key() for s in train} & {s.key() for s in held}
    assert {s.category for s in held} == {"two objects", "counting", "position", "colour attribution"}
    assert prompt(Spec("position", (("red", "circle"), (None, "star")), relation="above")) == \
        "a red circle above a star"
    assert prompt(Spec("counting", (("orange", "square"),), 3), suffix=True) == \
        "three orange squares on a white background"


def test_detector_recovers_drawn_training_layouts():
    train, _ = split()
    images, texts, layouts = dataset(train, 300, seed=11)
    recovered = np.mean([layout_matches(detect(im), lay) for im, lay in zip(images, layouts)])
    assert recovered >= 0.98, recovered


def test_geneval_rules_accept_drawn_scenes_and_reject_wrong_ones():
    rng = np.random.default_rng(0)
    _, held = split()
    for category in ("two objects", "counting", "position", "colour attribution"):
        spec = next(s for s in held if s.category == category)
        assert correct(spec, detect(draw(scene(spec, rng)))), spec
    spec = Spec("position", (("red", "circle"), ("blue", "square")), relation="to the left of")
    items = scene(spec, rng)
    assert holds("to the left of", (items[0].x, items[0].y), (items[1].x, items[1].y))
    swapped = [Item(i.colour, i.shape, 64 - i.x, i.y, i.size) for i in items]  # mirrored left-right
    assert correct(spec, detect(draw(items))) and not correct(spec, detect(draw(swapped)))
    wrong_colour = Spec("colours", (("green", "circle"),))
    assert not correct(wrong_colour, detect(draw(items)))
    assert not correct(Spec("counting", (("red", "circle"),), 2), detect(draw(items)))


def test_all_demo_models_fit_in_25_mb():
    files = [f for f in PACKAGED_MODELS.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    print(f"shipped demo models: {size / 1e6:.1f} MB")
    assert size <= 25e6


def test_training_scripts_run_end_to_end(tmp_path):
    """The three shapes stages, a few steps on a few scenes each, write model folders the pipeline loads."""
    root = Path(__file__).resolve().parents[1]
    teacher, student = tmp_path / "shapes", tmp_path / "shapes-flash"
    stages = [
        ["training/train_shapes_vae.py", "--out", teacher, "--steps", "2", "--images", "32", "--batch", "4",
         "--preview", tmp_path / "vae.png"],
        ["training/train_shapes.py", "--model", teacher, "--steps", "2", "--images", "32", "--batch", "4",
         "--preview", tmp_path / "teacher.png", "--preview-prompts", "2"],
        ["training/distill_shapes.py", "--teacher", teacher, "--out", student, "--work", tmp_path / "work",
         "--prompts", "4", "--train-steps", "2", "--trajectory-warmup", "1", "--teacher-samples", "4",
         "--batch-size", "2"],
    ]
    run_stages(stages, root)
    for folder, steps in ((teacher, 28), (student, 4)):
        pipe = load_pipeline(folder, dtype="float32")
        assert pipe.defaults()[0] == steps and pipe.vae_factor == 4
        image = pipe.generate("a red circle above a blue star", seed=0, output_type="np", progress=False)
        assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
