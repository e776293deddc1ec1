"""A request that cannot work is refused before torch loads: `latentdiff generate` resolves it against the
folder's PipelineSpec (JSON files and safetensors headers), with the checks Text2ImagePipeline.request runs."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_stages import save_stages

from latentdiff.diffusion.prediction import PREDICTIONS
from latentdiff.diffusion.prediction_names import PREDICTION_NAMES
from latentdiff.pipeline import Text2ImagePipeline
from latentdiff.pipeline_spec import PipelineSpec
from latentdiff.samplers import SAMPLERS
from latentdiff.sampling_config import SAMPLER_NAMES

ROOT = Path(__file__).resolve().parents[1]
# `latentdiff ARGS` in a Python where any `import torch` fails
WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; from latentdiff.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The two kinds of folder `--pipeline` takes: a diffusion run folder and a saved pipeline folder."""
    root = tmp_path_factory.mktemp("fast_refusal")
    run = save_stages(root / "weights")["unet"]
    Text2ImagePipeline.from_pretrained(run).save_pretrained(root / "pipeline")
    return {"run": run, "pipeline": root / "pipeline"}


def generate_without_torch(folder: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", WITHOUT_TORCH, "generate", "a red circle", "--pipeline", str(folder),
               "--out", str(out), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["run", "pipeline"])
@pytest.mark.parametrize("args, message", [
    (["--cfg", "nan"], "guidance_scale: must be a finite number, got nan"),
    (["--size", "100000x100000"], "1 image(s) of 100000x100000 would need about"),
    (["--size", "33x32"], "image size 33x32 is not a positive multiple of 4"),
    (["--sampler", "nope"], "unknown sampler 'nope'"),
    (["--steps", "0"], "num_inference_steps: must be at least 1, got 0"),
])
def test_impossible_requests_exit_2_without_importing_torch(folders, tmp_path, kind, args, message):
    done = generate_without_torch(folders[kind], tmp_path / "out", *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_possible_request_passes_the_checks_and_only_then_needs_torch(folders, tmp_path):
    done = generate_without_torch(folders["run"], tmp_path / "out", "--size", "32x32", "--steps", "2")
    assert done.returncode == 1 and "import of torch halted" in done.stderr  # the load, after the checks


@pytest.mark.parametrize("kind", ["run", "pipeline"])
def test_the_spec_read_from_a_folder_is_the_loaded_pipelines(folders, kind):
    assert PipelineSpec.from_folder(folders[kind]) == Text2ImagePipeline.from_pretrained(folders[kind]).spec


def test_the_spec_of_half_precision_weights_is_the_float32_pipeline_they_load_into(folders, tmp_path):
    Text2ImagePipeline.from_pretrained(folders["run"]).to(dtype=torch.float16).save_pretrained(tmp_path / "half")
    loaded = Text2ImagePipeline.from_pretrained(tmp_path / "half")
    assert loaded.dtype == torch.float32 and PipelineSpec.from_folder(tmp_path / "half") == loaded.spec


def test_the_torch_free_lists_of_names_are_the_registries():
    assert tuple(SAMPLERS) == SAMPLER_NAMES and tuple(PREDICTIONS) == PREDICTION_NAMES
