"""FFNet: label embedding, one stacked pass equals a loop over labels and chunked passes, config checks."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from model.config import ModelConfig, preset_config
from model.factory import build_model
from model.ff import FFNet, rms_normalise


def ff_config(preset: str, embedding: str, **ff) -> ModelConfig:
    return preset_config(preset, family="ff", ff={"label_embedding": embedding, **ff},
                         input_mean=[0.3], input_std=[0.4])


@pytest.mark.parametrize("preset", ["test-tiny", "ff-mlp"])
@pytest.mark.parametrize("embedding", ["overlay", "concat"])
def test_inference_equals_a_manual_loop_over_labels(preset: str, embedding: str) -> None:
    torch.manual_seed(0)
    model = build_model(ff_config(preset, embedding)).eval()
    assert isinstance(model, FFNet)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        stacked = model(x)  # one pass over all label variants
        for c in range(model.num_classes):
            labels = torch.full((5,), c, dtype=torch.long)
            manual = model.block_goodness(model.embed(model.input_norm(x), labels))
            for block_scores, g in zip(stacked, manual, strict=True):
                torch.testing.assert_close(block_scores[:, c], g, rtol=1e-5, atol=1e-6)
        total = sum(stacked)
    assert stacked[0].shape == (5, 10)
    torch.testing.assert_close(model.scores(x), total)
    assert torch.equal(model.predict(x), total.argmax(1))


@pytest.mark.parametrize("chunk", [1, 3, 5, 7, 50])
def test_chunked_passes_give_the_one_pass_scores(chunk: int) -> None:
    """Chunks of any size, aligned with the batch or not, and one larger than the stack."""
    torch.manual_seed(0)
    model = build_model(ff_config("test-tiny", "overlay")).eval()
    x = torch.rand(5, 1, 8, 8)  # 10 labels x 5 images: a 50-row stack
    with torch.no_grad():
        whole, chunked = model(x), model(x, chunk=chunk)
        for a, b in zip(whole, chunked, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert torch.equal(model.predict(x, chunk=chunk), model.predict(x))


def test_score_blocks_choose_the_summed_blocks() -> None:
    torch.manual_seed(0)
    model = build_model(ff_config("ff-mlp", "concat", score_blocks=[2, 3])).eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        per_block = model(x)
        torch.testing.assert_close(model.scores(x), per_block[1] + per_block[2])


def test_embeddings_put_the_label_where_documented() -> None:
    x = torch.zeros(2, 1, 8, 8)
    labels = torch.tensor([3, 7])
    overlay = FFNet(ff_config("ff-mlp", "overlay", label_scale=2.0)).embed(x, labels)
    assert overlay.shape == (2, 1, 8, 8)
    assert overlay.flatten(1)[0, 3] == 2.0 and overlay.flatten(1)[1, 7] == 2.0
    assert overlay.flatten(1).sum() == 4.0
    concat_flat = FFNet(ff_config("ff-mlp", "concat")).embed(x, labels)
    assert concat_flat.shape == (2, 64 + 10)
    assert torch.equal(concat_flat[:, 64:].argmax(1), labels)
    planes = FFNet(ff_config("test-tiny", "concat")).embed(x, labels)
    assert planes.shape == (2, 1 + 10, 8, 8)
    assert torch.equal(planes[:, 1:].mean((2, 3)).argmax(1), labels)


def test_rms_normalisation_removes_the_goodness() -> None:
    h = torch.randn(3, 4, 5, 5) * torch.tensor([1.0, 10.0, 0.1]).view(3, 1, 1, 1)
    n = rms_normalise(h)
    torch.testing.assert_close(n.pow(2).mean((1, 2, 3)), torch.ones(3), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(n[1] / n[1].norm(), h[1] / h[1].norm())


def test_family_ff_records_its_defaults_and_bad_settings_fail() -> None:
    cfg = preset_config("ff-mlp", family="ff")
    assert cfg.ff is not None and cfg.ff.goodness == "mean"
    assert ModelConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ValidationError, match="family is not 'ff'"):
        preset_config("ff-mlp", ff={"goodness": "sum"})
    with pytest.raises(ValidationError, match="score_blocks"):
        preset_config("ff-mlp", family="ff", ff={"score_blocks": [4]})
    with pytest.raises(ValidationError, match="extra"):
        preset_config("ff-mlp", family="ff", ff={"gamma": 0.5})
    with pytest.raises(ValueError, match="family 'ff'"):
        FFNet(preset_config("ff-mlp"))
