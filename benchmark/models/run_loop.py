"""What every resumable benchmark training shares (the UNet or MM-DiT and the autoencoder): its run
folder and checkpoint, and the loop.

A run stops after the current step on SIGTERM or Ctrl-C, at ``max_steps`` or after ``max_minutes``,
always with a checkpoint; it writes one every ``ckpt_minutes`` and logs the mean of each named
loss every ``log_every`` steps as ``step N name value ... elapsed Ns`` (``train.logged_seconds``
adds those up for the training time the exported JSON records).
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from typing import Callable, Optional, TextIO

import numpy as np
import torch


def open_run(run_dir: Path, args: argparse.Namespace) -> tuple[Path, Optional[dict], argparse.Namespace]:
    """(checkpoint path, the checkpoint if the run has one, the arguments to train with) of
    ``run_dir``, made if missing. A resumed run keeps the design it was started with: only the
    stopping limits come from the command that resumes it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "ckpt.pt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.exists() else None
    if ckpt is not None:
        args = argparse.Namespace(**{**ckpt["args"], "max_steps": args.max_steps, "max_minutes": args.max_minutes})
    return ckpt_path, ckpt, args


def run_steps(train_step: Callable[[int], dict[str, float]], save: Callable[[int], None], log: TextIO,
              step: int, max_steps: int, max_minutes: float, ckpt_minutes: float, log_every: int) -> int:
    """Call ``train_step(step)`` (returns the step's named losses) from ``step`` on; ``save(step)``
    writes a checkpoint of the state after ``step`` steps. Returns the step reached."""
    stop = []
    handlers = {sig: signal.signal(sig, lambda *_: stop.append(True)) for sig in (signal.SIGTERM, signal.SIGINT)}
    start = last_save = time.time()
    losses: list[dict[str, float]] = []
    try:
        while not stop and step < max_steps and time.time() - start < max_minutes * 60:
            losses.append(train_step(step))
            step += 1
            if step % log_every == 0:
                means = " ".join(f"{name} {np.mean([entry[name] for entry in losses]):.4f}" for name in losses[0])
                log.write(f"step {step} {means} elapsed {time.time() - start:.0f}s\n")
                log.flush()
                losses = []
            if time.time() - last_save > ckpt_minutes * 60:
                save(step)
                last_save = time.time()
        save(step)
        log.write(f"# stopped at step {step}\n")
    finally:
        log.close()
        for sig, handler in handlers.items():  # the caller's own handlers back (a test's process)
            signal.signal(sig, handler)
    return step
