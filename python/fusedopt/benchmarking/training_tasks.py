"""Two small training tasks for comparing optimizer states (tests/test_quant8_training.py
and benchmarks/bench_low_memory.py --quality): a language-model-like task (next token
of a random Markov chain, embedding + MLP) and a small CNN (noisy class templates).
Seconds per run on a CPU core: everything is seeded, so a run replays exactly."""
from __future__ import annotations

import torch
from torch import nn


def lm_task(seed: int, vocab: int = 96, context: int = 8, width: int = 128):
    """(model, batches(step) -> (x, y), loss_fn). The chain's transitions are sparse
    (each token has 4 likely successors), so the loss can fall well below log(vocab)."""
    gen = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 4), generator=gen)
    model = nn.Sequential(nn.Embedding(vocab, width), nn.Flatten(), nn.Linear(context * width, width), nn.GELU(),
                          nn.LayerNorm(width), nn.Linear(width, vocab))
    data_gen = torch.Generator().manual_seed(seed + 1)

    def batch(step: int, size: int = 64):
        tokens = torch.empty(size, context + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (size,), generator=data_gen)
        for t in range(context):
            pick = torch.randint(0, 4, (size,), generator=data_gen)
            tokens[:, t + 1] = succ[tokens[:, t], pick]
        return tokens[:, :context], tokens[:, context]

    return model, batch, nn.functional.cross_entropy


def cnn_task(seed: int, classes: int = 10, size: int = 16):
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 3, size, size, generator=gen)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(128, classes))
    data_gen = torch.Generator().manual_seed(seed + 1)

    def batch(step: int, n: int = 64):
        y = torch.randint(0, classes, (n,), generator=data_gen)
        x = templates[y] + 2.0 * torch.randn(n, 3, size, size, generator=data_gen)
        return x, y

    return model, batch, nn.functional.cross_entropy


def train(task, make_opt, seed: int, steps: int, tail: int = 25) -> float:
    """The mean loss of the last ``tail`` steps of ``steps`` steps from the task's
    initial weights (seeded), with the optimizer make_opt(params)."""
    torch.manual_seed(seed)
    model, batch, loss_fn = task(seed)
    opt = make_opt(model.parameters())
    losses = []
    for step in range(steps):
        x, y = batch(step)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return sum(losses[-tail:]) / tail


TASKS = {"lm": (lm_task, 300), "cnn": (cnn_task, 200)}  # task -> (builder, steps)
