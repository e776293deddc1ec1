"""`latentdiff eval --sweep`: every sampler at few steps against a many-step reference (issue 14).

    latentdiff eval --sweep --pipeline weights/quickstart --spacings leading,trailing,karras --out weights/sweep.json

Each (sampler, spacing, steps) row is `evaluate`'s evaluation (the judge per category on both splits, CLIP-FID,
CLIP score) of the same prompts and seeds; the reference row is dpmpp_2m at the pipeline's own spacing and
--reference-steps. The autoencoder ceiling does not depend on sampling, so it is scored once, with the first row.
A row's cost is its UNet evaluations per image, counted with a forward hook on the UNet (heun evaluates twice
a step, but once on the step to σ = 0; a guided evaluation is one batched call), and the seconds per image of
its generation.

Rows are written to --out as each one finishes; a rerun for the same pipeline (its stages' hashes) and settings
skips the rows the file holds, so a long sweep resumes after an interruption.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checkpoint import atomic_write_json
from ..config import check_choice
from ..data.shapes import SPLITS
from ..diffusion.schedule_config import SPACINGS
from ..errors import ConfigError
from ..sampling_config import check_sampler, sampler_names
from .evaluate import evaluate
from .geneval import CATEGORIES, build_prompt_suite

REFERENCE_SAMPLER = "dpmpp_2m"
# A row matches the reference when no category, on either split, scores more than this below it.
CLOSE, NEAR = 0.02, 0.05  # NEAR: within 5 points (scores are fractions of prompts judged correct)
KIND = "sampler_sweep"

Key = tuple[str, str, int]  # (sampler, spacing, steps)


def row_key(row: dict) -> Key:
    return row["sampler"], row["spacing"], row["steps"]


def sweep_keys(samplers: list[str], spacings: list[str], steps: list[int], reference: Key) -> list[Key]:
    """The reference first, then every (sampler, spacing, steps) once, in the order given."""
    keys = [reference] + [(s, spacing, n) for s in samplers for spacing in spacings for n in steps]
    return list(dict.fromkeys(keys))


def unet_evaluations(pipe, sampler: str, steps: int) -> int:
    """UNet forward calls to draw one image with `sampler` in `steps` steps (at the pipeline's spacing), counted
    rather than known per sampler."""
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        pipe("a red circle", num_inference_steps=steps, sampler=sampler, seed=0, output_type="latent")
    finally:
        handle.remove()
    return len(calls)


def evaluate_row(pipe, key: Key, per_category: int, seed: int, *, ceiling: bool) -> dict:
    """`evaluate` at one (sampler, spacing, steps), with its cost."""
    sampler, spacing, steps = key
    pipe.with_sampling({"spacing": spacing})
    results = evaluate(pipe, per_category, seed, ceiling=ceiling, num_inference_steps=steps, sampler=sampler)
    images = sum(len(build_prompt_suite(split, per_category, seed)) for split in SPLITS)
    seconds = sum(results[f"generate_seconds_{split}"] for split in SPLITS)
    return {"sampler": sampler, "spacing": spacing, "steps": steps,
            "unet_evaluations": unet_evaluations(pipe, sampler, steps),
            "seconds_per_image": round(seconds / images, 4), "results": results}


def sweep_settings(pipe, per_category: int, seed: int) -> dict:
    """What a row's numbers depend on besides its key: a resumed sweep must match all of it."""
    from ..generate import stage_hashes

    return {"stages": stage_hashes(pipe), "per_category": per_category, "seed": seed,
            "guidance_scale": pipe.sampling.guidance_scale, "steps_offset": pipe.sampling.steps_offset}


def load_sweep(path: str | Path, settings: dict) -> dict:
    """The sweep in `path` (refused if it was run with other settings), or a new, empty one."""
    path = Path(path)
    if not path.is_file():
        return {"kind": KIND, "settings": settings, "rows": []}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--out {path}: cannot read it as a sweep ({err}); pass another --out") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise ConfigError(f"--out {path} holds something other than a sweep; pass another --out")
    if data.get("settings") != settings:
        old = data.get("settings") or {}
        differ = sorted(k for k in settings.keys() | old.keys() if settings.get(k) != old.get(k))
        raise ConfigError(f"--out {path} holds a sweep with other settings ({', '.join(differ)} differ); "
                          f"pass another --out, or delete it to start again")
    return data


def check_sweep_arguments(args: argparse.Namespace, samplers: list[str]) -> None:
    """Refuse bad flags before the pipeline loads."""
    if not args.out:
        raise ConfigError("--sweep needs --out FILE: rows are written there as they finish, and a rerun resumes")
    if args.steps is not None or args.sampler is not None:
        raise ConfigError("--sweep sets each row's steps and sampler: use --sweep-steps and --samplers, "
                          "not --steps and --sampler")
    for sampler in samplers:
        check_sampler(sampler, "--samplers")
    for spacing in args.spacings or ():
        check_choice("--spacings", spacing, SPACINGS)
    if not args.sweep_steps or min(args.sweep_steps + [args.reference_steps]) < 1:
        raise ConfigError("--sweep-steps and --reference-steps: step counts must be at least 1")
    if args.per_category < 1:
        raise ConfigError(f"--per-category must be at least 1, got {args.per_category}")


def run_sweep(args: argparse.Namespace) -> dict:
    from ..generate import load_pipeline

    samplers = args.samplers or list(sampler_names())
    check_sweep_arguments(args, samplers)
    pipe = load_pipeline(args.pipeline, args.device)
    if args.cfg is not None:
        pipe.with_sampling({"guidance_scale": args.cfg})
    reference = (REFERENCE_SAMPLER, pipe.sampling.spacing, args.reference_steps)
    keys = sweep_keys(samplers, args.spacings or [pipe.sampling.spacing], args.sweep_steps, reference)
    data = load_sweep(args.out, sweep_settings(pipe, args.per_category, args.seed))
    done = {row_key(row) for row in data["rows"]}
    if done & set(keys):
        print(f"resuming: {len(done & set(keys))} of {len(keys)} rows are in {args.out} already", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for number, key in enumerate(keys, 1):
        if key in done:
            continue
        first = "autoencoder_ceiling" not in data
        row = evaluate_row(pipe, key, args.per_category, args.seed, ceiling=first)
        if first:
            data["autoencoder_ceiling"] = {split: row["results"].pop(f"autoencoder_ceiling_{split}")
                                           for split in SPLITS}
        data["rows"].append(row)
        atomic_write_json(args.out, data)
        print(f"[{number}/{len(keys)}] {key[0]}, {key[1]}, {key[2]} steps: judge mean "
              f"{' / '.join(f'{mean_score(row, split):.2f}' for split in SPLITS)}, "
              f"CLIP-FID {row['results']['fid_clip']:.2f}", flush=True)
    rows = {row_key(row): row for row in data["rows"]}
    swept = [rows[key] for key in keys]
    data["cheapest"] = {str(limit): cheapest(swept, rows[reference], limit) for limit in (CLOSE, NEAR)}
    atomic_write_json(args.out, data)
    print(format_sweep_table(swept, reference, data.get("autoencoder_ceiling")))
    return data


# -- the table ----------------------------------------------------------------------------------------

def mean_score(row: dict, split: str) -> float:
    return sum(row["results"][split][c] for c in CATEGORIES) / len(CATEGORIES)


def largest_drop(row: dict, reference: dict) -> float:
    """How far the row falls below the reference in its worst category and split (negative: above everywhere)."""
    return max(reference["results"][split][c] - row["results"][split][c] for split in SPLITS for c in CATEGORIES)


def within(row: dict, reference: dict, limit: float) -> bool:
    return largest_drop(row, reference) <= limit + 1e-9  # scores are fractions: no rounding noise beyond this


def cheapest(rows: list[dict], reference: dict, limit: float) -> dict | None:
    """The key and cost of the row (not the reference) with the fewest UNet evaluations within `limit` of the
    reference on every category; ties go to the smaller drop, then the faster row."""
    candidates = [row for row in rows if row_key(row) != row_key(reference) and within(row, reference, limit)]
    if not candidates:
        return None
    best = min(candidates, key=lambda r: (r["unet_evaluations"], largest_drop(r, reference), r["seconds_per_image"]))
    return {"sampler": best["sampler"], "spacing": best["spacing"], "steps": best["steps"],
            "unet_evaluations": best["unet_evaluations"], "largest_drop": round(largest_drop(best, reference), 4)}


def mark(row: dict, reference: dict) -> str:
    if row_key(row) == row_key(reference):
        return "reference"
    return next((f"✓ {limit}" for limit in (CLOSE, NEAR) if within(row, reference, limit)), "")


def format_sweep_table(rows: list[dict], reference: Key, ceiling: dict | None = None) -> str:
    """A Markdown table of the rows (each category: train / held-out), the rows within CLOSE and NEAR of the
    reference marked, and the cheapest of each named."""
    ref = next(row for row in rows if row_key(row) == tuple(reference))
    header = ["sampler", "spacing", "steps", "UNet evals / image", *(c.replace("_", " ") for c in CATEGORIES),
              "mean", "largest drop", "CLIP-FID", "s / image", "within"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        scores = row["results"]
        cells = [row["sampler"], row["spacing"], str(row["steps"]), str(row["unet_evaluations"]),
                 *(f"{scores['train'][c]:.2f} / {scores['heldout'][c]:.2f}" for c in CATEGORIES),
                 " / ".join(f"{mean_score(row, split):.2f}" for split in SPLITS),
                 f"{largest_drop(row, ref):.2f}", f"{scores['fid_clip']:.2f}", f"{row['seconds_per_image']:.3f}",
                 mark(row, ref)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nEach category: train / held-out judge score. Largest drop: the most any category falls below "
                 f"the reference ({ref['sampler']}, {ref['spacing']}, {ref['steps']} steps) on either split; "
                 f"✓ {CLOSE} / ✓ {NEAR}: no category drops more than that.")
    for limit in (CLOSE, NEAR):
        best = cheapest(rows, ref, limit)
        named = ("none" if best is None else f"{best['sampler']}, {best['spacing']} spacing, {best['steps']} steps "
                 f"({best['unet_evaluations']} UNet evaluations per image, largest drop {best['largest_drop']:.2f})")
        lines.append(f"Cheapest within {limit} of the reference on every category: {named}")
    if ceiling:
        lines.append("Autoencoder ceiling, mean over categories: " + " / ".join(
            f"{sum(ceiling[split][c] for c in CATEGORIES) / len(CATEGORIES):.2f}" for split in SPLITS)
            + " (train / held-out)")
    return "\n".join(lines)
