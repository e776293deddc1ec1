"""The single-object pixel check: right on the ground truth, wrong where the picture is wrong."""
import numpy as np
from tiny_stages import save_stages

from latentdiff.data.shapes import COLOURS, render_sample
from latentdiff.eval.pixel_check import judge_single, pixel_check, single_object_prompts
from latentdiff.pipeline import Text2ImagePipeline


def test_prompts_are_canonical_single_objects_from_training_pairs():
    samples = single_object_prompts(50, seed=1)
    assert samples == single_object_prompts(50, seed=1)
    assert all(s.kind == "single" and s.caption.endswith(s.objects[0].region) for s in samples)
    assert len({s.objects[0].box for s in samples}) > 20  # layouts vary, not only the region


def test_ground_truth_passes_every_check():
    for sample in single_object_prompts(300):
        judgement = judge_single(np.asarray(render_sample(sample)), sample)
        assert judgement.ok, (sample.caption, judgement)


def test_wrong_colour_wrong_place_and_blank_fail():
    sample = next(s for s in single_object_prompts(100) if s.objects[0].region == "top left"
                  and s.objects[0].colour != "blue")
    image = np.asarray(render_sample(sample)).copy()
    ink = (255 - image.astype(int)).sum(-1) > 60
    recoloured = image.copy()
    recoloured[ink] = COLOURS["blue"]
    assert judge_single(recoloured, sample).colour == "blue" and not judge_single(recoloured, sample).colour_ok
    moved = np.full_like(image, 255)
    moved[16:, 16:] = image[:16, :16]  # the top-left quarter, put in the bottom right
    judgement = judge_single(moved, sample)
    assert judgement.colour_ok and not judgement.region_ok and judgement.region == "bottom right"
    blank = judge_single(np.ones((32, 32, 3), np.float32), sample)
    assert blank.colour is None and not blank.ok


def test_pixel_check_runs_a_pipeline(tmp_path):
    stages = save_stages(tmp_path)
    pipe = Text2ImagePipeline.from_pretrained(stages["unet"])
    scores = pixel_check(pipe, count=6, batch_size=4, num_inference_steps=2)
    assert scores["count"] == 6 and 0 <= scores["both"] <= min(scores["colour"], scores["position"]) <= 1

