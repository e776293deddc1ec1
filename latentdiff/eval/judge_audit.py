"""Auditing the shapes judge on generated images: the judge's verdicts against a person's reading.

    python scripts/judge_audit.py make --pipeline weights/diffusion --per-category 20 --out audit
    (look at audit/sheets/*.png, write audit/human.jsonl)
    python scripts/judge_audit.py score audit
    python scripts/judge_audit.py rejudge audit   (after a change to the judge; then score again)

`make` generates the images of `latentdiff eval`'s suite (both splits, the same prompts and seeds,
so the audited images are the evaluated ones) and writes AUDIT/images/NNNN.png; AUDIT/audit.jsonl,
one line per image: {"id", "split", "category", "prompt", "judge": "pass"|"fail", "detected": [...]}
(what the judge found, e.g. "red circle, large, top left, box 2,3-16,17"); and AUDIT/sheets/
sheet-KK.png, contact sheets of 20 images (ids 20*KK ...), each image enlarged to 128x128, its id
above and its prompt below. The sheets do not show the judge's verdict, so it cannot sway the reader;
a reader gets images/, sheets/ and AUDIT/prompts.jsonl (each image's id, split, category and prompt,
no verdict), never audit.jsonl.

The reader writes AUDIT/human.jsonl, one line per image read: {"id": 17, "pass": true, "note": "..."}
("note" optional; "pass": null, or no line, counts as not read yet). "pass" says whether the image
satisfies its prompt under its category's rule, the one the judge applies (geneval.category_correct):

  single_object   exactly one object, of the named colour and shape, its centre in the named cell
                  of a 3x3 grid ("top" is the top middle cell, "left" the middle left, "center" the
                  middle); its size too when the prompt names one (small ~ 0.28, large ~ 0.44 of the side)
  two_objects     both named shapes are there; colours do not matter, other objects are allowed
  counting        exactly N objects of the named shape, whatever their colour; other shapes are allowed
  colours         at least one object of the named shape, and every object of that shape has the named colour
  position        both named shapes are there and the first is wholly above / below / left of / right of
                  the second (a small overlap, a quarter of the smaller side, is allowed); colours do not matter
  colour_binding  each named colour is on its own named shape (a red circle AND a green square, not swapped);
                  other objects are allowed

A shape too malformed to name counts as absent. `score` compares the two readings: agreement per
category and split, overall, and every disagreement with what the judge saw, as Markdown. A second
reader, who sees neither the judge's verdicts nor the first reader's, writes AUDIT/human2.jsonl the
same way; `score` then also prints how far the two readers agree with each other (the most a judge
can be expected to reach) and how far the judge agrees with the verdicts they share.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from ..checkpoint import atomic_write_bytes
from ..data.shapes import SPLITS
from ..errors import ConfigError, LatentDiffError
from ..grid import PAD, label_font
from .geneval import CATEGORIES, build_prompt_suite, category_correct
from .judge import judge_image
from .judge_segment import DetectedObject

SHEET_COLUMNS, SHEET_ROWS = 5, 4
TILE = 128  # side of each image on a contact sheet, pixels
SUITE_FILE = "suite.json"  # the suite's per_category and seed, so that `rejudge` finds each image's sample
SECOND_READING = "human2.jsonl"  # a second reader's verdicts, when there are some
PROMPTS_FILE = "prompts.jsonl"  # each image's prompt and category without the judge's verdict, for readers
READER_KEYS = ("id", "split", "category", "prompt")


def describe(obj: DetectedObject) -> str:
    x0, y0, x1, y1 = obj.box
    colour = "/".join(obj.colours) or f"blotched {obj.colour}"  # answers to no colour (judge_segment)
    return f"{colour} {obj.shape}, {obj.size}, {obj.region}, box {x0},{y0}-{x1},{y1}"


def make_audit(pipe, out: str | Path, per_category: int, seed: int = 0, batch_size: int = 64,
               **sampling) -> list[dict]:
    """Generate, judge and save the eval suite's images of both splits (see the module doc); the records."""
    from .evaluate import generate_for  # torch and the models: not for --help

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, images = [], []
    for split in SPLITS:
        suite = build_prompt_suite(split, per_category, seed)
        for (category, sample), image in zip(suite, generate_for(pipe, suite, seed, batch_size, **sampling)):
            records.append({"id": len(records), "split": split, "category": category, "prompt": sample.caption,
                            **judge_record(category, sample, image)})
            image.save(out / "images" / f"{records[-1]['id']:04d}.png")
            images.append(image)
    (out / SUITE_FILE).write_text(json.dumps({"per_category": per_category, "seed": seed}) + "\n")
    (out / "audit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / PROMPTS_FILE).write_text("".join(json.dumps({k: r[k] for k in READER_KEYS}) + "\n" for r in records))
    (out / "sheets").mkdir(exist_ok=True)
    per_sheet = SHEET_COLUMNS * SHEET_ROWS
    for k in range(0, len(records), per_sheet):
        chunk = records[k:k + per_sheet]
        sheet = contact_sheet(images[k:k + per_sheet], [f"{r['id']:04d}" for r in chunk], [r["prompt"] for r in chunk])
        sheet.save(out / "sheets" / f"sheet-{k // per_sheet:02d}.png")
    return records


def judge_record(category: str, sample, image) -> dict:
    """The judge's side of an audit record: its category verdict and what it detected."""
    verdict = judge_image(image, sample)
    return {"judge": "pass" if category_correct(category, sample, verdict) else "fail",
            "detected": [describe(obj) for obj in verdict.detected]}


def rejudge_audit(out: str | Path) -> list[dict]:
    """Judge an audit's saved images again with the judge as it is now (after a fix to it), rewriting
    audit.jsonl; records whose image is not kept are dropped. The human readings stay valid: same images."""
    out = Path(out)
    try:
        suite_args = json.loads((out / SUITE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{out / SUITE_FILE}: unreadable ({err}); was the audit made by `make`?") from None
    suites = {split: build_prompt_suite(split, suite_args["per_category"], suite_args["seed"]) for split in SPLITS}
    records = []
    for record in read_jsonl(out / "audit.jsonl"):
        image_path = out / "images" / f"{record['id']:04d}.png"
        if not image_path.is_file():
            continue
        first = 0 if record["split"] == SPLITS[0] else len(suites[SPLITS[0]])  # ids run through the splits in order
        category, sample = suites[record["split"]][record["id"] - first]
        with Image.open(image_path) as image:
            records.append({**record, **judge_record(category, sample, image.convert("RGB"))})
    atomic_write_bytes(out / "audit.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    return records


def wrap_text(text: str, font, width: int) -> list[str]:
    """Words in lines no wider than `width` pixels (a single long word keeps its own line)."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = []
    for word in text.split():
        if lines and measure.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def contact_sheet(images: Sequence[Image.Image], labels: Sequence[str], captions: Sequence[str]) -> Image.Image:
    """Up to SHEET_COLUMNS x SHEET_ROWS images enlarged to TILE (nearest neighbour), label above, caption below."""
    label_size, caption_size = 14, 11
    label_font_, caption_font = label_font(label_size), label_font(caption_size)
    wrapped = [wrap_text(caption, caption_font, TILE) for caption in captions]
    caption_h = max(len(lines) for lines in wrapped) * (caption_size + 2)
    cell_w, cell_h = TILE + 2 * PAD, label_size + 4 + TILE + PAD + caption_h + 2 * PAD
    rows = -(-len(images) // SHEET_COLUMNS)
    sheet = Image.new("RGB", (SHEET_COLUMNS * cell_w + PAD, rows * cell_h + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (image, label, lines) in enumerate(zip(images, labels, wrapped)):
        row, col = divmod(k, SHEET_COLUMNS)
        left, top = PAD + col * cell_w, PAD + row * cell_h
        draw.text((left, top), label, fill="black", font=label_font_)
        top += label_size + 4
        sheet.paste(image.convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST), (left, top))
        draw.rectangle((left - 1, top - 1, left + TILE, top + TILE), outline=(170, 170, 170))  # the image's edge
        for i, line in enumerate(lines):
            draw.text((left, top + TILE + PAD + i * (caption_size + 2)), line, fill=(60, 60, 60), font=caption_font)
    return sheet


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} is not a file")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not JSON lines ({err})") from None


def read_human(path: str | Path, ids: set[int]) -> dict[int, dict]:
    """{id: line} of the human verdicts that are given ("pass" true or false), checked against the audit's ids."""
    human = {}
    for line in read_jsonl(path):
        if not isinstance(line, dict):
            raise ConfigError(f"{path}: a line is not an object like {{\"id\": 17, \"pass\": true}}")
        if not isinstance(line.get("id"), int) or line["id"] not in ids:
            raise ConfigError(f"{path}: id {line.get('id')!r} is not an image of this audit")
        if line["id"] in human:
            raise ConfigError(f"{path}: id {line['id']} is given twice")
        if line.get("pass") not in (True, False, None):
            raise ConfigError(f"{path}: id {line['id']}: \"pass\" must be true, false or null")
        if line.get("pass") is not None:
            human[line["id"]] = line
    return human


def score_audit(records: Sequence[dict], human: dict[int, dict]) -> dict:
    """Agreement of the judge with the human verdicts, per category and split and overall, over the images
    read; the pass rates of both; and the disagreements."""
    agree, total, judge_pass, human_pass = Counter(), Counter(), Counter(), Counter()
    disagreements = []
    for record in records:
        if record["id"] not in human:
            continue
        judged, read = record["judge"] == "pass", human[record["id"]]["pass"]
        for key in ((c, s) for c in (record["category"], "all") for s in (record["split"], "all")):
            total[key] += 1
            agree[key] += judged == read
            judge_pass[key] += judged
            human_pass[key] += read
        if judged != read:
            disagreements.append({**record, "human": "pass" if read else "fail",
                                  "note": human[record["id"]].get("note", "")})

    def cell(key) -> dict:
        return {"agree": agree[key], "total": total[key], "judge_pass": judge_pass[key], "human_pass": human_pass[key]}

    per_category = {c: {s: cell((c, s)) for s in (*SPLITS, "all")} for c in (*CATEGORIES, "all")}
    overall = per_category.pop("all")
    return {"per_category": per_category, "overall": overall, "read": len(human),
            "unread": len(records) - len(human), "disagreements": disagreements}


def consensus(first: dict[int, dict], second: dict[int, dict]) -> dict[int, dict]:
    """The verdicts two readers agree on ({id: first's line}), the images both read."""
    return {i: line for i, line in first.items() if i in second and second[i]["pass"] == line["pass"]}


def compare_readings(records: Sequence[dict], first: dict[int, dict], second: dict[int, dict]) -> dict:
    """With a second reading: the judge against each reader, the readers against each other (how far
    two people agree bounds what a judge can), and the judge against the verdicts both readers share."""
    first_as_judge = [{**r, "judge": "pass" if first[r["id"]]["pass"] else "fail"} for r in records if r["id"] in first]
    return {"judge vs reader 1": score_audit(records, first), "judge vs reader 2": score_audit(records, second),
            "reader 1 vs reader 2": score_audit(first_as_judge, second),
            "judge vs both readers where they agree": score_audit(records, consensus(first, second))}


def format_comparison(comparison: dict) -> str:
    """One row per comparison, agreement per category (train and held-out together) and overall."""
    lines = ["| agreement | " + " | ".join(c.replace("_", " ") for c in CATEGORIES) + " | all |",
             "|---|" + "---|" * (len(CATEGORIES) + 1)]
    for name, report in comparison.items():
        cells = [report["per_category"][c]["all"] for c in CATEGORIES] + [report["overall"]["all"]]
        lines.append(f"| {name} | " + " | ".join(_share(c["agree"], c["total"]) for c in cells) + " |")
    return "\n".join(lines)


def _share(hits: int, total: int) -> str:
    return f"{hits}/{total} ({100 * hits / total:.0f}%)" if total else "–"


def format_report(report: dict) -> str:
    """The agreement table and the disagreements, as Markdown."""
    lines = ["| category | train split | held-out | all | judge pass / human pass |", "|---|---|---|---|---|"]
    rows = [(c.replace("_", " "), report["per_category"][c]) for c in CATEGORIES]
    for name, cells in rows + [("**overall**", report["overall"])]:
        shares = " | ".join(_share(cells[s]["agree"], cells[s]["total"]) for s in (*SPLITS, "all"))
        lines.append(f"| {name} | {shares} | {cells['all']['judge_pass']} / {cells['all']['human_pass']} |")
    lines.append(f"\n{report['read']} images read" + (f", {report['unread']} not yet" if report["unread"] else "")
                 + f"; {len(report['disagreements'])} disagreements.")
    if report["disagreements"]:
        lines += ["", "| id | split | category | prompt | judge | human | note | the judge saw |",
                  "|---|---|---|---|---|---|---|---|"]
        for d in report["disagreements"]:
            seen = "; ".join(d["detected"]) or "nothing"
            lines.append(f"| {d['id']} | {d['split']} | {d['category']} | {d['prompt']} | {d['judge']} | "
                         f"{d['human']} | {d['note']} | {seen} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from .command import add_suite_arguments

    parser = argparse.ArgumentParser(prog="judge_audit.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    make = sub.add_parser("make", help="generate, judge and lay out the eval suite's images",
                          conflict_handler="resolve")  # eval's flags, with --out an audit folder
    add_suite_arguments(make)
    make.add_argument("--out", required=True, metavar="AUDIT_DIR", help="folder for images/, sheets/, audit.jsonl")
    make.add_argument("--batch-size", type=int, default=64)
    rejudge = sub.add_parser("rejudge", help="judge AUDIT_DIR's images again with the current judge")
    rejudge.add_argument("audit", metavar="AUDIT_DIR")
    score = sub.add_parser("score", help="agreement of the judge with AUDIT_DIR/human.jsonl (or --human)")
    score.add_argument("audit", metavar="AUDIT_DIR")
    score.add_argument("--human", help="the human verdicts (default: AUDIT_DIR/human.jsonl)")
    score.add_argument("--second", help="a second reader's verdicts, read without seeing the first's "
                                        f"(default: AUDIT_DIR/{SECOND_READING} where there is one)")
    score.add_argument("--json", metavar="OUT", help="also write the report as JSON to this file")
    return parser


def run(args: argparse.Namespace) -> None:
    if args.command == "make":
        from ..generate import load_pipeline

        if args.per_category < 1:
            raise ConfigError(f"--per-category must be at least 1, got {args.per_category}")
        sampling = {k: v for k, v in {"num_inference_steps": args.steps, "guidance_scale": args.cfg,
                                      "sampler": args.sampler}.items() if v is not None}
        records = make_audit(load_pipeline(args.pipeline, args.device), args.out, args.per_category, args.seed,
                             args.batch_size, **sampling)
        print(f"{len(records)} images, audit.jsonl and contact sheets in {args.out}")
        return
    if args.command == "rejudge":
        records = rejudge_audit(args.audit)
        print(f"judged {len(records)} images again; audit.jsonl rewritten")
        return
    records = read_jsonl(Path(args.audit) / "audit.jsonl")
    ids = {r["id"] for r in records}
    human = read_human(args.human or Path(args.audit) / "human.jsonl", ids)
    report = score_audit(records, human)
    print(format_report(report))
    second = args.second or Path(args.audit) / SECOND_READING
    if args.second or Path(second).is_file():
        comparison = compare_readings(records, human, read_human(second, ids))
        print("\nWith a second reading (" + str(second) + "):\n\n" + format_comparison(comparison))
        report["second_reading"] = comparison
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except LatentDiffError as err:
        print(f"judge_audit.py {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
