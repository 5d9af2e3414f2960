"""I3D: pytorch-i3d's key layout, loading a saved random-init network, one-line errors naming the key,
"same" padding, and the input preparation."""
import math

import pytest
import torch

from dsv.eval.i3d import (I3D_SIZE, InceptionI3d, Unit3D, i3d_features, load_i3d, pad_same, prepare_for_i3d)
from torchkit.cli import UsageError

# pytorch-i3d's InceptionI3d.VALID_ENDPOINTS up to Mixed_5c, then its head module
ENDPOINTS = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3", "Mixed_3b",
             "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f",
             "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c", "logits"]


def _random_net(seed: int = 0) -> InceptionI3d:
    """Random weights and random BatchNorm statistics, so that loading them changes the output."""
    torch.manual_seed(seed)
    net = InceptionI3d()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def test_the_layout_is_pytorch_i3d_s():
    net = InceptionI3d()
    state = net.state_dict()
    assert [name for name, _ in net.named_children()] == ENDPOINTS
    shapes = {"Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7), "Conv3d_2c_3x3.bn.running_var": (192,),
              "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3), "Mixed_4b.b0.conv3d.weight": (192, 480, 1, 1, 1),
              "Mixed_5c.b3b.conv3d.weight": (128, 832, 1, 1, 1), "logits.conv3d.weight": (400, 1024, 1, 1, 1),
              "logits.conv3d.bias": (400,)}
    for name, shape in shapes.items():
        assert tuple(state[name].shape) == shape, name
    assert "Conv3d_1a_7x7.conv3d.bias" not in state and "logits.bn.weight" not in state
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == 12_697_264


@pytest.mark.parametrize("size,kernel,stride", [(9, 7, 2), (16, 7, 2), (5, 3, 1), (7, 2, 2), (8, 3, 2), (1, 3, 2)])
def test_same_padding_gives_ceil_size_over_stride(size, kernel, stride):
    x = torch.randn(1, 1, size, 3, 3)
    padded = pad_same(x, (kernel, 1, 1), (stride, 1, 1))
    assert (padded.shape[2] - kernel) // stride + 1 == math.ceil(size / stride)
    total = padded.shape[2] - size
    assert torch.equal(padded[0, 0, total // 2:total // 2 + size], x[0, 0])  # the odd pad goes at the end


def test_a_saved_random_network_reloads_exactly(tmp_path):
    net = _random_net()
    path = tmp_path / "i3d.pt"
    torch.save(net.state_dict(), path)
    loaded = load_i3d(path, torch.device("cpu"))
    assert not loaded.training
    for name, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    x = torch.randn(2, 3, 9, 40, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
        assert loaded(x).shape == (2, 1024, 2, 2, 2)  # ceil(9/8), ceil(40/32)
    assert not torch.equal(InceptionI3d().eval()(x), net(x))  # the weights matter


def test_files_without_num_batches_tracked_load(tmp_path):
    state = {k: v for k, v in _random_net().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pt")
    loaded = load_i3d(tmp_path / "old.pt", torch.device("cpu"))
    assert torch.equal(loaded.state_dict()["Mixed_4c.b2b.bn.running_var"], state["Mixed_4c.b2b.bn.running_var"])


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("Mixed_4c.b2b.bn.running_var"), "missing key 'Mixed_4c.b2b.bn.running_var'"),
    (lambda s: s.update({"logits.conv3d.weight": torch.zeros(157, 1024, 1, 1, 1)}),
     r"key 'logits.conv3d.weight' has shape \(157, 1024, 1, 1, 1\), I3D expects \(400, 1024, 1, 1, 1\)"),
    (lambda s: s.update({"fc.weight": torch.zeros(3)}), "unexpected key 'fc.weight'"),
])
def test_a_wrong_key_is_a_one_line_error_naming_it(tmp_path, edit, message):
    state = InceptionI3d().state_dict()
    edit(state)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(UsageError, match=message) as error:
        load_i3d(tmp_path / "bad.pt", torch.device("cpu"))
    assert "\n" not in str(error.value) and "--i3d-weights" in str(error.value)


def test_missing_or_foreign_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--i3d-weights .*nope.pt: no such file"):
        load_i3d(tmp_path / "nope.pt", torch.device("cpu"))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(UsageError, match="not a PyTorch state dict"):
        load_i3d(tmp_path / "text.pt", torch.device("cpu"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UsageError, match="expected a state dict of tensors.*got list"):
        load_i3d(tmp_path / "list.pt", torch.device("cpu"))


def test_prepare_grey_short_clips():
    videos = torch.rand(2, 1, 4, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x = prepare_for_i3d(videos)
    assert x.shape == (2, 3, 12, I3D_SIZE, I3D_SIZE)  # 4 frames, each repeated ceil(9/4) = 3 times
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey to 3 equal channels
    assert torch.equal(x[:, :, 0], x[:, :, 2]) and not torch.equal(x[:, :, 2], x[:, :, 3])
    assert x.min() >= -1 and x.max() <= 1
    constant = prepare_for_i3d(torch.full((1, 3, 16, 300, 300), 0.25))  # long and large: only resized
    assert constant.shape == (1, 3, 16, I3D_SIZE, I3D_SIZE)
    torch.testing.assert_close(constant, torch.full_like(constant, 0.25))  # resizing keeps a constant


def test_logits_are_the_head_on_the_pooled_mixed_5c():
    net = _random_net(3)
    videos = torch.rand(1, 1, 9, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    pooled = i3d_features(net, videos)
    logits = i3d_features(net, videos, "logits")
    with torch.no_grad():
        expected_pooled = net(prepare_for_i3d(videos)).mean((2, 3, 4))
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=0)
    head = net.logits.conv3d
    expected = pooled.double() @ head.weight.flatten(1).T.double() + head.bias.double()  # a 1x1x1 conv is linear
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)  # fp32 sum of 1024 terms
    assert isinstance(net.logits, Unit3D) and pooled.shape == (1, 1024) and logits.shape == (1, 400)
