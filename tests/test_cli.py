"""The command line: --help teaches every command (on a bare install too), user errors are one line and
exit 2, every objective is reachable with its options, and user data trains, evaluates and compares."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from seqloss.cli import main, parser

COMMANDS = ("train", "evaluate", "caption", "compare", "explain", "scenes", "bench")
EXTRAS = ("PIL", "transformers", "tokenizers", "accelerate", "pycocoevalcap", "matplotlib", "datasets", "tqdm")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        parser().parse_args([command, "--help"])
    assert done.value.code == 0
    assert command in capsys.readouterr().out


def test_top_level_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "seqloss", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(c in out for c in COMMANDS)


def test_help_works_without_the_extras_and_a_command_names_the_extra():
    """A bare install: the optional modules cannot be imported at all."""
    script = (f"import sys; sys.modules.update(dict.fromkeys({EXTRAS!r}))\n"
              "from seqloss.cli import main\n"
              "for argv in (['--help'], ['compare', '--help'], ['scenes', '--out', 'x']):\n"
              "    try:\n        main(argv)\n    except SystemExit as done:\n        print('exit', done.code)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.count("exit 0") == 2 and "exit 2" in done.stdout, done.stderr
    from seqloss.workbench.settings import CompareSettings
    steps = CompareSettings().stage1.steps
    assert f"(default: {steps})" in done.stdout  # the embedded settings are plain data, shown without the extras
    assert done.stderr.strip() == "seqloss: error: PIL is needed here: pip install 'seqloss[workbench]'"


def _fails(argv, capsys, match):
    """main(argv) exits with 2 after exactly one stderr line containing ``match``."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and match in err, err
    assert [line for line in err.splitlines() if line.strip()] == [err.strip()] and err.startswith("seqloss: error: ")
    return err


def test_compare_refuses_a_typo_before_any_training(tmp_path, capsys):
    _fails(["compare", "--objectives", "mle;typo", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path)],
           capsys, "unknown objective 'typo'")
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_debug_shows_the_traceback_instead(tmp_path):
    with pytest.raises(ValueError, match="unknown objective"):
        main(["--debug", "train", "--objective", "typo", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown objective"):
        main(["train", "--objective", "typo", "--out", str(tmp_path), "--debug"])


@pytest.mark.parametrize("argv, match", [
    (["train", "--objective", "mle", "--exclude-ids", "0"], "takes no exclude_ids"),
    (["train", "--objective", "subset"], "subset needs exactly one of include_ids"),
    (["train", "--model", "/no/such/model"], "is not a Hugging Face model directory"),
    (["train", "--data", "/no/such/data"], "does not exist"),
    (["train", "--eval-fraction", "0.2"], "applies to your data"),
    (["train", "--steps", "0"], "--steps: expected a whole number >= 1, got '0'"),
    (["train", "--steps", "-3"], "--steps: expected a whole number >= 1"),
    (["train", "--batch-size", "0"], "--batch-size: expected a whole number >= 1"),
    (["train", "--images", "0"], "--images: expected a whole number >= 1"),
    (["train", "--lr", "-1"], "--lr: expected a number > 0"),
    (["train", "--lr", "nan"], "--lr: expected a number > 0"),
    (["train", "--objective", "mle=0.5,mle=0.5"], "mle is weighted twice"),
    (["compare", "--stage1-steps", "0"], "--stage1-steps: expected a whole number >= 1"),
    (["compare", "--train-images", "0"], "--train-images: expected a whole number >= 1"),
    (["compare", "--objectives", "smile=0.99,mle=0.01,smile=0.5"], "smile is weighted twice"),
])
def test_user_errors_are_one_line_before_training(argv, tmp_path, capsys, match):
    _fails([*argv, "--out", str(tmp_path / "out")], capsys, match)
    assert not (tmp_path / "out").exists()


def test_a_missing_extra_is_named(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)
    _fails(["caption", "--model", str(tmp_path), str(tmp_path / "x.png")], capsys, "pip install 'seqloss[workbench]'")


# --- on real models and data -----------------------------------------------------------------------

CAPTIONS = ["A dog running on green grass.", "A brown dog chases a ball!", "Two kids fly a kite at the beach",
            "A red bus waits at the stop", "boats in the harbour at dusk", "a cat, asleep on the sofa",
            "A man rides a bicycle down the street", "fresh bread on a wooden table",
            "snow covers the quiet mountain village", "a yellow taxi in heavy traffic"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Ten everyday images with two captions each (an image folder)."""
    pytest.importorskip("transformers")
    from PIL import Image
    root = tmp_path_factory.mktemp("user")
    with open(root / "metadata.jsonl", "w") as meta:
        for i, caption in enumerate(CAPTIONS):
            Image.new("RGB", (16, 16), (25 * i, 120, 250 - 20 * i)).save(root / f"{i:02d}.png")
            meta.write(json.dumps({"file_name": f"{i:02d}.png", "text": [caption, f"photo {i}: {caption}"]}) + "\n")
    (root / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """A model trained from scratch on 80% of the folder, with the vocabulary of its captions."""
    out = tmp_path_factory.mktemp("run")
    main(["train", "--data", str(folder), "--eval-fraction", "0.2", "--out", str(out), "--steps", "2",
          "--batch-size", "4", "--save-steps", "2", "--objective", "selective_eos"])
    return out / "model"


def _held_out(folder):
    from seqloss.workbench.data import load_split
    return load_split(folder, eval_fraction=0.2)


def test_a_new_model_knows_every_word_of_its_training_captions(folder, trained):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(trained))
    train, held_out = _held_out(folder)
    for text in (t for record in train for t in record.captions):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer(tokenizer.decode(ids, skip_special_tokens=True))["input_ids"] == ids
    assert (tokenizer.pad_token_id, tokenizer.bos_token, tokenizer.eos_token) == (0, "[DEC]", "[SEP]")


def test_a_new_model_normalises_pixels_with_its_training_images(folder, trained):
    from transformers import BlipImageProcessor

    from seqloss.workbench.data import open_image
    from seqloss.workbench.model import PIXEL_SPREAD, pixel_statistics
    train, _ = _held_out(folder)
    mean, std = pixel_statistics([open_image(r.path) for r in train])
    processor = BlipImageProcessor.from_pretrained(str(trained))
    assert processor.image_mean == pytest.approx(mean)
    assert processor.image_std == pytest.approx([PIXEL_SPREAD * s for s in std])


def test_evaluate_scores_the_held_out_images_and_names_them(folder, trained, tmp_path, capsys):
    out = tmp_path / "eval.json"
    main(["evaluate", "--model", str(trained), "--data", str(folder), "--eval-fraction", "0.2", "--beams", "1",
          "--out", str(out)])
    result = json.loads(out.read_text())
    held_out = [r.file_name for r in _held_out(folder)[1]]
    assert [c["image"] for c in result["captions"]] == held_out and len(held_out) == 2
    assert "distinct_captions" in result["metrics"] and "attribute_recall" not in result["metrics"]
    assert "scoring 2 held-out images" in capsys.readouterr().out


def test_train_from_a_model_counts_the_words_it_does_not_know(folder, tmp_path, capsys):
    from seqloss.workbench.model import new_captioner
    from seqloss.workbench.tokenizer import scene_tokenizer
    new_captioner(scene_tokenizer()).save(tmp_path / "scenes-model")
    main(["train", "--data", str(folder), "--model", str(tmp_path / "scenes-model"), "--out", str(tmp_path / "out"),
          "--steps", "1", "--batch-size", "4", "--objective", "smile", "--exclude-ids", "0", "--no-first-token-mle"])
    out = capsys.readouterr().out
    assert "the model's tokenizer maps" in out and "to [UNK]" in out and "'dog'" in out


def test_caption_names_a_missing_or_corrupt_image(folder, trained, capsys):
    for name in ("nope.png", "broken.png"):
        _fails(["caption", "--model", str(trained), str(folder / name)], capsys, name)


def test_compare_on_user_data_reports_what_can_be_measured(folder, tmp_path, capsys):
    main(["compare", "--data", str(folder), "--eval-fraction", "0.2", "--objectives", "mle;selective_eos",
          "--stage1-steps", "2", "--stage2-steps", "1", "--out", str(tmp_path / "out"),
          "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for metrics in report["objectives"].values():
        assert "distinct_captions" in metrics and "bleu4" in metrics and "attribute_recall" not in metrics
    held_out = [r.file_name for r in _held_out(folder)[1]]
    assert [c["image"] for c in report["captions"]["selective_eos"]] == held_out
    assert "data-" in next((tmp_path / "cache").iterdir()).name  # cached by the user's data


def test_scenes_explain_and_caption_run(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from transformers import AutoTokenizer

    from seqloss.workbench.model import new_captioner
    from seqloss.workbench.tokenizer import scene_tokenizer

    main(["scenes", "--out", str(tmp_path / "scenes"), "--n", "3"])
    assert AutoTokenizer.from_pretrained(str(tmp_path / "scenes" / "tokenizer")).get_vocab() == scene_tokenizer().get_vocab()
    image = sorted((tmp_path / "scenes").glob("*.png"))[0]
    new_captioner(scene_tokenizer()).save(tmp_path / "model")
    main(["explain", "--model", str(tmp_path / "model"), "--image", str(image), "--caption", "a red circle",
          "--out", str(tmp_path / "explain.png")])
    assert (tmp_path / "explain.png").stat().st_size > 0
    main(["caption", "--model", str(tmp_path / "model"), "--beams", "1", str(image)])
    assert str(image) in capsys.readouterr().out


def test_compare_refuses_an_option_no_objective_takes(tmp_path, capsys):
    _fails(["compare", "--objectives", "mle;smile", "--num-samples", "3", "--out", str(tmp_path / "out")],
           capsys, "none of the objectives mle, smile takes it")


@pytest.mark.parametrize("extra, objective, options", [
    ([], "mle", {}),
    (["--exclude-ids", "0", "--no-first-token-mle"], "smile", {"exclude_ids": [0], "first_token_mle": False}),
    (["--num-samples", "4", "--exclude-ids", "0,1"], "random_subset", {"num_samples": 4, "exclude_ids": [0, 1]}),
    (["--exclude-ids", "0"], "reverse_subset", {"exclude_ids": [0]}),
    ([], "selective_eos", {"eos_token_id": 3}),                       # the tokenizer's [SEP] by default
    (["--eos-token-id", "7"], "selective_eos", {"eos_token_id": 7}),
    (["--include-ids", "6", "7"], "subset", {"include": [6, 7]}),
    (["--exclude-ids", "0", "--label-smoothing", "0.1"], "subset", {"exclude": [0], "label_smoothing": 0.1}),
    (["--exclude-ids", "0"], "mle=0.01,smile=0.99", {"exclude_ids": [0]}),
])
def test_every_objective_reaches_training_with_its_options(extra, objective, options, monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    from seqloss.workbench import train as train_module
    from seqloss.workbench.objectives import loss_options
    from seqloss.workbench.tokenizer import end_of_caption_id
    seen = {}

    def fake_train(captioner, images, captions, settings, out_dir, **kwargs):
        eos = end_of_caption_id(captioner.tokenizer)  # what train() routes the options with
        seen.update(loss_options(settings.objective, settings.objective_options, eos), objective=settings.objective)
        return {"global_step": 0}

    monkeypatch.setattr(train_module, "train", fake_train)
    main(["train", "--objective", objective, "--images", "2", "--out", str(tmp_path), *extra])
    expected = {"mle": 0.01, "smile": 0.99} if "=" in objective else objective
    assert seen == {**options, "objective": expected}


def test_scene_options_are_refused_on_user_data_and_user_options_on_scenes(folder, trained, tmp_path, capsys):
    _fails(["compare", "--data", str(folder), "--train-images", "10", "--out", str(tmp_path)], capsys,
           "--train-images applies to generated scenes")
    _fails(["evaluate", "--model", str(trained), "--eval-fraction", "0.5"], capsys, "applies to your data")


def test_evaluate_scores_all_of_eval_data(folder, trained, tmp_path):
    main(["evaluate", "--model", str(trained), "--eval-data", str(folder), "--beams", "1", "--out", str(tmp_path / "e.json")])
    assert len(json.loads((tmp_path / "e.json").read_text())["captions"]) == len(CAPTIONS)


def test_a_bug_prints_its_traceback_not_one_line(monkeypatch):
    # Only user errors (ValueError, OSError, ImportError) become one line; a TypeError is a bug.
    import seqloss.cli as cli

    def broken(args):
        raise TypeError("a bug in seqloss")

    monkeypatch.setattr(cli, "cmd_scenes", broken)
    with pytest.raises(TypeError, match="a bug in seqloss"):
        main(["scenes", "--out", "x"])


def test_bench_runs_from_any_directory(tmp_path, monkeypatch, capsys):
    # The benchmark ships with the package: no source checkout needed.
    from seqloss.workbench import bench
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(bench.BENCH_SHAPES, "small", (2, 8, 64, 16))
    main(["bench", "--shape", "small", "--repeats", "1"])
    out = capsys.readouterr().out
    assert out.count("| torch MLE | ") == 2 and "seqloss mle=0.01,smile=0.99" in out and "fused head" in out


def test_compare_seed_sets_the_scenes_the_initialisation_and_the_data_order(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import seqloss.workbench.compare as compare_module
    seen = []
    monkeypatch.setattr(compare_module, "compare", lambda out, settings, *a, **k: seen.append(settings))
    main(["compare", "--seed", "3", "--out", str(tmp_path / "out")])
    assert seen[0].seed == 3 and seen[0].stage1.seed == 3
