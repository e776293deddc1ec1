"""The command line: key=value overrides and prompts may sit before, between or after flags."""
import pytest

from latentdiff.cli import parse_command_line


def test_overrides_may_follow_and_precede_flags():
    args = parse_command_line(["train-diffusion", "train.lr=1e-4", "--steps", "500", "model.ch=32",
                               "--out", "run", "train.ema_decay=0.99"])
    assert args.command == "train-diffusion"
    assert args.steps == 500 and args.out == "run"
    assert args.overrides == ["train.lr=1e-4", "model.ch=32", "train.ema_decay=0.99"]


def test_prompts_may_sit_between_flags():
    args = parse_command_line(["generate", "a red circle", "--steps", "4", "a blue square", "--seed", "3"])
    assert args.prompt == ["a red circle", "a blue square"]
    assert args.steps == 4 and args.seed == 3


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["train-diffusion", "--no-such-flag"]])
def test_bad_command_lines_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_command_line(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err
