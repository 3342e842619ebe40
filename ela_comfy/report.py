"""What an anchoring node's last sampling run reports: the log line, the per-step losses, the
warnings and the mask grid. The anchoring node returns a ``RunReport`` (the ``ELA_RUN`` output),
its patch fills it when a sampler runs (after the node itself has run, so the node cannot return
it), and the report node reads it once the sampler's latent exists. Host-free.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from PIL import Image

logger = logging.getLogger("ela")


class RunReport:
    """Warnings from the node (a spec that does not fit: they hold for every run of its model)
    and the last sampling run's summary, step lines, warnings and mask grid."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.node_warnings: list[str] = []
        self.summary: Optional[str] = None
        self.step_lines: list[str] = []
        self.run_warnings: list[str] = []
        self.grid: Optional[Image.Image] = None

    def warn_node(self, message: str) -> None:
        self.node_warnings.append(message)
        logger.warning("ELA: %s", message)

    def record_run(self, summary: str, step_lines: Sequence[str], warnings: Sequence[str],
                   grid: Optional[Image.Image]) -> None:
        """One sampling run's results; the console gets the summary and each step's losses."""
        self.summary, self.step_lines, self.run_warnings, self.grid = summary, list(step_lines), list(warnings), grid
        logger.info("ELA log: %s", summary)
        for line in step_lines:
            logger.info("ELA %s", line)
        if warnings:
            logger.warning("ELA warnings: %s", "; ".join(warnings))

    @property
    def warnings(self) -> list[str]:
        return list(dict.fromkeys(self.node_warnings + self.run_warnings))

    def text(self) -> str:
        """``ELA log: steps=..;updates=..;first=a->b;last=c->d``, the steps, ``ELA warnings: ..``."""
        if not self.enabled:
            return "ELA off"
        if self.summary is not None:
            lines = [f"ELA log: {self.summary}"]
        else:  # a node warning leaves the model unpatched: its samplers run plain
            lines = ["ELA log: steps=0" if self.node_warnings else "ELA log: no sampling run yet"]
        lines += self.step_lines
        if self.warnings:
            lines.append("ELA warnings: " + "; ".join(self.warnings))
        return "\n".join(lines)
