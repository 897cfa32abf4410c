"""Running a unit's optimisation steps, eagerly or as one replayed CUDA graph.

A unit's step (forward of a block on a batch of 32, loss, backward, Adam) is a few hundred small kernels; on an
H200 it took about 4.9 ms at batch 32 and at batch 128 alike (experiments/results/recon_quality_h200.json):
the loop waits on Python and kernel launches, not on arithmetic. Captured once as a CUDA graph
(torch.cuda.graph) and replayed, a step is one launch. The captured step reads its batch indices and the
regulariser's exponent from tensors with fixed addresses, which ``prepare(it)`` refills before each replay, so
replaying computes exactly what the eager step computes.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Callable

import torch

log = logging.getLogger(__name__)

EAGER_FIRST = 2  # eager steps before capture: lazy initialisation (Adam's state, cuBLAS workspaces) happens here


def run_steps(step: Callable[[], None], iterations: range, prepare: Callable[[int], None],
              optimizer: torch.optim.Optimizer, graphs: bool) -> None:
    """For each ``it`` in ``iterations``: ``prepare(it)`` then ``step()`` (forward, backward, optimizer step).

    With ``graphs`` (CUDA only; the optimizer must be ``capturable``) the first steps run eagerly on a side
    stream, the next is captured and every remaining one replays the capture. If capture fails, the remaining
    steps run eagerly (logged), with the same results."""
    its = list(iterations)
    if not its:
        return
    graph, stream = None, None
    if graphs:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
    for n, it in enumerate(its):
        if graph is not None:
            prepare(it)
            graph.replay()
            continue
        if graphs and n == EAGER_FIRST:
            graph = _capture(step, optimizer, stream)
            if graph is None:
                graphs = False
            else:
                prepare(it)
                graph.replay()
                continue
        with torch.cuda.stream(stream) if graphs else nullcontext():
            prepare(it)
            optimizer.zero_grad(set_to_none=True)
            step()
    if stream is not None:
        torch.cuda.current_stream().wait_stream(stream)
    optimizer.zero_grad(set_to_none=True)  # the gradients lived in the graph's memory pool


def _capture(step, optimizer, stream) -> torch.cuda.CUDAGraph | None:
    torch.cuda.current_stream().wait_stream(stream)
    optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the gradients in the graph's pool
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except Exception as err:  # noqa: BLE001 - an op that cannot be captured: the same steps, eagerly
        log.warning("reconstruction step could not be captured as a CUDA graph (%s: %s); running it eagerly",
                    type(err).__name__, err)
        optimizer.zero_grad(set_to_none=True)
        return None
    return graph

