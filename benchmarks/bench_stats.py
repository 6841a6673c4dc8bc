"""What ``return_stats=True`` costs on the fused head (CPU): the loss alone against the loss with its
statistics (z-loss part, token accuracy, predicted ids), providers interleaved, at GPT-2-small
fine-tuning shapes. The statistics come from the loss's own pass: the full-vocabulary parts (MLE,
SMILE's first tokens) find each position's argmax while they stream the logits; positions that only
a list support scores (SMILE's) get one more pass of the head over them, without gradients.

    python benchmarks/bench_stats.py [--objectives mle,smile] [--repeats 5] [--markdown FILE]
"""
from __future__ import annotations

import torch

import seqloss
from common import interleaved_median_ms, machine, parser, publish, zipf_labels

B, N, H, V = 2, 256, 768, 50257


def main() -> None:
    args = parser(__doc__, "--objectives", "mle,smile", repeats=5).parse_args()
    torch.manual_seed(0)
    hidden = torch.randn(B, N, H, requires_grad=True)
    weight = (torch.randn(V, H) * H ** -0.5).requires_grad_(True)
    labels = zipf_labels((B, N), V)
    rows = []
    for objective in args.objectives.split(","):
        def step(stats: bool, objective: str = objective) -> None:
            hidden.grad = weight.grad = None
            out = seqloss.linear_loss(hidden, weight, labels, objective=objective, shift=True, z_loss=1e-4,
                                      return_stats=stats)
            (out.loss if stats else out).backward()

        times = interleaved_median_ms({"loss": lambda: step(False), "loss + stats": lambda: step(True)}, args.repeats)
        rows.append({"objective": objective, "loss (ms)": f"{times['loss']:.0f}",
                     "loss + stats (ms)": f"{times['loss + stats']:.0f}",
                     "ratio": f"{times['loss + stats'] / times['loss']:.2f}"})
    publish(f"return_stats on the fused head: B={B}, N={N}, H={H}, V={V}, fp32, forward+backward, z_loss=1e-4; "
            f"median of {args.repeats} interleaved rounds\n{machine()}", rows, args.markdown)


if __name__ == "__main__":
    main()
