"""`latentdiff generate`: prompts in, PNGs out (each carrying its parameters), or one PNG re-rendered.

    latentdiff generate "a red circle in the top left" --n 4 --seed 7 --out outputs/
    latentdiff generate --from-png outputs/00000-7-a-red-circle.png
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from tqdm.auto import tqdm

from .errors import CheckpointError, ConfigError
from .generation_request import resolve_request
from .grid import prompt_grid
from .pipeline_spec import PipelineSpec
from .png_info import GenerationParams, read_png_params, save_png
from .sampling_config import SAMPLER_NAMES

DEFAULT_PIPELINE = "weights/diffusion"
DEFAULT_OUT = "outputs"


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="*", help="one or more prompts")
    parser.add_argument("--pipeline", default=None,
                        help=f"pipeline folder or diffusion run folder (default: {DEFAULT_PIPELINE})")
    parser.add_argument("--negative", default=None, help="negative prompt (replaces the empty prompt in guidance)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the pipeline's)")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the pipeline's)")
    parser.add_argument("--sampler", help=f"{', '.join(SAMPLER_NAMES)} (default: the pipeline's)")
    parser.add_argument("--seed", type=int, help="seed of the first image; image k uses seed + k (default: random)")
    parser.add_argument("--n", type=int, default=1, help="images per prompt")
    parser.add_argument("--size", help="WxH in pixels, multiples of the latent factor (default: the training size)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--grid", action="store_true", help="also write all images as one grid.png")
    parser.add_argument("--from-png", dest="from_png", help="re-render the image whose parameters this PNG carries")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not match:
        raise ConfigError(f"--size {text!r}: expected WxH, e.g. 32x32")
    return int(match.group(1)), int(match.group(2))


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def next_index(out: Path) -> int:
    """The first index not used by an NNNNN-*.png in `out`, so earlier outputs are never overwritten."""
    used = [int(p.name[:5]) for p in out.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    return max(used, default=-1) + 1


def pipeline_folder(folder: str) -> Path:
    path = Path(folder)
    if not path.exists():
        raise CheckpointError(f"pipeline not found: {path} (train one with `latentdiff quickstart`, or pass --pipeline)")
    return path


def load_pipeline(folder: str, device: str, *, image_tower: bool = True):
    """image_tower=False: no CLIP image tower (no CLIP score), and a text tower trained here loads without
    open_clip: seconds sooner (generation embeds no images; eval and sweep do)."""
    path = pipeline_folder(folder)
    from .pipeline import Text2ImagePipeline  # torch and the models: not for `--help`

    return Text2ImagePipeline.from_pretrained(path, image_tower=image_tower).to(device)


def stage_hashes(pipe) -> dict[str, str]:
    return {name: getattr(pipe, name).identity.weights_hash for name in ("autoencoder", "text_encoder", "unet")}


def run_generate(args: argparse.Namespace) -> list[Path]:
    if args.from_png:
        return rerender(args)
    prompts = list(args.prompt)
    if not prompts or any(not p.strip() for p in prompts):
        raise ConfigError("the prompt is empty: give a prompt, e.g. latentdiff generate \"a red circle\"")
    if args.n < 1:
        raise ConfigError(f"--n must be at least 1, got {args.n}")
    width, height = parse_size(args.size)
    options = dict(num_inference_steps=args.steps, guidance_scale=args.cfg, sampler=args.sampler, height=height,
                   width=width, num_images_per_prompt=args.n)
    folder = args.pipeline or DEFAULT_PIPELINE
    spec = PipelineSpec.from_folder(pipeline_folder(folder), args.device)  # its JSON files: no torch yet
    resolve_request(spec, prompts, args.negative, **options)  # a bad request is refused here, at once
    pipe = load_pipeline(folder, args.device, image_tower=False)
    request = pipe.request(prompts, args.negative, seed=args.seed, **options)  # the same checks, and the seeds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=request.steps, desc="generating", dynamic_ncols=True) as bar:  # one batch: a tick per step
        result = pipe.generate(request, callback=lambda info: bar.update(1))
    written = []
    index = next_index(out)
    hashes, pipeline_dir = stage_hashes(pipe), str(Path(args.pipeline or DEFAULT_PIPELINE))
    for k, (image, prompt, image_seed) in enumerate(zip(result.images, result.prompts, result.seeds)):
        params = GenerationParams(prompt=prompt, negative_prompt=args.negative, seed=image_seed, steps=request.steps,
                                  sampler=request.sampler, guidance_scale=request.guidance_scale,
                                  spacing=pipe.sampling.spacing,
                                  width=image.width, height=image.height, stages=hashes, pipeline=pipeline_dir)
        path = out / f"{index + k:05d}-{image_seed}-{slug(prompt)}.png"
        save_png(image, path, params)
        written.append(path)
    if args.grid:
        columns = args.n if len(prompts) > 1 else min(8, args.n)
        prompt_grid(result.images, result.prompts, columns).save(out / "grid.png")
        written.append(out / "grid.png")
    print(f"wrote {len(written)} file(s) to {out}/")
    return written


def rerender(args: argparse.Namespace) -> list[Path]:
    """Generate again, exactly, the image whose parameters `--from-png` carries (the same stages required)."""
    params = read_png_params(args.from_png)
    folder = args.pipeline or params.pipeline or DEFAULT_PIPELINE
    pipe = load_pipeline(folder, args.device, image_tower=False).with_sampling({"spacing": params.spacing})
    hashes = stage_hashes(pipe)
    changed = [f"{name} (image: {params.stages[name]}, pipeline: {hashes.get(name)})"
               for name in params.stages if params.stages[name] and params.stages[name] != hashes.get(name)]
    if changed:
        raise CheckpointError(f"{folder} is not the pipeline {args.from_png} was made with: different "
                              + ", ".join(changed))
    result = pipe(params.prompt, params.negative_prompt, num_inference_steps=params.steps,
                  guidance_scale=params.guidance_scale, sampler=params.sampler, height=params.height,
                  width=params.width, seed=params.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{next_index(out):05d}-{params.seed}-{slug(params.prompt)}.png"
    save_png(result.images[0], path, params)
    print(f"re-rendered {args.from_png} to {path}")
    return [path]
