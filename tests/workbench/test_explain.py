"""Per-token loss of a caption under MLE and SMILE."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from seqloss.workbench import scenes  # noqa: E402
from seqloss.workbench.explain import table, token_losses  # noqa: E402
from seqloss.workbench.model import new_captioner  # noqa: E402
from seqloss.workbench.tokenizer import scene_tokenizer  # noqa: E402


def test_token_losses_cover_every_word_and_the_end_and_smile_never_exceeds_mle():
    captioner = new_captioner(scene_tokenizer())
    image = scenes.generate(1)[0].image
    losses = token_losses(captioner, image, "a large red circle on the left")
    assert losses["tokens"] == ["a", "large", "red", "circle", "on", "the", "left", "[SEP]"]
    mle, smile = torch.tensor(losses["mle"]), torch.tensor(losses["smile"])
    assert torch.allclose(mle[0], smile[0])                    # first-token MLE
    assert (smile <= mle + 1e-6).all() and (smile[1:] < mle[1:]).all()
    assert table(losses)[-1].startswith("total")
