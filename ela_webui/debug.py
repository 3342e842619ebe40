"""What the real-host tests need to see inside a generation; on only with ``ELA_DEBUG=1`` at start.

Two things cannot be read from an image: whether the sampler continued from the anchored latent
(not just this call's UNet input), and whether any hook was left on an attention module. With the
variable set, the denoiser wrapper records every call of the last ELA generation (the latent it
got, the latent after anchoring, what the call returned) and ``/ela/v1/debug/*`` serve them, the
per-step loss log and the hook counts. Without it nothing is recorded and the routes do not exist.
A long session (tests/webui/soak.py) also reads the live tensors and the process's memory here.

A failing grad pass (NaN, out of memory, a bug) must leave the image as ELA off would have made
it from that step on, and no hook behind. Such failures cannot be provoked from outside on a
healthy host, so a test arms one (``arm_fault``) for the next ELA generation and the grad pass
calls ``inject_fault``.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from typing import Optional

import torch

from ela_webui.mmdit import patched_functions

ENABLED = os.environ.get("ELA_DEBUG") == "1"

# Calls and anchoring sessions of the current (or last) ELA generation, in order.
calls: list[dict] = []
sessions: list = []


@dataclasses.dataclass(frozen=True)
class Fault:
    """Every grad pass at sampling step ``step`` (0-based) fails: ``kind`` "nan", "oom" or "error"."""

    kind: str
    step: int


# Set by the route; the next ELA generation takes it as its ``fault``, so it fires in one only.
armed_fault: Optional[Fault] = None
fault: Optional[Fault] = None


def _rows(tensor: torch.Tensor) -> list[list[float]]:
    return tensor.detach().float().cpu().flatten(1).tolist()


class CallRecord:
    """One denoiser call: ``x_in`` as the sampler passed it, ``x_anchored`` after our in-place
    write (None when this call anchored nothing), ``output`` the CFG denoiser's result."""

    def __init__(self, x: torch.Tensor):
        self.entry: dict = {"x_in": _rows(x)}
        self._x_in = x.detach().clone()
        calls.append(self.entry)

    def anchored(self, x: torch.Tensor, step: Optional[int]) -> None:
        self.entry["step"] = step
        self.entry["x_anchored"] = None if torch.equal(x, self._x_in) else _rows(x)

    def returned(self, output: torch.Tensor, sigma: float) -> None:
        self.entry["output"] = _rows(output)
        self.entry["sigma"] = sigma


def start_generation() -> None:
    global armed_fault, fault
    calls.clear()
    sessions.clear()
    fault, armed_fault = armed_fault, None


def arm_fault(kind: str, step: int) -> None:
    global armed_fault
    armed_fault = Fault(kind, step)


def inject_fault(latent: torch.Tensor, step: int) -> torch.Tensor:
    """The grad pass's UNet input at ``step``: ``latent``, or the armed fault (a NaN input that
    the engine's finiteness checks must catch, or the exception a real failure would raise)."""
    if fault is None or fault.step != step:
        return latent
    if fault.kind == "nan":
        return latent * float("nan")
    if fault.kind == "oom":
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
    raise RuntimeError("grad pass failed (injected)")


def step_logs() -> list[dict]:
    """Every anchored step's losses (one per grad pass) and update count, session by session."""
    return [{"step": log.step, "losses": log.losses, "updates": log.updates}
            for session in sessions for log in session.steps]


def hook_counts(unet: torch.nn.Module) -> dict[str, int]:
    """Forward/backward (pre-)hooks on every attention module of the UNet and on its projections
    (where training hooks its changes), by attention module name; for an MM-DiT, also whether the
    host's joint-attention functions are replaced (``mmdit.patched_functions``)."""
    hooks = {name: sum(len(getattr(owner, attr)) for owner in (module, module.to_q, module.to_k, module.to_v)
                       for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
             for name, module in unet.named_modules() if hasattr(module, "to_q") and hasattr(module, "to_k")}
    return {**patched_functions(unet), **hooks}


def memory() -> dict[str, float]:
    """Torch tensors the garbage collector tracks (after a collection) and the resident memory in MB:
    what a generation that leaks (a kept session, a hook's closure, a cached map) makes grow."""
    gc.collect()
    tensors = sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))
    with open("/proc/self/status") as status:
        rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return {"tensors": tensors, "rss_mb": rss_kb / 1024}
