"""A floor for learnt embeddings: features of a randomly initialised 1-D CNN.

A stack of ``depth`` Conv1d(kernel 7, stride 2) + ReLU layers, ``width`` channels each (the
first takes the window's channels), never trained; a window's features are the mean and the
standard deviation over time of the last layer's output ([2 * width]). Random convolutions
already pick out QRS-like slopes and their spacing, so whatever pretraining adds has to be
measured against this floor as well as against a randomly initialised encoder.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from csfm.data.windows import RecordWindows

KERNEL, STRIDE = 7, 2


def random_cnn(in_channels: int, width: int = 64, depth: int = 4, seed: int = 0) -> nn.Module:
    """The untrained CNN (PyTorch's default initialisation under ``torch.manual_seed(seed)``)."""
    if width < 1 or depth < 1:
        raise ValueError(f"width and depth must be >= 1, got {width} and {depth}")
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv1d(in_channels if i == 0 else width, width, KERNEL, STRIDE, KERNEL // 2), nn.ReLU()]
    return nn.Sequential(*layers).eval()


@torch.no_grad()
def random_cnn_features(windows: list[RecordWindows], width: int = 64, depth: int = 4, seed: int = 0,
                        batch_windows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(features [W, 2 * width] float32 of every window of every record, owner [W]: the
    record's position in ``windows``). Every record must have the same channel count."""
    channels = {part.x.shape[1] for part in windows}
    if len(channels) != 1:
        raise ValueError(f"the random CNN takes one channel count, got records with {sorted(channels)}")
    net = random_cnn(channels.pop(), width, depth, seed)
    x = np.concatenate([part.x for part in windows])
    owner = np.concatenate([np.full(len(part.x), r) for r, part in enumerate(windows)])
    out = []
    for start in range(0, len(x), batch_windows):
        h = net(torch.from_numpy(x[start:start + batch_windows]))
        out.append(torch.cat([h.mean(-1), h.std(-1)], 1).numpy())
    return np.concatenate(out), owner
