"""``seqloss``: the command-line workbench. Run ``seqloss COMMAND --help`` for each command.

Only argparse is imported up front, so ``seqloss --help`` works on a bare install; each command
checks the workbench extra it needs (naming what to install) before importing it. A user error (bad
data, an unknown objective, a missing file: ValueError, OSError, ImportError) prints one line,
``seqloss: error: ...``, and exits with 2; ``--debug`` shows the traceback instead. Anything else is
a bug and prints its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, Optional

from .cli_options import add_data_options, add_decoding, add_objective_options, count, rate
from .workbench.settings import BENCH_SHAPES, CompareSettings  # plain data: nothing heavy is imported

DESCRIPTION = """Train captioners with the right objective and see what the objective does.

  seqloss compare --out runs/compare          MLE vs SMILE fine-tuning on built-in scenes, with a report
  seqloss train --objective smile --out DIR   train one captioner (scenes, or your captions: --data PATH)
  seqloss evaluate --model DIR                caption held-out images and score them
  seqloss caption --model DIR IMAGE...        caption images
  seqloss explain --model DIR --image IMG --caption "..."   per-token loss, MLE vs SMILE
  seqloss scenes --out DIR --n 500            write the scenes data set as an image folder
  seqloss bench --shape blip                  forward+backward time of every objective here

Your data (--data PATH): an image folder with metadata.jsonl, a BLIP caption JSON file or a COCO
captions JSON file. Errors print one line; add --debug for the traceback.
"""

_CAPTIONER = ("PIL", "transformers", "tokenizers", "tqdm")
NEEDS = {  # command -> modules of the 'hf' extra it imports
    "train": _CAPTIONER + ("accelerate",), "evaluate": _CAPTIONER + ("pycocoevalcap",), "caption": _CAPTIONER,
    "compare": _CAPTIONER + ("accelerate", "pycocoevalcap", "matplotlib"), "explain": _CAPTIONER + ("matplotlib",),
    "scenes": _CAPTIONER, "bench": (),
}
USER_ERRORS = (ValueError, OSError, ImportError)


# --- data and models -------------------------------------------------------------------------------

def _user_data(args) -> bool:
    """Whether --data names the user's files; options that only apply to them are refused with scenes."""
    scenes_only = ("train_images", "test_images")  # compare's options for generated scenes
    if args.data != "scenes":
        for option in scenes_only:
            if getattr(args, option, None) is not None:
                raise ValueError(f"--{option.replace('_', '-')} applies to generated scenes, not to --data {args.data}")
        return True
    scores_other_data = args.command == "evaluate" and args.eval_data is not None
    for option in ("image_root", "eval_fraction", "eval_data"):
        if getattr(args, option, None) is not None and not (scores_other_data and option != "eval_fraction"):
            raise ValueError(f"--{option.replace('_', '-')} applies to your data (--data PATH); generated scenes "
                             f"are held out by seed")
    return False


def _split(args) -> tuple[list, list]:
    from .workbench.data import load_split
    return load_split(args.data, eval_data=args.eval_data, eval_fraction=args.eval_fraction, seed=args.split_seed,
                      image_root=args.image_root, skip_bad=args.skip_bad)


def _check_model_dir(path: Optional[str]) -> None:
    if path is not None and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"--model {path!r} is not a Hugging Face model directory (no config.json)")


def _objective(text: str) -> Any:
    from .workbench.objectives import parse_objective
    return parse_objective(text)


def _given(args):
    from .workbench.settings import LossOptions

    def ids(lists: Optional[list[list[int]]]) -> Optional[list[int]]:  # '--exclude-ids 0 5' and '0,5' alike
        return None if lists is None else [i for part in lists for i in part]

    return LossOptions(eos_token_id=args.eos_token_id, exclude_ids=ids(args.exclude_ids),
                            include_ids=ids(args.include_ids), num_samples=args.num_samples,
                            first_token_mle=args.first_token_mle, label_smoothing=args.label_smoothing)


def _report_unknown_words(tokenizer, captions: Sequence[Sequence[str]]) -> None:
    from .workbench.tokenizer import unknown_words
    unknown, distinct = unknown_words(tokenizer, captions)
    if not unknown:
        print(f"the model's tokenizer knows all {distinct} distinct words of the training captions")
        return
    shown = ", ".join(repr(w) for w, _ in unknown.most_common(5))
    print(f"the model's tokenizer maps {len(unknown)} of the {distinct} distinct words of the training captions "
          f"to {tokenizer.unk_token} ({sum(unknown.values())} occurrences, e.g. {shown}): they train as unknown")


# --- commands --------------------------------------------------------------------------------------

def cmd_train(args) -> None:
    """Train one captioner with one objective. Without --model a new small BLIP is built; on your data its
    vocabulary is every word of the training captions."""
    from .workbench.evaluate import EvalSet
    from .workbench.model import load_captioner, new_captioner
    from .workbench.objectives import loss_options
    from .workbench.settings import TrainSettings
    from .workbench.tokenizer import SPECIAL_TOKENS, caption_tokenizer, scene_tokenizer
    from .workbench.train import train
    objective = _objective(args.objective)
    loss_options(objective, _given(args))  # options no member takes fail here, before data and model load
    _check_model_dir(args.model)
    if _user_data(args):
        records, held_out = _split(args)
        print(f"training on {len(records)} images of {args.data}" + (
            f"; {len(held_out)} held out (evaluate them with the same --data, --eval-fraction and --split-seed)"
            if held_out and args.eval_data is None else ""))
    else:
        from .workbench import scenes
        records = scenes.generate(args.images, seed=args.seed)
    data = EvalSet.from_examples(records)
    if args.model:
        captioner = load_captioner(Path(args.model))
        _report_unknown_words(captioner.tokenizer, data.references)
    elif args.data == "scenes":
        captioner = new_captioner(scene_tokenizer(), seed=args.seed, images=data.images)
    else:  # a new model normalises pixels with its own training images' statistics, as compare's does
        captioner = new_captioner(caption_tokenizer(data.references), seed=args.seed, images=data.images)
        print(f"vocabulary: {len(captioner.tokenizer) - len(SPECIAL_TOKENS)} words from the training captions "
              f"(saved with the model)")
    settings = TrainSettings(objective=objective, steps=args.steps, batch_size=args.batch_size,
                             learning_rate=args.lr, seed=args.seed, save_steps=args.save_steps,
                             objective_options=_given(args))
    out = train(captioner, data.images, data.references, settings, Path(args.out), resume=args.resume)
    print(f"trained {out['global_step']} steps; model saved to {Path(args.out) / 'model'}")


def cmd_evaluate(args) -> None:
    """Caption held-out images and score them: generated scenes (their own seed), the held-out part of
    --data (the split train used), or all of --eval-data."""
    from .workbench.data import load_captions
    from .workbench.evaluate import EvalSet, captions_by_image, evaluate
    from .workbench.html_report import write_html
    from .workbench.model import load_captioner
    from .workbench.report import COLUMNS
    from .workbench.settings import Generation
    _check_model_dir(args.model)
    if _user_data(args):
        records, held_out = _split(args)
        scored = held_out or records  # --eval-fraction 0: all of --data
        print(f"scoring {len(scored)} {'held-out ' if held_out else ''}images")
    elif args.eval_data is not None:
        scored = load_captions(args.eval_data, args.image_root, args.skip_bad)
    else:
        from .workbench import scenes
        scored = scenes.generate(args.images, seed=args.seed)
    evaluation = EvalSet.from_examples(scored)
    result = evaluate(load_captioner(Path(args.model)), evaluation, Generation(num_beams=args.beams, top_p=args.top_p))
    print(json.dumps(result["metrics"], indent=2))
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps({"metrics": result["metrics"], "captions": captions_by_image(result)}, indent=2))
        page = write_html(out.with_suffix(".html"), {Path(args.model).name or "model": result}, evaluation,
                          title=f"seqloss evaluate {args.model}", columns=COLUMNS)
        print(f"open in a browser: {page}")


def cmd_caption(args) -> None:
    """Caption image files, one line per image: path, tab, caption."""
    from .workbench.evaluate import load_images
    from .workbench.model import load_captioner
    _check_model_dir(args.model)
    images = load_images(args.images)
    captions = load_captioner(Path(args.model)).caption(images, num_beams=args.beams, top_p=args.top_p)
    for path, caption in zip(args.images, captions):
        print(f"{path}\t{caption}")


def cmd_compare(args) -> None:
    """Fine-tune one captioner with each objective (same stage-1 checkpoint, same budget) and report."""
    from .workbench.compare import compare
    from .workbench.objectives import options_per_objective
    from .workbench.settings import CompareSettings
    objectives = [_objective(text) for text in args.objectives.split(";")]
    options_per_objective(objectives, _given(args))  # options none takes fail here, before data load
    settings = CompareSettings(objectives=objectives, objective_options=_given(args))
    for option in ("train_images", "test_images", "stage2_steps"):
        if getattr(args, option) is not None:
            setattr(settings, option, getattr(args, option))
    if args.stage1_steps is not None:
        settings.stage1.steps = args.stage1_steps
    settings.seed = settings.stage1.seed = args.seed
    data = _split(args) if _user_data(args) else None
    compare(Path(args.out), settings, Path(args.cache_dir) if args.cache_dir else None, progress=not args.quiet,
            data=data)


def cmd_explain(args) -> None:
    """The per-token loss of one caption under MLE and SMILE, printed and drawn."""
    from .workbench.data import open_image
    from .workbench.explain import plot, table, token_losses
    from .workbench.model import load_captioner
    _check_model_dir(args.model)
    image = open_image(args.image)
    losses = token_losses(load_captioner(Path(args.model)), image, args.caption)
    print("\n".join(table(losses)))
    print(f"plot: {plot(losses, Path(args.out), title=args.caption)}")


def cmd_scenes(args) -> None:
    """Write the scenes as an image folder, with the scenes tokenizer in DIR/tokenizer."""
    from .workbench.scenes import write_scenes
    from .workbench.tokenizer import scene_tokenizer
    out = write_scenes(Path(args.out), args.n, seed=args.seed)
    scene_tokenizer().save_pretrained(str(out / "tokenizer"))
    print(f"wrote {args.n} scenes to {out}")


def cmd_bench(args) -> None:
    """Time the forward+backward of every objective on this machine, on logits and through the fused
    head, against torch's own MLE, providers interleaved. (A source checkout's benchmarks/ measure
    more: peers, peak memory, training steps, GPUs.)"""
    from .workbench.bench import table
    for fused in (False, True):
        print(table(args.shape, fused=fused, repeats=args.repeats), end="\n\n")


# --- the parser ------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse's parser with its usage errors on one line, as the commands' own errors are."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"seqloss: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    debug: dict[str, Any] = dict(action="store_true", help="show the traceback of an error instead of one line")
    p = _Parser(prog="seqloss", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", **debug)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Any, help: str) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help, description=run.__doc__ or help)
        q.add_argument("--debug", **{**debug, "default": argparse.SUPPRESS})  # after the command name too
        q.set_defaults(run=run)
        return q

    q = command("train", cmd_train, "train a captioner with one objective")
    q.add_argument("--objective", default="mle",
                   help="mle, smile, random_subset, reverse_subset, selective_eos, subset, or a mixture "
                        "'mle=0.01,smile=0.99' (default: %(default)s)")
    q.add_argument("--model", help="a local Hugging Face BLIP directory to start from (default: a new small BLIP)")
    q.add_argument("--out", required=True, help="output directory (checkpoints/ and model/)")
    q.add_argument("--steps", type=count, default=400)
    q.add_argument("--batch-size", type=count, default=32, help="per device")
    q.add_argument("--lr", type=rate, default=1e-3)
    q.add_argument("--save-steps", type=count, default=100)
    q.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    q.add_argument("--seed", type=int, default=0, help="model initialisation, data order and scenes")
    add_objective_options(q)
    add_data_options(q, images=1000)

    q = command("evaluate", cmd_evaluate, "caption held-out images and score them")
    q.add_argument("--model", required=True)
    q.add_argument("--out", help="write the metrics and every caption with its image's file name to this JSON file, "
                                 "and the page to look at them to the same name with .html")
    q.add_argument("--seed", type=int, default=10_000,
                   help="scenes: the seed of the held-out scenes (default: %(default)s)")
    add_data_options(q, images=100)
    add_decoding(q)

    q = command("caption", cmd_caption, "caption images with a trained model")
    q.add_argument("--model", required=True)
    q.add_argument("images", nargs="+", help="image files")
    add_decoding(q)

    q = command("compare", cmd_compare, "fine-tune one captioner with each objective and compare them")
    defaults = CompareSettings()  # the embedded settings, shown in --help

    def default(value: Any) -> str:
        return f"(default: {value})"

    q.add_argument("--out", default="runs/compare")
    q.add_argument("--objectives", default="mle;smile",
                   help="';'-separated objectives, e.g. 'mle;smile;mle=0.01,smile=0.99' (default: %(default)s)")
    q.add_argument("--train-images", type=count, help="scenes generated for training " + default(
        defaults.train_images))
    q.add_argument("--test-images", type=count, help="held-out scenes " + default(defaults.test_images))
    q.add_argument("--stage1-steps", type=count, help="MLE steps from scratch, cached " + default(
        defaults.stage1.steps))
    q.add_argument("--stage2-steps", type=count, help="fine-tuning steps per objective " + default(
        defaults.stage2_steps))
    q.add_argument("--seed", type=int, default=defaults.seed,
                   help="the captioner's initialisation, the data order and the scenes " + default(defaults.seed))
    q.add_argument("--cache-dir", help="where stage 1 is cached (default: ~/.cache/seqloss)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    add_objective_options(q)
    add_data_options(q, images=None)

    q = command("explain", cmd_explain, "per-token loss of a caption under MLE and SMILE, as a bar chart")
    q.add_argument("--model", required=True)
    q.add_argument("--image", required=True)
    q.add_argument("--caption", required=True)
    q.add_argument("--out", default="explain.png")

    q = command("scenes", cmd_scenes, "write the scenes data set (images + metadata.jsonl + tokenizer)")
    q.add_argument("--out", required=True)
    q.add_argument("--n", type=count, default=500)
    q.add_argument("--seed", type=int, default=0)

    q = command("bench", cmd_bench, "forward+backward time of every objective on this machine")
    q.add_argument("--shape", choices=sorted(BENCH_SHAPES), default="small",
                   help="(B, N, V, H): " + "; ".join(f"{k} {v}" for k, v in BENCH_SHAPES.items())
                        + " (default: %(default)s)")
    q.add_argument("--repeats", type=count, default=5, help="interleaved rounds (default: %(default)s)")
    return p


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Optional[list[str]] = None) -> None:
    """Run a command; a user error exits with 2 after one line on stderr (the traceback with --debug)."""
    from ._lazy import require
    args = parser().parse_args(argv)
    try:
        for module in NEEDS[args.command]:
            require(module, "workbench")
        args.run(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"seqloss: error: {_one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("seqloss: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
