"""The CPU thread pool across resizes: set_num_threads between steps recreates
the workers, and a step must still return only after every chunk is written."""
import torch

import fusedopt

CHUNK = 32768


def test_resizing_between_steps_never_returns_early():
    g = torch.randn(16 * CHUNK + 3)
    p = torch.nn.Parameter(torch.randn(16 * CHUNK + 3))
    p.grad = g
    opt = fusedopt.SGD([p], lr=1.0)
    for i in range(100):
        # 2 and 4 threads: 1 and 3 workers, recreated on every change.
        fusedopt.set_num_threads(2 if i % 2 else 4)
        want = p.detach() - g
        opt.step()
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=0, msg=f"step {i}")
