"""`latentdiff eval --sweep` on a tiny random pipeline: one row per (sampler, spacing, steps) and the reference,
UNet evaluations counted, resumed after an interruption, and the table's marks on hand-made results."""
import json

import pytest
from tiny_stages import save_stages

from latentdiff.cli import main
from latentdiff.eval import sweep
from latentdiff.eval.geneval import CATEGORIES
from latentdiff.pipeline import Text2ImagePipeline


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return save_stages(tmp_path_factory.mktemp("sweep"))


def test_unet_evaluations_are_counted_heun_twice_a_step_but_the_last(stages):
    pipe = Text2ImagePipeline.from_pretrained(stages["unet"])
    assert sweep.unet_evaluations(pipe, "euler", 3) == 3
    assert sweep.unet_evaluations(pipe, "dpmpp_2m", 3) == 3
    assert sweep.unet_evaluations(pipe, "heun", 3) == 5  # Euler on the step to σ = 0
    pipe.with_sampling({"guidance_scale": 1.0})
    assert sweep.unet_evaluations(pipe, "heun", 4) == 7


def test_sweep_writes_a_row_per_combination_and_resumes(stages, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep.json"
    own = Text2ImagePipeline.from_pretrained(stages["unet"]).sampling.spacing
    other = "trailing" if own != "trailing" else "leading"
    argv = ["eval", "--sweep", "--pipeline", str(stages["unet"]), "--samplers", "euler,heun", "--sweep-steps", "2",
            "--reference-steps", "3", "--per-category", "1", "--out", str(out)]
    calls = []

    def counting(*args, interrupt_at=None, **kwargs):
        calls.append(kwargs)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    evaluate = sweep.evaluate
    monkeypatch.setattr(sweep, "evaluate", lambda *a, **k: counting(*a, interrupt_at=2, **k))
    assert main(argv) == 130  # interrupted during the second row: the first (the reference) is kept
    rows = json.loads(out.read_text())["rows"]
    assert [sweep.row_key(r) for r in rows] == [("dpmpp_2m", own, 3)]
    assert calls[0]["ceiling"] is True

    calls.clear()
    monkeypatch.setattr(sweep, "evaluate", counting)
    assert main(argv) == 0
    assert [(c["sampler"], c["num_inference_steps"], c["ceiling"]) for c in calls] == [("euler", 2, False),
                                                                                     ("heun", 2, False)]
    data = json.loads(out.read_text())
    assert {sweep.row_key(r) for r in data["rows"]} == {("dpmpp_2m", own, 3), ("euler", own, 2), ("heun", own, 2)}
    evals = {r["sampler"]: r["unet_evaluations"] for r in data["rows"]}
    assert evals == {"dpmpp_2m": 3, "euler": 2, "heun": 3}
    assert set(data["autoencoder_ceiling"]["heldout"]) == set(CATEGORIES)
    assert all("autoencoder_ceiling_train" not in r["results"] for r in data["rows"])
    table = capsys.readouterr().out
    assert "| heun | " in table and "| reference |" in table

    calls.clear()
    assert main(argv) == 0  # finished: nothing to do
    assert calls == []
    assert main(argv + ["--spacings", f"{own},{other}"]) == 0  # only the new spacing's rows
    assert [(c["sampler"], c["ceiling"]) for c in calls] == [("euler", False), ("heun", False)]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 5 and {sweep.row_key(r) for r in rows[3:]} == {("euler", other, 2), ("heun", other, 2)}

    calls.clear()
    assert main(argv[:-4] + ["--per-category", "2", "--out", str(out)]) == 2  # other settings: refused
    assert "other settings (per_category differ)" in capsys.readouterr().err and calls == []


@pytest.mark.parametrize("extra, message", [
    (["--samplers", "euler,nope"], "unknown sampler 'nope'"),
    (["--spacings", "sideways"], "'sideways' is not one of"),
    (["--steps", "4"], "use --sweep-steps and --samplers"),
    (["--sweep-steps", "0,4"], "at least 1"),
])
def test_sweep_refuses_bad_flags_before_loading(tmp_path, capsys, extra, message):
    argv = ["eval", "--sweep", "--pipeline", str(tmp_path / "missing"), "--out", str(tmp_path / "s.json")]
    assert main(argv + extra) == 2
    assert message in capsys.readouterr().err
    assert main(argv[:-2]) == 2 and "--sweep needs --out" in capsys.readouterr().err


def made_row(sampler, steps, evals, drop=0.0, spacing="trailing", base=0.9):
    """A row scoring `base` in every category, but `drop` lower in held-out colours."""
    train = {c: base for c in CATEGORIES}
    heldout = {**train, "colours": base - drop}
    return {"sampler": sampler, "spacing": spacing, "steps": steps, "unet_evaluations": evals,
            "seconds_per_image": 0.01 * evals, "results": {"train": train, "heldout": heldout, "fid_clip": 1.0}}


def test_table_marks_rows_near_the_reference_and_names_the_cheapest():
    reference = made_row("dpmpp_2m", 100, 100)
    rows = [reference, made_row("heun", 10, 19), made_row("euler", 8, 8, drop=0.02), made_row("ddim", 4, 4, drop=0.04),
            made_row("euler_a", 2, 2, drop=0.3), made_row("dpmpp_2m", 6, 6, drop=-0.1)]
    table = sweep.format_sweep_table(rows, ("dpmpp_2m", "trailing", 100))
    lines = {line.split(" | ")[0] + " " + line.split(" | ")[2]: line for line in table.splitlines() if line[:2] == "| "}
    assert lines["| dpmpp_2m 100"].endswith("| reference |")
    assert lines["| heun 10"].endswith("| ✓ 0.02 |") and "| 19 |" in lines["| heun 10"]
    assert lines["| euler 8"].endswith("| ✓ 0.02 |")  # a drop of exactly 0.02 is within
    assert lines["| ddim 4"].endswith("| ✓ 0.05 |") and "| 0.04 |" in lines["| ddim 4"]
    assert lines["| euler_a 2"].endswith("|  |") and "| 0.30 |" in lines["| euler_a 2"]
    assert "| 0.90 / 0.60 |" in lines["| euler_a 2"]  # colours: train / held-out
    # better than the reference is within too, and the cheapest within 0.02: fewest UNet evaluations wins
    assert "within 0.02 of the reference on every category: dpmpp_2m, trailing spacing, 6 steps (6 UNet" in table
    assert "within 0.05 of the reference on every category: ddim, trailing spacing, 4 steps (4 UNet" in table
    assert sweep.cheapest(rows[:2], reference, 0.02)["sampler"] == "heun"
    assert sweep.cheapest([reference, rows[4]], reference, 0.05) is None
