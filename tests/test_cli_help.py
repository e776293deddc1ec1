"""Every `latentdiff CMD --help` answers without importing torch (so at once: torch alone takes seconds)."""
import inspect
import subprocess
import sys

import pytest

from latentdiff.cli import COMMANDS

NO_TORCH = "import sys; sys.modules['torch'] = None; from latentdiff.cli import main; main({argv!r})"


@pytest.mark.parametrize("argv", [["--help"]] + [[command, "--help"] for command in COMMANDS],
                         ids=lambda argv: " ".join(argv))
def test_help_does_not_import_torch(argv):
    """With torch made unimportable, help is printed and the command exits 0."""
    result = subprocess.run([sys.executable, "-c", NO_TORCH.format(argv=argv)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: latentdiff {argv[0] if argv[0] != '--help' else ''}".rstrip())


def test_eval_names_load_lazily_and_clip_score_stays_the_function():
    """latentdiff.eval.clip_score is the function, though importing eval/clip_score.py binds the module."""
    import importlib

    import latentdiff.eval

    importlib.import_module("latentdiff.eval.clip_score")
    from latentdiff.eval import clip_score, retrieval_accuracy

    assert inspect.isfunction(clip_score) and inspect.isfunction(retrieval_accuracy)
    assert latentdiff.eval.clip_score is clip_score
    assert inspect.ismodule(sys.modules["latentdiff.eval.clip_score"])
    with pytest.raises(AttributeError, match="latentdiff.eval' has no attribute 'nothing'"):
        latentdiff.eval.nothing  # noqa: B018
