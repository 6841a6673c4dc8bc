"""The command line: --help teaches every command; scenes, explain and caption run."""
from __future__ import annotations

import subprocess
import sys

import pytest

from seqloss.cli import parser

COMMANDS = ("train", "evaluate", "caption", "compare", "explain", "scenes", "bench")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        parser().parse_args([command, "--help"])
    assert done.value.code == 0
    assert command in capsys.readouterr().out


def test_top_level_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "seqloss", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(c in out for c in COMMANDS)


def test_scenes_explain_and_caption_run(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from seqloss.cli import main
    from seqloss.workbench.model import new_captioner
    from seqloss.workbench.tokenizer import scene_tokenizer

    main(["scenes", "--out", str(tmp_path / "scenes"), "--n", "3"])
    image = sorted((tmp_path / "scenes").glob("*.png"))[0]
    new_captioner(scene_tokenizer()).save(tmp_path / "model")
    main(["explain", "--model", str(tmp_path / "model"), "--image", str(image), "--caption", "a red circle",
          "--out", str(tmp_path / "explain.png")])
    assert (tmp_path / "explain.png").stat().st_size > 0
    main(["caption", "--model", str(tmp_path / "model"), "--beams", "1", str(image)])
