"""`latentdiff generate`: PNGs with their parameters, --from-png re-renders exactly, bad input exits 2."""

import numpy as np
import pytest
from PIL import Image
from tiny_stages import save_stages, save_unet

from latentdiff.cli import main
from latentdiff.latent_diffusion import LatentDiffusion
from latentdiff.png_info import read_png_params


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return save_stages(tmp_path_factory.mktemp("generate"))


def generate(stages, out, *args):
    return main(["generate", "--pipeline", str(stages["unet"]), "--out", str(out), "--steps", "3", *args])


def test_pngs_carry_their_parameters_and_rerender_exactly(stages, tmp_path, capsys):
    assert generate(stages, tmp_path, "a red circle", "a blue square", "--n", "2", "--seed", "5",
                    "--negative", "green", "--sampler", "euler_a", "--cfg", "2.5", "--grid") == 0
    pngs = sorted(tmp_path.glob("0*.png"))
    assert len(pngs) == 4 and (tmp_path / "grid.png").is_file()
    params = read_png_params(pngs[1])
    assert (params.prompt, params.seed, params.steps, params.sampler) == ("a red circle", 6, 3, "euler_a")
    assert params.negative_prompt == "green" and params.guidance_scale == 2.5
    assert (params.width, params.height) == Image.open(pngs[1]).size
    assert set(params.stages) == {"autoencoder", "text_encoder", "unet"} and all(params.stages.values())

    again = tmp_path / "again"
    assert main(["generate", "--from-png", str(pngs[1]), "--out", str(again)]) == 0
    [rerendered] = list(again.glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(rerendered)), np.asarray(Image.open(pngs[1])))
    assert read_png_params(rerendered) == params


def test_outputs_are_never_overwritten(stages, tmp_path):
    assert generate(stages, tmp_path, "a red circle", "--seed", "1") == 0
    assert generate(stages, tmp_path, "a red circle", "--seed", "1") == 0
    assert sorted(p.name[:5] for p in tmp_path.glob("*.png")) == ["00000", "00001"]


@pytest.mark.parametrize("args, message", [
    (["   "], "the prompt is empty"),
    (["a red circle", "--size", "17x16"], "not a positive multiple of"),
    (["a red circle", "--size", "big"], "expected WxH"),
    (["a red circle", "--sampler", "magic"], "unknown sampler 'magic'"),
])
def test_bad_input_is_one_line_and_exit_2(stages, tmp_path, capsys, args, message):
    assert generate(stages, tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--cfg", "nan"], "guidance_scale: must be a finite number, got nan"),
    (["--cfg", "inf"], "guidance_scale: must be a finite number, got inf"),
    (["--size", "100000x100000"], "1 image(s) of 100000x100000 would need about"),
])
def test_impossible_requests_exit_2_before_any_work(stages, tmp_path, capsys, monkeypatch, args, message):
    def no_sampling(*_, **__):
        raise AssertionError("sampling started")
    monkeypatch.setattr(LatentDiffusion, "text_to_latents", no_sampling)  # refused before any work
    assert generate(stages, tmp_path / "out", "a red circle", *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "out").exists()
    if "size" in args[0]:
        assert "of memory this machine has" in err  # the limit is named


def test_missing_or_mismatched_checkpoints_exit_2(stages, tmp_path, capsys):
    assert main(["generate", "a red circle", "--pipeline", str(tmp_path / "nowhere")]) == 2
    assert "pipeline not found" in capsys.readouterr().err
    assert generate(stages, tmp_path / "a", "a red circle", "--seed", "3") == 0
    png = next((tmp_path / "a").glob("*.png"))
    capsys.readouterr()
    other = save_unet(tmp_path / "other_unet", stages["autoencoder"], stages["text_encoder"], seed=1)
    assert main(["generate", "--from-png", str(png), "--pipeline", str(other), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "is not the pipeline" in err and "unet" in err and err.count("\n") == 1
    assert main(["generate", "--from-png", str(stages["unet"] / "config.json")]) == 2
    assert "cannot be read as an image" in capsys.readouterr().err
