"""The PyTorch port's DeepMask (foolwood/deepmask-pytorch models/DeepMask.py after its
updatePadding) rebuilt from torch.nn at a small width, with the port's module names, so its
state dict has the port's keys. Import only where torch is installed."""

import torch
from torch import nn

WIDTH, PATCH, MASK, TARGET = 4, 32, 6, 10


class SymmetricPad(nn.Module):
    """Mirror padding that repeats the edge (the port's SymmetricPad2d), by flipping slices."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        p = self.p
        x = torch.cat([x[:, :, :p].flip(2), x, x[:, :, -p:].flip(2)], dim=2)
        return torch.cat([x[:, :, :, :p].flip(3), x, x[:, :, :, -p:].flip(3)], dim=3)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck after the port's updatePadding: conv2 = (ReflectionPad2d, conv)."""

    def __init__(self, n_in, n, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(n_in, n, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(n)
        self.conv2 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(n, n, 3, stride, bias=False))
        self.bn2 = nn.BatchNorm2d(n)
        self.conv3 = nn.Conv2d(n, 4 * n, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * n)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or n_in != 4 * n:
            self.downsample = nn.Sequential(nn.Conv2d(n_in, 4 * n, 1, stride, bias=False), nn.BatchNorm2d(4 * n))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class Reshape(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, x):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.size, self.size)


class PortDeepMask(nn.Module):
    """The port's models/DeepMask.py at a small width, module names and all."""

    def __init__(self, blocks=(2, 1, 1)):
        super().__init__()
        self.patch, self.mask, self.target = PATCH, MASK, TARGET
        f_size = PATCH // 16
        stages, n_in = [], WIDTH
        for s, count in enumerate(blocks):
            n = WIDTH * 2**s
            layers = [Bottleneck(n_in if b == 0 else 4 * n, n, 2 if (s and b == 0) else 1) for b in range(count)]
            stages.append(nn.Sequential(*layers))
            n_in = 4 * n
        stem = nn.Sequential(SymmetricPad(3), nn.Conv2d(3, WIDTH, 7, 2, bias=False))
        trunk1 = nn.Sequential(stem, nn.BatchNorm2d(WIDTH), nn.ReLU(), nn.MaxPool2d(3, 2, 1), *stages)
        trunk2 = nn.Sequential(nn.Conv2d(n_in, 8, 1), nn.ReLU(), nn.Conv2d(8, 16, f_size))
        self.trunk = nn.Sequential(trunk1, trunk2)
        self.crop_trick = nn.ZeroPad2d(-1)
        self.maskBranch = nn.Sequential(
            nn.Sequential(nn.Conv2d(16, MASK * MASK, 1), Reshape(MASK)), nn.UpsamplingBilinear2d(size=[TARGET, TARGET])
        )
        self.scoreBranch = nn.Sequential(
            nn.Dropout(0.5), nn.Conv2d(16, 12, 1), nn.Threshold(0, 1e-6), nn.Dropout(0.5), nn.Conv2d(12, 1, 1)
        )

    def forward(self, x):
        feat = self.crop_trick(self.trunk(x))
        return self.maskBranch(feat), self.scoreBranch(feat)


def random_port(seed: int = 0) -> PortDeepMask:
    """A port DeepMask in eval mode with random weights and random BatchNorm statistics and
    affines (fresh BatchNorms are the identity, which would hide a misplaced one)."""
    torch.manual_seed(seed)
    model = PortDeepMask()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model.eval()
