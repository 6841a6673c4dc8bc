"""The captioner: a small BLIP from a config, saved and loaded like any HF BLIP directory."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from seqloss.workbench import scenes  # noqa: E402
from seqloss.workbench.model import (  # noqa: E402
    PIXEL_SPREAD,
    config_fingerprint,
    load_captioner,
    new_captioner,
    small_blip_config,
)
from seqloss.workbench.tokenizer import scene_tokenizer  # noqa: E402


def test_encode_follows_blips_decoder_convention():
    captioner = new_captioner(scene_tokenizer())
    batch = captioner.encode(["a red circle", "a large blue square on the left"])
    bos, sep = captioner.model.config.text_config.bos_token_id, captioner.tokenizer.sep_token_id
    assert (batch["input_ids"][:, 0] == bos).all()
    assert batch["input_ids"][0, 4] == sep and (batch["labels"][0, 5:] == -100).all()


def test_save_and_load_round_trip_and_both_decoders(tmp_path):
    captioner = new_captioner(scene_tokenizer())
    images = [e.image for e in scenes.generate(2)]
    beams = captioner.caption(images, num_beams=2, max_new_tokens=6)
    loaded = load_captioner(captioner.save(tmp_path / "model"))
    assert loaded.caption(images, num_beams=2, max_new_tokens=6) == beams
    sampled = loaded.caption(images, top_p=0.9, max_new_tokens=6, seed=1)
    assert sampled == loaded.caption(images, top_p=0.9, max_new_tokens=6, seed=1)   # seeded
    assert all(isinstance(c, str) for c in sampled) and len(sampled) == 2
    for key, value in captioner.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)


def test_loading_a_folder_that_is_not_a_model_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_captioner(tmp_path)


def test_the_vision_tower_starts_with_position_information():
    # BlipVisionConfig's initializer_range (1e-10, meant for loading weights) would start the position
    # embedding at ~0: a tower trained from scratch then sees no position; the small config sets 0.02.
    captioner = new_captioner(scene_tokenizer())
    embeddings = captioner.model.vision_model.embeddings
    assert embeddings.position_embedding.std() > 1e-3
    assert embeddings.patch_embedding.weight.std() > 1e-3
    config = captioner.model.config.vision_config
    assert config.image_size // config.patch_size == 3  # one patch per cell of the scenes' grid
    assert config.num_hidden_layers == 0  # each token is its own cell: the decoder's cross-attention looks


def test_the_position_embedding_starts_at_the_patch_embeddings_scale():
    # Not drowned by the patch embeddings, which Adam grows far faster than an additive table.
    images = [e.image for e in scenes.generate(16)]
    captioner = new_captioner(scene_tokenizer(), images=images)
    embeddings = captioner.model.vision_model.embeddings
    with torch.no_grad():
        patch_rms = embeddings.patch_embedding(captioner.pixels(images)).pow(2).mean().sqrt()
    assert float(embeddings.position_embedding.detach().std()) == pytest.approx(float(patch_rms), rel=0.15)
    again = new_captioner(scene_tokenizer(), images=images)   # and deterministic from the seed
    torch.testing.assert_close(again.model.vision_model.embeddings.position_embedding,
                               embeddings.position_embedding)


def test_pixels_are_normalised_with_the_training_images_statistics(tmp_path):
    images = [e.image for e in scenes.generate(8)]
    captioner = new_captioner(scene_tokenizer(), images=images)
    pixels = captioner.pixels(images)
    assert pixels.mean().abs() < 0.1 and (pixels.std() * PIXEL_SPREAD - 1).abs() < 0.1
    loaded = load_captioner(captioner.save(tmp_path / "model"))
    torch.testing.assert_close(loaded.pixels(images), pixels)


def test_the_config_fingerprint_follows_the_architecture():
    tokenizer = scene_tokenizer()
    config = small_blip_config(tokenizer)
    assert config_fingerprint(config) == config_fingerprint(small_blip_config(tokenizer))
    config.vision_config.num_hidden_layers += 1
    assert config_fingerprint(config) != config_fingerprint(small_blip_config(tokenizer))
