"""scripts/judge_audit.py on a tiny random pipeline: `make` writes the eval suite's images, their judged
records and contact sheets; `score` counts the judge's agreement with a hand-made human file."""
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from tiny_stages import save_stages

from latentdiff.eval.evaluate import generate_for
from latentdiff.eval.geneval import CATEGORIES, build_prompt_suite
from latentdiff.eval.judge_audit import (
    SHEET_COLUMNS, TILE, compare_readings, consensus, contact_sheet, main, read_human, rejudge_audit,
    wrap_text,
)
from latentdiff.grid import PAD, label_font
from latentdiff.pipeline import Text2ImagePipeline

PER_CATEGORY = 2  # 2 splits x 6 categories x 2 = 24 images: two sheets, the second of 4


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    stages = save_stages(root / "stages")
    out = root / "audit"
    assert main(["make", "--pipeline", str(stages["unet"]), "--per-category", str(PER_CATEGORY),
                 "--steps", "2", "--out", str(out)]) == 0
    return stages, out


def records_of(out):
    return [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]


def test_make_writes_images_records_and_sheets(audit):
    _, out = audit
    n = 2 * len(CATEGORIES) * PER_CATEGORY
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:04d}.png" for i in range(n)]
    assert sorted(p.name for p in (out / "sheets").iterdir()) == ["sheet-00.png", "sheet-01.png"]
    records = records_of(out)
    assert [r["id"] for r in records] == list(range(n))
    suite = build_prompt_suite("train", PER_CATEGORY) + build_prompt_suite("heldout", PER_CATEGORY)
    assert [(r["category"], r["prompt"]) for r in records] == [(c, s.caption) for c, s in suite]
    assert [r["split"] for r in records] == ["train"] * (n // 2) + ["heldout"] * (n // 2)
    for record in records:
        assert record["judge"] in ("pass", "fail")
        assert isinstance(record["detected"], list) and all(isinstance(d, str) for d in record["detected"])
    readable = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert readable == [{k: r[k] for k in ("id", "split", "category", "prompt")} for r in records]  # no verdicts
    with Image.open(out / "sheets" / "sheet-01.png") as last:  # 4 images: one row
        assert last.width == SHEET_COLUMNS * (TILE + 2 * PAD) + PAD


def test_audited_images_are_the_evaluated_ones(audit):
    stages, out = audit
    pipe = Text2ImagePipeline.from_pretrained(stages["unet"])
    # ids 12..23: the held-out suite, seeds from 0, in eval's batches (a batch of another size may differ
    # in the last bit of a float, and so by one in a pixel)
    suite = build_prompt_suite("heldout", PER_CATEGORY)
    for k, image in enumerate(generate_for(pipe, suite, 0, 64, num_inference_steps=2)):
        with Image.open(out / "images" / f"{len(suite) + k:04d}.png") as saved:
            assert saved.convert("RGB").tobytes() == image.convert("RGB").tobytes()


def test_score_counts_agreement_and_lists_disagreements(audit, tmp_path, capsys):
    _, out = audit
    records = records_of(out)
    human = [{"id": r["id"], "pass": r["judge"] == "pass"} for r in records]
    human[0] = {"id": 0, "pass": records[0]["judge"] != "pass", "note": "the circle is an egg"}  # disagrees
    human[1]["pass"] = None  # not read yet
    del human[2]             # nor this one
    (out / "human.jsonl").write_text("".join(json.dumps(h) + "\n" for h in human))
    report_file = tmp_path / "report.json"
    capsys.readouterr()
    assert main(["score", str(out), "--json", str(report_file)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(report_file.read_text())
    n = len(records)
    assert (report["read"], report["unread"]) == (n - 2, 2)
    assert report["overall"]["all"]["total"] == n - 2 and report["overall"]["all"]["agree"] == n - 3
    first = records[0]["category"]  # ids 0-2 are the train split's first category
    assert report["per_category"][first]["train"] == {
        "agree": PER_CATEGORY - 2, "total": PER_CATEGORY - 1,
        "judge_pass": sum(r["judge"] == "pass" for r in records[1:PER_CATEGORY] if r["id"] != 1),
        "human_pass": sum(h["pass"] for h in human if h["id"] < PER_CATEGORY and h["pass"] is not None)}
    assert report["per_category"][first]["heldout"]["agree"] == report["per_category"][first]["heldout"]["total"]
    [disagreement] = report["disagreements"]
    assert disagreement["id"] == 0 and disagreement["note"] == "the circle is an egg"
    assert disagreement["human"] != disagreement["judge"]
    assert "| id | split | category |" in printed and "the circle is an egg" in printed
    assert "| **overall** |" in printed and f"{n - 3}/{n - 2}" in printed


def test_a_second_reading_is_compared_with_the_first_and_the_judge(audit, tmp_path, capsys):
    _, out = audit
    records = records_of(out)
    first = [{"id": r["id"], "pass": r["judge"] == "pass"} for r in records]
    second = [dict(line) for line in first]
    second[0]["pass"] = not second[0]["pass"]  # the readers differ on image 0 only: the judge sides with the first
    (out / "human.jsonl").write_text("".join(json.dumps(h) + "\n" for h in first))
    (out / "human2.jsonl").write_text("".join(json.dumps(h) + "\n" for h in second))
    report_file = tmp_path / "report.json"
    capsys.readouterr()
    assert main(["score", str(out), "--json", str(report_file)]) == 0  # human2.jsonl is found on its own
    n = len(records)
    rows = json.loads(report_file.read_text())["second_reading"]
    agree = {name: (row["overall"]["all"]["agree"], row["overall"]["all"]["total"]) for name, row in rows.items()}
    assert agree == {"judge vs reader 1": (n, n), "judge vs reader 2": (n - 1, n), "reader 1 vs reader 2": (n - 1, n),
                     "judge vs both readers where they agree": (n - 1, n - 1)}
    assert "| reader 1 vs reader 2 |" in capsys.readouterr().out
    by_id = {h["id"]: h for h in first}
    assert set(consensus(by_id, {h["id"]: h for h in second})) == set(by_id) - {0}


@pytest.mark.parametrize("line", [{"id": 9999, "pass": True}, {"id": 0, "pass": "yes"}, "not json", "[1, 2]"])
def test_score_refuses_a_bad_human_file_in_one_line(audit, tmp_path, capsys, line):
    _, out = audit
    human = tmp_path / "human.jsonl"
    human.write_text((line if isinstance(line, str) else json.dumps(line)) + "\n")
    assert main(["score", str(out), "--human", str(human)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_contact_sheet_enlarges_by_nearest_neighbour_and_wraps_prompts():
    image = Image.new("RGB", (16, 16), "white")
    image.putpixel((0, 0), (215, 25, 35))
    sheet = contact_sheet([image] * 7, [f"{i:04d}" for i in range(7)], ["a large purple triangle above a small cyan star"] * 7)
    assert sheet.width == SHEET_COLUMNS * (TILE + 2 * PAD) + PAD
    font = label_font(11)
    assert len(wrap_text("a large purple triangle above a small cyan star", font, TILE)) > 1
    # the first column of tiles (two rows): each tile's top left 8x8 block is the red pixel, enlarged
    column = [sheet.getpixel((PAD + 3, y)) for y in range(sheet.height)]
    red = [y for y, rgb in enumerate(column) if rgb == (215, 25, 35)]
    scale = TILE // 16
    assert len(red) == 2 * scale and red[:scale] == list(range(red[0], red[0] + scale))


DATA = Path(__file__).parent / "data"


# Generated images read by eye, twice, by readers who saw neither the judge's verdicts nor each other's
# (human.jsonl, human2.jsonl; notes on every fail): an earlier quickstart-preset model (the held-out
# position and colour-binding images not kept), the README's ch-32 quickstart model, its UNet at 6,800 steps
# on the prompts of seed 1, the preset's quickstart model on the prompts of seed 2 and a run of the presets
# with the UNet trained 10,200 steps on those of seed 3 (the last two read after the judge's rules were settled: its out-of-sample
# check). The floors are what the judge reaches now (README: Results, the judge audit): a change to the
# judge must not agree less with either the first reader or both readers.
@pytest.mark.parametrize("folder, images, with_first, with_both", [
    ("judge_audit", 200, 180, 176), ("judge_audit_quickstart", 240, 224, 222), ("judge_audit_quality", 240, 235, 232),
    ("judge_audit_preset", 240, 223, 222), ("judge_audit_preset_quality", 240, 235, 235)])
def test_the_judge_agrees_with_the_recorded_readings_of_generated_images(tmp_path, folder, images, with_first, with_both):
    audit = shutil.copytree(DATA / folder, tmp_path / "audit")
    records = rejudge_audit(audit)
    ids = {r["id"] for r in records}
    first, second = read_human(audit / "human.jsonl", ids), read_human(audit / "human2.jsonl", ids)
    assert len(records) == len(first) == len(second) == images
    comparison = compare_readings(records, first, second)
    assert comparison["judge vs reader 1"]["overall"]["all"]["agree"] >= with_first
    assert comparison["judge vs both readers where they agree"]["overall"]["all"]["agree"] >= with_both
