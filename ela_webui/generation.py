"""One generation with ELA on: its settings, each sampling pass, and what each image reports."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Optional

from PIL import Image

from modules import sd_samplers

from ela_ext.config import ElaConfig, replace
from ela_ext.entities import EntitySpecError, format_spec
from ela_webui.prompts import entity_phrases, first_sub_prompt, scheduled_texts
from ela_webui.sampling import AnchoredPass, ImageEntities, unanchorable_model, unanchorable_sampler

logger = logging.getLogger("ela")
HIRES_PREFIX = "hires_"


def schedule_steps(p) -> tuple[int, Optional[int]]:
    """The (steps, hires_steps) the WebUI scheduled this pass's prompts with (processing.py
    ``setup_conds`` / ``calculate_hr_conds``), so ``[from:to:when]`` switches at the same call."""
    if not getattr(p, "is_hr_pass", False):
        return p.firstpass_steps, None
    config = sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
    steps = p.hr_second_pass_steps or p.steps
    return p.firstpass_steps, config.total_steps(steps) if config else steps


def image_index(p, index: int, all_seeds: list) -> int:
    """The generation-wide index of the image an infotext is being written for.

    ``create_infotext`` gets the whole generation's seeds and a generation-wide ``index`` from
    ``Processed.infotext`` and the before-hires save, but only the current batch's seeds
    (``p.seeds``, a slice) and the position in that batch when each image is written
    (processing.py, ``process_images_inner``): with ``n_iter`` > 1 the latter is not the index.
    """
    return index if all_seeds is p.all_seeds else p.iteration * p.batch_size + index


class ElaRun:
    """Stored on ``p`` by the script's ``process``; gone with ``p`` when the generation ends."""

    def __init__(self, config: ElaConfig):
        self.config = config
        # Image index -> its first-pass and its hires-pass sampling (each batch has its own).
        self.first_pass: dict[int, AnchoredPass] = {}
        self.hires_pass: dict[int, AnchoredPass] = {}
        self.specs: dict[int, str] = {}
        self.warnings: dict[int, list[str]] = defaultdict(list)
        self._logged: set[str] = set()

    def warn(self, index: int, message: str) -> None:
        """Record for image ``index``'s infotext; log each distinct message to the console once."""
        if message not in self.warnings[index]:
            self.warnings[index].append(message)
        if message not in self._logged:
            self._logged.add(message)
            logger.warning("ELA: %s", message)

    def start_pass(self, p) -> None:
        """Wrap this batch's sampler: resolve each image's entities against the prompt it is
        conditioned on (extra networks stripped; hires prompts in the hires pass)."""
        prompts = p.hr_prompts if getattr(p, "is_hr_pass", False) else p.prompts
        reason = unanchorable_model(p.sd_model) or unanchorable_sampler(p)
        if reason:
            for position in range(len(prompts)):
                self.warn(p.iteration * p.batch_size + position, f"{reason}: image left unanchored")
            return
        steps, hires_steps = schedule_steps(p)
        images = []
        for position, prompt in enumerate(prompts):
            index = p.iteration * p.batch_size + position
            try:
                phrases = entity_phrases(self.config.entities, prompt)
            except EntitySpecError as error:
                self.warn(index, f"{error}: image left unanchored")
                continue
            text, sub_prompt_count = first_sub_prompt(prompt)
            if sub_prompt_count > 1:
                self.warn(index, "AND prompt: entities are anchored in the first sub-prompt only")
            self.specs.setdefault(index, format_spec(phrases))
            images.append(ImageEntities(index, position, phrases, scheduled_texts(text, steps, hires_steps)))
        if images:
            anchored = AnchoredPass(self, p, images)
            # The latest pass of its kind: Forge prepares its hires pass twice, and the second
            # (which releases the first's wrappers) is the one that samples.
            by_image = self.hires_pass if getattr(p, "is_hr_pass", False) else self.first_pass
            for image in images:
                by_image[image.index] = anchored

    @staticmethod
    def _session(index: int, passes: dict[int, AnchoredPass]):
        """(session, row) that anchored image ``index`` in one of ``passes``, or None."""
        anchored = passes.get(index)
        return anchored.image_sessions.get(index) if anchored else None

    # Infotext values: the WebUI calls these with create_infotext's locals (see ``image_index``).
    def settings_infotext(self, p, index: int, all_seeds: list, **_) -> str:
        """All settings, with the entities this image was anchored on (detected ones included)."""
        entities = self.specs.get(image_index(p, index, all_seeds), self.config.entities)
        return replace(self.config, entities=entities).to_infotext()

    def log_infotext(self, p, index: int, all_seeds: list, **_) -> Optional[str]:
        """The first pass's loss summary, then the hires pass's with each key prefixed ``hires_``
        (``steps=3;...;hires_steps=2;hires_updates=..``); None when neither pass was anchored."""
        index = image_index(p, index, all_seeds)
        first, hires = self._session(index, self.first_pass), self._session(index, self.hires_pass)
        parts = [first[0].infotext_summary() if first else "steps=0"]
        if hires:
            parts += [HIRES_PREFIX + item for item in hires[0].infotext_summary().split(";")]
        return ";".join(parts) if first or hires else None

    def warnings_infotext(self, p, index: int, all_seeds: list, **_) -> Optional[str]:
        """This image's warnings; a hires-pass warning says so (``hires pass: ...``)."""
        index = image_index(p, index, all_seeds)
        messages = list(self.warnings.get(index, []))
        for passes, prefix in ((self.first_pass, ""), (self.hires_pass, "hires pass: ")):
            found = self._session(index, passes)
            if found:
                messages += [prefix + message for message in found[0].warnings_for(found[1])]
        return "; ".join(dict.fromkeys(messages)) or None

    def mask_grid(self, index: int) -> Optional[Image.Image]:
        found = self._session(index, self.first_pass)
        return found[0].mask_grid(found[1]) if found else None
