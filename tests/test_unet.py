import pytest
import torch

from fastdiff.nn.unet import UNet, count_parameters, preset


def test_cifar_ddpm_has_the_papers_parameter_count():
    model = UNet(preset("cifar-ddpm"))
    assert count_parameters(model) == 35_746_307  # DDPM paper: 35.7 M
    x = torch.randn(1, 3, 32, 32)
    assert model(x, torch.tensor([5])).shape == x.shape


@pytest.mark.parametrize("batch", [1, 3])
def test_digits_shapes(batch):
    model = UNet(preset("digits")).eval()
    x = torch.randn(batch, 1, 16, 16)
    assert model(x, torch.randint(0, 1000, (batch,))).shape == x.shape
    assert model(x, torch.tensor(7)).shape == x.shape  # scalar t broadcasts


def test_class_conditioning_uses_a_null_class():
    model = UNet(preset("digits", num_classes=10, image_size=8)).eval()
    assert model.class_emb.num_embeddings == 11
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 3])
    uncond = model(x, t)
    assert torch.equal(model(x, t, torch.tensor([-1, -1])), uncond)
    with torch.no_grad():
        model.class_emb.weight.normal_()
    assert not torch.allclose(model(x, t, torch.tensor([1, 2])), model(x, t))


def test_time_changes_output():
    model = UNet(preset("digits", image_size=8)).eval()
    x = torch.randn(1, 1, 8, 8)
    assert not torch.allclose(model(x, torch.tensor([1])), model(x, torch.tensor([900])))


@pytest.mark.parametrize("kwargs,match", [(dict(image_size=10), "divisible"), (dict(ch=48), "multiple of 32")])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preset("digits", **kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        preset("imagenet")
