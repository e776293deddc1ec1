"""`latentdiff convert SRC DST --to diffusers|single-file|latentdiff`: the source format is detected."""
from __future__ import annotations

import argparse

HALF = {"fp16": "float16", "bf16": "bfloat16"}


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a diffusers folder, an original SD checkpoint (.safetensors; .ckpt with "
                                    "--allow-pickle), or a latentdiff pipeline / diffusion run folder")
    parser.add_argument("dst", help="the folder (diffusers, latentdiff) or .safetensors file (single-file) to write")
    parser.add_argument("--to", required=True, choices=("diffusers", "single-file", "latentdiff"),
                        help="the format to write")
    parser.add_argument("--dtype", choices=sorted(HALF), help="cast the written weights (default: as loaded, fp32)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read pickled .ckpt/.bin files (with torch.load(weights_only=True)); off by default")
    single = parser.add_argument_group("single-file sources")
    single.add_argument("--config", metavar="DIR", help="a diffusers folder whose configs describe the "
                                                         "architecture (default: detected from the weights)")
    single.add_argument("--variant", choices=("sd1", "sd2", "sd2-base"),
                        help="the SD release, where detection cannot tell (sd2 = 768-v, sd2-base = 512 ε)")
    single.add_argument("--prediction", help="override the prediction type (eps, v or x0)")
    single.add_argument("--tokenizer", metavar="DIR", help="a local CLIPTokenizer folder for SD 1.x (default: "
                                                            "CLIP's BPE vocabulary as bundled with open_clip)")


def run_convert(args: argparse.Namespace) -> None:
    import torch

    from ..diffusion.prediction import get_prediction
    from . import convert

    if args.prediction is not None:
        get_prediction(args.prediction, "--prediction")  # ConfigError naming the known types

    dtype = getattr(torch, HALF[args.dtype]) if args.dtype else None
    pipe = convert(args.src, args.dst, to=args.to, dtype=dtype, allow_pickle=args.allow_pickle, config=args.config,
                   variant=args.variant, prediction=args.prediction, tokenizer=args.tokenizer)
    print(f"wrote {args.dst} ({args.to}; {pipe.record.prediction}-prediction, "
          f"{pipe.text_encoder.width}-wide text states, default sampler {pipe.sampling.sampler})")
