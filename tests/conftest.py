import pytest
import torch

from fastdiff.nn.unet import UNet, UNetConfig

TINY = UNetConfig(image_size=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  dropout=0.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model() -> UNet:
    torch.manual_seed(0)
    return UNet(TINY).eval()
