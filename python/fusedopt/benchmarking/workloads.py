"""Workloads: the parameter shapes of real models and the small models of the Hessian benchmark.

The optimizer benchmarks only need shapes: an optimizer step's cost depends on the number
and sizes of the tensors, not on the network that produced the grads.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch

Shape = Tuple[int, ...]


def numel(shapes: Sequence[Shape]) -> int:
    """Total element count of a list of shapes."""
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def resnet50_shapes() -> List[Shape]:
    """torchvision resnet50's 161 parameter tensors (25,557,032 params), in module order."""
    shapes: List[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out_ch = width * 4
        for b in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if b == 0:  # projection shortcut
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    shapes += [(1000, 2048), (1000,)]
    return shapes


def gpt2_small_shapes() -> List[Shape]:
    """GPT-2 small (HF layout, tied lm_head): 148 tensors, 124,439,808 params."""
    d, vocab, ctx = 768, 50257, 1024
    shapes: List[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def _bert_shapes(h: int, ff: int, layers: int) -> List[Shape]:
    """BertModel's parameter shapes (embeddings, ``layers`` encoder layers, pooler)."""
    shapes: List[Shape] = [(30522, h), (512, h), (2, h), (h,), (h,)]
    for _ in range(layers):
        shapes += [(h, h), (h,)] * 4 + [(h,), (h,), (ff, h), (ff,), (h, ff), (h,), (h,), (h,)]
    shapes += [(h, h), (h,)]
    return shapes


def bert_base_shapes() -> List[Shape]:
    """BertModel (bert-base-uncased): 199 tensors, 109,482,240 params."""
    return _bert_shapes(768, 3072, 12)


def bert_large_shapes() -> List[Shape]:
    """BertModel (bert-large-uncased): 391 tensors, 335,141,888 params."""
    return _bert_shapes(1024, 4096, 24)


def many_tensors_shapes(count: int = 5000, size: int = 1000) -> List[Shape]:
    """``count`` equal 1-d tensors: per-tensor costs dominate as ``size`` shrinks."""
    return [(size,)] * count


def host_overhead_shapes() -> List[Shape]:
    """1000 tensors of 64 elements: the arithmetic is negligible, what is left is host work."""
    return many_tensors_shapes(1000, 64)


def odd_shapes() -> List[Shape]:
    """A few odd shapes (a 0-d tensor among them): a smoke test of a runner, not a benchmark."""
    return [(), (7,), (33, 5), (1000,)]


OPTIMIZER_WORKLOADS: Dict[str, Callable[[], List[Shape]]] = {
    "resnet50": resnet50_shapes,
    "gpt2-small": gpt2_small_shapes,
    "bert-base": bert_base_shapes,
    "5000x1000": many_tensors_shapes,
    "1000x64": host_overhead_shapes,
    "10000x64": lambda: many_tensors_shapes(10_000, 64),  # issue 12's host-overhead targets
    "10000x4096": lambda: many_tensors_shapes(10_000, 4096),  # the same on a GPU: 1.1 GB per Adam step
    "tiny": odd_shapes,
}


def scaled(shapes: Sequence[Shape], scale: float) -> List[Shape]:
    """Each tensor shrunk to ``scale`` of its elements (flattened; the tensor count stays)."""
    if scale == 1.0:
        return list(shapes)
    return [(max(1, round(numel([s]) * scale)),) for s in shapes]


def random_params_and_grads(shapes: Sequence[Shape], device: torch.device, seed: int = 0):
    """Fresh normal params and small normal grads (drawn on the CPU so every device sees the same)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [torch.randn(s, generator=gen).mul_(1e-2).to(device) for s in shapes]
    return params, grads


# ---- models of the Hessian benchmark --------------------------------------------------------------
def trained_mlp(steps: int = 100, seed: int = 0):
    """The MLP 20-32-32-10 of ``fusedopt spectrum`` (2058 params) on its 1024 clustered points,
    trained ``steps`` steps with fusedopt.Adam so that the spectrum is not that of the init.
    Returns (model, X, y)."""
    from fusedopt.hessian.cli import synthetic_problem

    return _trained_with_adam(*synthetic_problem(seed), steps)


def _trained_with_adam(model, X, y, steps: int):
    """(model, X, y) after ``steps`` full-batch cross-entropy steps of fusedopt.Adam at lr 1e-2."""
    import fusedopt

    opt = fusedopt.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model, X, y


def tanh_conv_net(width: int, batch: int, seed: int = 0):
    """A 5-layer tanh conv net on random 32x32 images: big enough (about 136 * width^2 params)
    that HVPs dominate, small enough to run on a CPU. Returns (model, X, y)."""
    torch.manual_seed(seed)
    c = width
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.Tanh(),
        torch.nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), torch.nn.Tanh(),
        torch.nn.Conv2d(2 * c, 2 * c, 3, padding=1), torch.nn.Tanh(),
        torch.nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), torch.nn.Tanh(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4 * c, 10))
    X, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    return model, X, y


def trained_tanh_cnn(steps: int = 100, seed: int = 0, width: int = 4, batch: int = 64):
    """tanh_conv_net(width, batch) (2478 params at width 4) trained ``steps`` steps with
    fusedopt.Adam on its random images and labels, so that the spectrum is not that of the
    init: the Hessian benchmark's second model for HVP counts. Returns (model, X, y)."""
    return _trained_with_adam(*tanh_conv_net(width, batch, seed), steps)


def bn_conv_net(width: int, batch: int, seed: int = 0):
    """A 4-layer ReLU conv net with BatchNorm on random 32x32 images (widths c, 2c, 4c, 4c,
    three stride-2 layers; about 240 * width^2 params): the small CNN on which the Hessian
    benchmark compares the two HVP methods. The BatchNorm running stats are those of one
    training-mode pass over the batch, not the init values. Returns (model, X, y)."""
    torch.manual_seed(seed)
    c = width
    layers, channels = [], [3, c, 2 * c, 4 * c, 4 * c]
    for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
        layers += [torch.nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1), torch.nn.BatchNorm2d(cout),
                   torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4 * c, 10))
    X, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    with torch.no_grad():
        model(X)
    return model, X, y
