"""HFF network: prototype geometry, gradient isolation between blocks, shapes for every preset."""

import math

import pytest
import torch

from model.config import ModelConfig, list_presets, preset_config
from model.factory import build_model
from model.hff import HFFNet


def small_digits_net(**overrides) -> HFFNet:
    torch.manual_seed(0)
    return HFFNet(preset_config("digits-cnn", **overrides))


def test_prototypes_are_unit_norm_after_an_update():
    net = small_digits_net(prototypes_per_class=3)
    opt = torch.optim.SGD(net.parameters(), lr=10.0)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    loss = sum(torch.nn.functional.cross_entropy(lg, y) for lg in net(x))
    loss.backward()
    opt.step()
    for block in net.blocks:
        raw_norms = block.head.prototypes.norm(dim=1)
        assert not torch.allclose(raw_norms, torch.ones_like(raw_norms))  # the raw ones drifted
        unit = block.head.unit_prototypes().norm(dim=1)
        torch.testing.assert_close(unit, torch.ones_like(unit))
        scores = block.head.scores(torch.rand(4, *block.out_shape))
        # tau * logsumexp over P cosines lies within [max cos, max cos + tau * log P]
        bound = 1.0 + block.head.temperature * math.log(3) + 1e-5
        assert scores.abs().max() <= bound


def test_logsumexp_over_one_prototype_is_the_cosine():
    net = small_digits_net(prototypes_per_class=1)
    head = net.blocks[0].head
    h = torch.rand(5, *net.blocks[0].out_shape)
    z = torch.nn.functional.normalize(head.pool(h), dim=1)
    torch.testing.assert_close(head.scores(h), z @ head.unit_prototypes().t())
    torch.testing.assert_close(head(h), head.scale * head.scores(h))


def test_head_hands_a_channels_last_map_its_gradient_channels_last():
    # Flatten's backward gives an NCHW gradient; the head converts it back before the pooling's
    # backward (its slow path on mixed layouts), and the values are the same as without
    net = small_digits_net(pool_grid=2)
    head = net.blocks[0].head
    h = torch.rand(6, *net.blocks[0].out_shape)
    grads = {}
    for name, layout in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
        leaf = h.clone().contiguous(memory_format=layout).requires_grad_(True)
        def keep(module, grad_in, grad_out, name=name):  # the gradient the pooling receives
            grads[name] = grad_out[0]

        hook = head.pool[0].register_full_backward_hook(keep)
        head(leaf).square().sum().backward()
        hook.remove()
        grads[name + " input"] = leaf.grad
    assert grads["nhwc"].is_contiguous(memory_format=torch.channels_last)
    assert not grads["nhwc"].is_contiguous()
    assert grads["nchw"].is_contiguous()
    torch.testing.assert_close(grads["nhwc"], grads["nchw"], rtol=0, atol=0)
    torch.testing.assert_close(grads["nhwc input"], grads["nchw input"], rtol=0, atol=0)


def test_later_block_loss_sends_no_gradient_to_earlier_blocks():
    net = small_digits_net().train()
    logits = net(torch.rand(8, 1, 8, 8))  # training mode: inputs of blocks are detached
    logits[-1].sum().backward()
    for block in net.blocks[:-1]:
        assert all(p.grad is None for p in block.parameters())
    assert all(p.grad is not None for p in net.blocks[-1].parameters())


def test_without_detach_gradients_do_flow_back():
    net = small_digits_net().train()
    net(torch.rand(8, 1, 8, 8), detach=False)[-1].sum().backward()
    assert net.blocks[0].body[0].weight.grad is not None


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_gives_per_block_logits(name):
    cfg = preset_config(name)
    if name == "mlp":
        cfg = preset_config(name, input_shape=(1, 8, 8))
    net = build_model(cfg).eval()
    logits = net(torch.rand(3, *cfg.input_shape))
    assert len(logits) == cfg.num_blocks
    for lg in logits:
        assert lg.shape == (3, cfg.num_classes)
        assert torch.isfinite(lg).all()


def test_config_rejects_inconsistent_input():
    with pytest.raises(ValueError, match="input_mean has 1 values"):
        ModelConfig(input_shape=(3, 32, 32), blocks=[{"width": 4}])
    with pytest.raises(ValueError, match="conv after a linear"):
        ModelConfig(blocks=[{"kind": "linear"}, {"kind": "conv"}])
    with pytest.raises(ValueError, match="extra"):
        ModelConfig(blocks=[{"width": 4, "widht": 3}])
    with pytest.raises(KeyError, match="known: "):
        preset_config("resnet-9000")
