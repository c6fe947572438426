"""Models of the kinds that stopped users on real checkpoints."""

import torch
from torch import nn


class Streaming(nn.Module):
    """Called as model(x, sr), and keeps a state between calls (as silero-vad does)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.register_buffer("state", torch.zeros(8))

    def forward(self, x, sr):
        if sr != 16000:
            raise ValueError("sr must be 16000")
        out = self.fc(x + self.state)
        self.state = 0.5 * self.state + x.detach().mean(0)
        return out


class PartlyFrozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)
        self.features.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.features(x)))


class SpeakerEncoder(nn.Module):
    """An LSTM over frames and a linear head, as Resemblyzer's encoder (its loss's two
    parameters live in the training checkpoint, not in this model)."""

    def __init__(self, n_mels=6, hidden=12, embedding=4):
        super().__init__()
        self.lstm = nn.LSTM(n_mels, hidden, num_layers=2, batch_first=True)
        self.linear = nn.Linear(hidden, embedding)

    def forward(self, frames):
        out, _ = self.lstm(frames)
        return self.linear(out[:, -1])
