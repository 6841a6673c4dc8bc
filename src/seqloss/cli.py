"""``seqloss``: the command-line workbench. Run ``seqloss COMMAND --help`` for each command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

DESCRIPTION = """Train captioners with the right objective and see what the objective does.

  seqloss compare --out runs/compare          MLE vs SMILE fine-tuning on built-in scenes, with a report
  seqloss train --objective smile --out DIR   train one captioner (scenes or your image folder)
  seqloss evaluate --model DIR                caption held-out images and score them
  seqloss caption --model DIR IMAGE...        caption images
  seqloss explain --model DIR --image IMG --caption "..."   per-token loss, MLE vs SMILE
  seqloss scenes --out DIR --n 500            write the scenes data set as an image folder
  seqloss bench                               the loss benchmark (time and memory per objective)
"""


def _data(args) -> list:
    """--data scenes (generated) or an image folder with metadata.jsonl."""
    if args.data == "scenes":
        from .workbench import scenes
        return scenes.generate(args.images, seed=args.seed)
    from .workbench.data import load_imagefolder
    return load_imagefolder(Path(args.data), skip_bad=args.skip_bad)


def _captioner(args):
    from .workbench.model import load_captioner, new_captioner
    from .workbench.tokenizer import scene_tokenizer
    return load_captioner(Path(args.model)) if args.model else new_captioner(scene_tokenizer(), seed=args.seed)


def cmd_train(args) -> None:
    from .workbench.compare import parse_objective
    from .workbench.evaluate import EvalSet
    from .workbench.train import TrainSettings, train
    examples = _data(args)
    data = EvalSet.from_examples(examples)
    settings = TrainSettings(objective=parse_objective(args.objective), steps=args.steps, batch_size=args.batch_size,
                             learning_rate=args.lr, seed=args.seed, save_steps=args.save_steps)
    out = train(_captioner(args), data.images, data.references, settings, Path(args.out), resume=args.resume)
    print(f"trained {out['global_step']} steps; model saved to {Path(args.out) / 'model'}")


def cmd_evaluate(args) -> None:
    from .workbench.evaluate import EvalSet, Generation, evaluate
    from .workbench.model import load_captioner
    result = evaluate(load_captioner(Path(args.model)), EvalSet.from_examples(_data(args)),
                      Generation(num_beams=args.beams, top_p=args.top_p))
    print(json.dumps(result["metrics"], indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


def cmd_caption(args) -> None:
    from .workbench.evaluate import load_images
    from .workbench.model import load_captioner
    captions = load_captioner(Path(args.model)).caption(load_images(args.images), num_beams=args.beams,
                                                        top_p=args.top_p)
    for path, caption in zip(args.images, captions):
        print(f"{path}\t{caption}")


def cmd_compare(args) -> None:
    from .workbench.compare import CompareSettings, compare, parse_objective
    settings = CompareSettings(objectives=[parse_objective(o) for o in args.objectives.split(";")])
    settings.train_images, settings.test_images = args.train_images, args.test_images
    settings.stage1.steps, settings.stage2_steps = args.stage1_steps, args.stage2_steps
    compare(Path(args.out), settings, Path(args.cache_dir) if args.cache_dir else None, progress=not args.quiet)


def cmd_explain(args) -> None:
    from PIL import Image
    from .workbench.explain import plot, table, token_losses
    from .workbench.model import load_captioner
    losses = token_losses(load_captioner(Path(args.model)), Image.open(args.image).convert("RGB"), args.caption)
    print("\n".join(table(losses)))
    print(f"plot: {plot(losses, Path(args.out), title=args.caption)}")


def cmd_scenes(args) -> None:
    from .workbench.scenes import write_scenes
    print(f"wrote {args.n} scenes to {write_scenes(Path(args.out), args.n, seed=args.seed)}")


def cmd_bench(args) -> None:
    import runpy
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_losses.py"
    if not script.is_file():
        raise SystemExit("seqloss bench runs benchmarks/bench_losses.py from a source checkout")
    sys.argv = [str(script), *args.rest]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")


def parser() -> argparse.ArgumentParser:
    from .workbench.compare import CompareSettings
    p = argparse.ArgumentParser(prog="seqloss", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_options(q, images=1000):
        q.add_argument("--data", default="scenes", help="'scenes' (generated) or an image folder with metadata.jsonl")
        q.add_argument("--images", type=int, default=images, help="how many scenes to generate (default: %(default)s)")
        q.add_argument("--skip-bad", action="store_true", help="skip malformed rows of metadata.jsonl (and count them)")
        q.add_argument("--seed", type=int, default=0)

    def decoding(q):
        q.add_argument("--beams", type=int, default=3, help="beam search width (default: %(default)s)")
        q.add_argument("--top-p", type=float, default=None, help="nucleus sampling instead of beam search")

    q = sub.add_parser("train", help="train a captioner with one objective", description=cmd_train.__doc__)
    q.add_argument("--objective", default="mle", help="a name (mle, smile, ...) or a mixture 'mle=0.01,smile=0.99'")
    q.add_argument("--model", help="a local Hugging Face BLIP directory to start from (default: a new small BLIP)")
    q.add_argument("--out", required=True, help="output directory (checkpoints/ and model/)")
    q.add_argument("--steps", type=int, default=400)
    q.add_argument("--batch-size", type=int, default=32, help="per device")
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--save-steps", type=int, default=100)
    q.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    data_options(q)
    q.set_defaults(run=cmd_train)

    q = sub.add_parser("evaluate", help="caption held-out images and score them")
    q.add_argument("--model", required=True)
    q.add_argument("--out", help="write metrics and captions to this JSON file")
    data_options(q, images=100)
    decoding(q)
    q.set_defaults(run=cmd_evaluate, seed=10_000)

    q = sub.add_parser("caption", help="caption images with a trained model")
    q.add_argument("--model", required=True)
    q.add_argument("images", nargs="+", help="image files")
    decoding(q)
    q.set_defaults(run=cmd_caption)

    q = sub.add_parser("compare", help="fine-tune one captioner with each objective and compare them")
    q.add_argument("--out", default="runs/compare")
    q.add_argument("--objectives", default="mle;smile",
                   help="';'-separated objectives, e.g. 'mle;smile;mle=0.01,smile=0.99' (default: %(default)s)")
    defaults = CompareSettings()
    q.add_argument("--train-images", type=int, default=defaults.train_images)
    q.add_argument("--test-images", type=int, default=defaults.test_images)
    q.add_argument("--stage1-steps", type=int, default=defaults.stage1.steps, help="MLE steps from scratch (cached)")
    q.add_argument("--stage2-steps", type=int, default=defaults.stage2_steps, help="fine-tuning steps per objective")
    q.add_argument("--cache-dir", help="where stage 1 is cached (default: ~/.cache/seqloss)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(run=cmd_compare)

    q = sub.add_parser("explain", help="per-token loss of a caption under MLE and SMILE, as a bar chart")
    q.add_argument("--model", required=True)
    q.add_argument("--image", required=True)
    q.add_argument("--caption", required=True)
    q.add_argument("--out", default="explain.png")
    q.set_defaults(run=cmd_explain)

    q = sub.add_parser("scenes", help="write the scenes data set (images + metadata.jsonl + tokenizer)")
    q.add_argument("--out", required=True)
    q.add_argument("--n", type=int, default=500)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(run=cmd_scenes)

    q = sub.add_parser("bench", help="the loss benchmark (arguments go to benchmarks/bench_losses.py)")
    q.add_argument("rest", nargs=argparse.REMAINDER)
    q.set_defaults(run=cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
