"""The cross-attention grounding loss of stage 1: the right image token per word of a reference, the
loss as the module states it, and a Trainer that adds it only where scenes give targets."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from seqloss.workbench import scenes  # noqa: E402
from seqloss.workbench.grounding import (  # noqa: E402
    NO_CELL,
    GroundedTrainer,
    attention_grounding_loss,
    cell_token,
    cross_attention_modules,
    recorded,
    token_cells,
    word_cells,
)
from seqloss.workbench.model import new_captioner  # noqa: E402
from seqloss.workbench.scenes import POSITION_PHRASES, Scene, SceneObject  # noqa: E402
from seqloss.workbench.settings import TrainSettings  # noqa: E402
from seqloss.workbench.tokenizer import scene_tokenizer  # noqa: E402
from seqloss.workbench.train import CaptionCollator, CaptionPairs, train  # noqa: E402

PHRASE_WORDS = {w for phrases in POSITION_PHRASES.values() for p in phrases for w in p.split()}


@pytest.fixture(scope="module")
def captioner():
    return new_captioner(scene_tokenizer(), seed=0)


@pytest.mark.parametrize("position", scenes.POSITIONS)
def test_cell_token_is_the_vision_token_that_sees_the_object(captioner, position):
    """The token is the object's patch embedding plus its position embedding: BLIP's CLS comes first,
    then the cells row by row."""
    image = scenes.draw(Scene((SceneObject("circle", "red", "large", position),)))
    pixels = captioner.pixels([image])
    embeddings = captioner.model.vision_model.embeddings
    col, row = scenes.CELLS[position]
    cell = pixels[:, :, 24 * row:24 * (row + 1), 24 * col:24 * (col + 1)]
    with torch.no_grad():
        tokens = embeddings(pixels)
        expected = embeddings.patch_embedding(cell).flatten(1) + embeddings.position_embedding[0, cell_token(position)]
    torch.testing.assert_close(tokens[:, cell_token(position)], expected, rtol=1e-4, atol=1e-4)
    drawn = np.asarray(image).min(axis=2) < 200  # the object's pixels
    assert drawn[24 * row:24 * (row + 1), 24 * col:24 * (col + 1)].sum() == drawn.sum()


@pytest.mark.parametrize("position_first", [0.0, 1.0])
def test_generated_references_target_exactly_their_position_phrases(monkeypatch, position_first):
    monkeypatch.setattr(scenes, "POSITION_FIRST", position_first)
    rng = random.Random(5)
    checked = 0
    for _ in range(200):
        scene = scenes.make_scene(rng)
        where = {o.shape: cell_token(o.position) for o in scene.objects}
        for text, said in scenes.captions_with_facts(scene, rng):
            words, cells = text.split(), word_cells(text, scene)
            positions = [f for f in said if f[0] == "position"]
            targeted = [(w, c) for w, c in zip(words, cells) if c != NO_CELL]
            assert len(cells) == len(words)
            assert {c for _, c in targeted} == {where[f[1]] for f in positions}
            assert all(w in PHRASE_WORDS for w, _ in targeted)
            assert len(targeted) == 3 * len(positions)  # every position phrase is three words
            checked += bool(positions)
    assert checked > 100


def test_object_words_target_every_fact_word_of_their_object():
    scene = Scene((SceneObject("circle", "red", "large", "left"), SceneObject("square", "blue", "small", "top")))
    text = "there is a large red circle on the left and a blue square"
    left, top = cell_token("left"), cell_token("top")
    x = NO_CELL
    assert word_cells(text, scene, "object") == [x, x, x, left, left, left, left, left, left, x, x, top, top]
    assert word_cells(text, scene) == [x, x, x, x, x, x, left, left, left, x, x, x, x]
    with pytest.raises(ValueError, match="words must be one of"):
        word_cells(text, scene, "colour")


def test_token_cells_follow_the_tokens_and_leave_the_rest_untargeted(captioner):
    scene = Scene((SceneObject("circle", "red", "large", "left"),))
    texts = ["a circle on the left", "a red circle"]
    batch = captioner.tokenize(texts)
    cells = token_cells(batch, [word_cells(texts[0], scene), None])
    left, x = cell_token("left"), NO_CELL
    assert cells.shape == batch["input_ids"].shape
    assert cells.tolist() == [[x, x, x, left, left, left, x], [x] * 7]  # [DEC] first, [SEP] and padding last


def test_the_loss_is_minus_log_the_mass_on_the_target_cell_at_the_predicting_position():
    B, H, N, K = 2, 4, 5, 10
    uniform = torch.full((B, H, N, K), 1.0 / K)
    targets = torch.full((B, N), NO_CELL)
    targets[0, 3] = 6  # the label at position 3 is predicted by the query at position 2
    assert attention_grounding_loss([uniform, uniform], targets).item() == pytest.approx(math.log(K))
    peaked = torch.zeros(B, H, N, K)
    peaked[0, :, 2, 6] = 1.0
    assert attention_grounding_loss([peaked], targets).item() == pytest.approx(0.0, abs=1e-6)
    peaked_late = torch.zeros(B, H, N, K)
    peaked_late[0, :, 3, 6] = 1.0  # on the right cell, one position too late
    assert attention_grounding_loss([peaked_late], targets).item() > 10


def test_no_targets_give_zero_with_a_gradient_path():
    scores = torch.randn(1, 4, 5, 10, requires_grad=True)
    loss = attention_grounding_loss([scores.softmax(-1)], torch.full((1, 5), NO_CELL))
    loss.backward()
    assert loss.item() == 0.0 and scores.grad is not None and scores.grad.abs().sum() == 0


def test_gradient_steps_move_the_attention_onto_the_cell():
    scores = torch.zeros(1, 2, 4, 10, requires_grad=True)
    targets = torch.tensor([[NO_CELL, 3, 3, NO_CELL]])
    optimiser = torch.optim.SGD([scores], lr=1.0)
    losses = []
    for _ in range(20):
        loss = attention_grounding_loss([scores.softmax(-1)], targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(10)) and losses[-1] < 0.2 * losses[0]
    assert (scores.softmax(-1)[0, :, :2].argmax(-1) == 3).all()


def test_recorded_attentions_are_the_decoders_own_cross_attentions(captioner):
    examples = scenes.generate(2, seed=1)
    pixels = captioner.pixels([e.image for e in examples])
    batch = captioner.encode([e.captions[0] for e in examples])
    model = captioner.model.eval()
    with torch.no_grad(), recorded(cross_attention_modules(model)) as found:
        model(pixel_values=pixels, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        image = model.vision_model(pixel_values=pixels).last_hidden_state
        own = model.text_decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 encoder_hidden_states=image, output_attentions=True).cross_attentions
    assert len(found) == len(own) == 2
    for a, b in zip(found, own):
        torch.testing.assert_close(a, b)


def _settings(**changes):
    base = dict(objective="mle", steps=4, batch_size=8, warmup_steps=0, save_steps=4, logging_steps=2)
    return TrainSettings(**{**base, **changes})


def test_scenes_and_a_weight_add_the_grounding_term(tmp_path):
    examples = scenes.generate(16, seed=2)
    images, captions = [e.image for e in examples], [e.captions for e in examples]
    captioner = new_captioner(scene_tokenizer(), seed=0)
    out = train(captioner, images, captions, _settings(attention_grounding=0.5), tmp_path / "a", progress=False,
                scenes=[e.scene for e in examples])
    logged = [e for e in out["log_history"] if "loss" in e]
    assert logged and all(e["grounding_loss"] > 0 for e in logged)
    for settings, given in ((_settings(attention_grounding=0.5), None), (_settings(), [e.scene for e in examples])):
        out = train(new_captioner(scene_tokenizer(), seed=0), images, captions, settings, tmp_path / "b",
                    progress=False, scenes=given)
        assert not any("grounding_loss" in e for e in out["log_history"])


def test_the_trainers_loss_is_the_objectives_plus_the_weighted_term(tmp_path):
    examples = scenes.generate(8, seed=4)
    captioner = new_captioner(scene_tokenizer(), seed=0)
    pairs = CaptionPairs(captioner, [e.image for e in examples], [e.captions for e in examples],
                         [e.scene for e in examples])
    batch = CaptionCollator(captioner)([pairs[i] for i in range(len(pairs))])
    assert (batch["cell_targets"] != NO_CELL).any()
    model = captioner.model.eval()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = GroundedTrainer(model=model, args=args, weight=0.25)
    with torch.no_grad():
        total = trainer.compute_loss(model, dict(batch))
        with recorded(cross_attention_modules(model)) as found:
            plain = model(**{k: v for k, v in batch.items() if k != "cell_targets"}).loss
    assert total.item() == pytest.approx(plain.item() + 0.25 * attention_grounding_loss(found, batch["cell_targets"])
                                         .item(), rel=1e-5)


def test_captions_without_scenes_carry_no_targets(captioner):
    examples = scenes.generate(4, seed=0)
    pairs = CaptionPairs(captioner, [e.image for e in examples], [e.captions for e in examples])
    assert "cell_targets" not in CaptionCollator(captioner)([pairs[i] for i in range(4)])
