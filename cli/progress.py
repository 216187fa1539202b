"""Progress bars for long loops (tqdm on stderr), as callbacks the library accepts."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def loss_bar(description: str, total: int | None = None) -> Iterator:
    """A bar for ``progress(step, total, loss)`` callbacks (training)."""
    from tqdm import tqdm

    with tqdm(total=total, desc=description, unit="step", dynamic_ncols=True) as bar:
        def update(step: int, total_steps: int, loss: float) -> None:
            bar.total = total_steps
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.refresh()
        yield update


@contextmanager
def residual_bar(description: str, total: int) -> Iterator:
    """A bar for ``progress(iteration, relative_residual)`` callbacks (solvers)."""
    from tqdm import tqdm

    with tqdm(total=total, desc=description, unit="it", dynamic_ncols=True) as bar:
        def update(iteration: int, residual: float) -> None:
            bar.n = iteration
            bar.set_postfix(residual=f"{residual:.2e}", refresh=False)
            bar.refresh()
        yield update
