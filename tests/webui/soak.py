"""A long session in one real WebUI: ``python -m tests.webui.soak --generations 200`` (test tooling,
not CI; ELA_WEBUI names the prepared host, as for the host tests).

A WebUI runs for days, so a leak of a few MB per generation, a hook left on one path in fifty or
a failure that only an unlucky mix provokes is a real defect that no single test shows. This
starts the WebUI with the extension linked and ELA_DEBUG=1, warms it up with one generation of
each kind, then runs the requested number mixing ELA off and on, every sampler, batch 2, hires
fix, img2img, AND prompts, bad entity specs and API values, NaN / OOM / exception injected into
the grad pass, interrupts and skips while anchoring, and a token-route preview of a random prompt
beside each. It prints the process's memory growth after warm-up, the torch tensors alive, the
hooks on the attention modules, the failed requests (a bad input is a warning, never an HTTP
error) and whether an ELA-off image made at the start and at the end are byte-identical. The exit
status is 1 when a goal is missed (growth >= 50 MB, extra tensors, hooks or failures, images
differ).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from tests.webui.webui_host import (SCRIPT_TITLE, SIZE, SPEC, WebUI, checkout_in_extensions, ela_args,
                                    txt2img_payload)

RSS_GROWTH_GOAL_MB = 50
# Reference for "off changes nothing over time": made first and last, compared byte for byte.
OFF_REFERENCE = txt2img_payload("Euler a", seed=4242)
SMALL = {"width": 64, "height": 64}
# Adaptive ignores the step count (hundreds of calls); every other sampler the host lists is used.
SKIPPED_SAMPLERS = {"DPM adaptive"}
BAD_SPECS = ["dog | cat", "cat", "cat | | frog", "(:.)", "black cat | white cat", "|||", "\u200b | \x00",
             "frog " * 300]
BAD_ARGS = [[True, SPEC, 5.0], [True, SPEC, "abc"], [True, SPEC, 0.3, 0, 0.5, "inf"], [True, SPEC, 0.3, 0.9, 0.1],
            [True, SPEC, 0.3, 0, 0.5, 5, 0.05, 0.1, "no-such-objective"]]
PREVIEW_WORDS = ["a", "black", "cat", "and", "green", "frog", "(red:1.2)", "[blue]", "BREAK", "AND", "<lora:x:1>",
                 "[a:b:0.5]", "[x|y]", "猫", ",", "with", "teapot"]
# One in four previews also gets these: stray brackets, a weight the WebUI cannot parse, NUL.
PREVIEW_NOISE = ["(", ")", "]", ":.", "(...:.)", "\x00"]


class Soak:
    """One WebUI session and its counters."""

    def __init__(self, server: WebUI, rng: random.Random):
        self.server = server
        self.rng = rng
        self.samplers = [s["name"] for s in server.get("/sdapi/v1/samplers") if s["name"] not in SKIPPED_SAMPLERS]
        self.failed: list[str] = []
        self.kinds: Counter = Counter()
        self.preview_statuses: Counter = Counter()
        self.anchored_images = 0
        self.init_image = server.txt2img(**txt2img_payload("Euler a", seed=1, **SIZE))["images"][0]

    # Each kind makes one request (interrupt and skip: one generation stopped part-way).
    def off(self) -> None:
        self._txt2img(txt2img_payload(self.rng.choice(self.samplers), seed=self.rng.randrange(10**6), **SMALL))

    def on(self) -> None:
        self._txt2img({**txt2img_payload(self.rng.choice(self.samplers), seed=self.rng.randrange(10**6), **SIZE),
                       **ela_args()})

    def batch(self) -> None:
        self._txt2img({**txt2img_payload("Euler a", batch_size=2, **SIZE), **ela_args()})

    def hires(self) -> None:
        self._txt2img({**txt2img_payload("DPM++ 2M", enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                                         denoising_strength=0.6, **SIZE), **ela_args()})

    def img2img(self) -> None:
        self._request("/sdapi/v1/img2img", {**txt2img_payload(self.rng.choice(self.samplers), **SIZE),
                                            "init_images": [self.init_image], "denoising_strength": 0.7,
                                            **ela_args()})

    def and_prompt(self) -> None:
        self._txt2img({**txt2img_payload("Euler a", prompt="a black cat and a green frog AND a forest", **SIZE),
                       **ela_args()})

    def bad_spec(self) -> None:
        self._txt2img({**txt2img_payload("Euler a", **SIZE), **ela_args(entities=self.rng.choice(BAD_SPECS))})

    def bad_args(self) -> None:
        self._txt2img({**txt2img_payload("Euler a", **SIZE),
                       "alwayson_scripts": {SCRIPT_TITLE: {"args": self.rng.choice(BAD_ARGS)}}})

    def fault(self) -> None:
        kind, step = self.rng.choice(["nan", "oom", "error"]), self.rng.choice([0, 1])
        self._request("/ela/v1/debug/fault", {"kind": kind, "step": step})
        self._txt2img({**txt2img_payload(self.rng.choice(self.samplers), **SIZE), **ela_args()})

    def interrupt(self) -> None:
        self._stop_while_anchoring({**txt2img_payload("Euler a", steps=20, **SIZE), **ela_args(window_end=1.0)},
                                   "/sdapi/v1/interrupt")

    def skip(self) -> None:
        self._stop_while_anchoring({**txt2img_payload("Euler", steps=20, n_iter=2, **SIZE),
                                    **ela_args(window_end=0.5)}, "/sdapi/v1/skip")

    KINDS = ["off", "on", "batch", "hires", "img2img", "and_prompt", "bad_spec", "bad_args", "fault", "interrupt",
             "skip"]

    def run(self, kind: str) -> None:
        self.kinds[kind] += 1
        getattr(self, kind)()
        self.preview()

    def preview(self) -> None:
        """The token route on a random prompt and spec: 200, or 422 with a reason."""
        words = PREVIEW_WORDS + (PREVIEW_NOISE if self.rng.random() < 0.25 else [])
        prompt = " ".join(self.rng.choices(words, k=self.rng.randrange(1, 40)))
        spec = self.rng.choice(["", SPEC, "cat | frog", "dog", "(:.) | x"])
        status, payload = self.server.request("POST", "/ela/v1/tokens", {"prompt": prompt, "entities": spec})
        self.preview_statuses[status] += 1
        if status not in (200, 422) or (status == 422 and not payload.get("detail")):
            self.failed.append(f"tokens {prompt!r} {spec!r}: HTTP {status} {str(payload)[:300]}")

    def _txt2img(self, payload: dict) -> None:
        self._request("/sdapi/v1/txt2img", payload)

    def _request(self, path: str, payload: dict) -> None:
        status, answer = self.server.request("POST", path, payload)
        if status != 200:
            self.failed.append(f"{path}: HTTP {status} {str(answer)[:300]}")
        elif isinstance(answer, dict) and "info" in answer:
            infotexts = json.loads(answer["info"])["infotexts"]
            self.anchored_images += sum(bool(re.search(r"ELA log: steps=[1-9]", text)) for text in infotexts)

    def _stop_while_anchoring(self, payload: dict, route: str) -> None:
        """Generate in a thread; once sampling reached step 1 (inside the window), POST ``route``."""
        worker = threading.Thread(target=self._txt2img, args=(payload,))
        worker.start()
        deadline = time.monotonic() + 120
        while worker.is_alive() and time.monotonic() < deadline:
            if self.server.get("/sdapi/v1/progress?skip_current_image=true")["state"]["sampling_step"] >= 1:
                self._request(route, {})
                break
            time.sleep(0.05)
        worker.join(timeout=600)


def figures(server: WebUI) -> dict:
    hooks = server.get("/ela/v1/debug/hooks")["hooks"]
    return {**server.get("/ela/v1/debug/memory"), "hooks": sum(hooks.values()), "modules": len(hooks)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--webui", default=os.environ.get("ELA_WEBUI"), help="prepared host folder (ELA_WEBUI)")
    args = parser.parse_args(argv)
    if not args.webui:
        parser.error("set ELA_WEBUI or pass --webui: the folder real-host/setup.sh prepared")
    root = Path(args.webui)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ela-soak-") as workdir, checkout_in_extensions(root), \
            WebUI(root, Path(workdir), "soak", {"ELA_DEBUG": "1"}, ready_path="/ela/v1/debug/hooks") as server:
        off_at_start = server.txt2img(**OFF_REFERENCE)["images"][0]
        soak = Soak(server, random.Random(args.seed))
        for kind in Soak.KINDS:  # warm-up: every path once, so first-use allocations are not growth
            soak.run(kind)
        before = figures(server)
        for index in range(args.generations):
            soak.run(soak.rng.choice(Soak.KINDS))
            if (index + 1) % 25 == 0:
                now = figures(server)
                print(f"{index + 1}/{args.generations} generations, {time.monotonic() - started:.0f} s, "
                      f"{len(soak.failed)} failed, RSS {now['rss_mb']:.1f} MB, {now['tensors']} tensors", flush=True)
        after = figures(server)
        off_identical = server.txt2img(**OFF_REFERENCE)["images"][0] == off_at_start
    growth = after["rss_mb"] - before["rss_mb"]
    report = {
        "generations": args.generations, "warm_up": len(Soak.KINDS), "kinds": dict(soak.kinds),
        "samplers": len(soak.samplers), "anchored_images": soak.anchored_images,
        "previews": dict(soak.preview_statuses),
        "rss_mb_after_warm_up": round(before["rss_mb"], 1), "rss_mb_end": round(after["rss_mb"], 1),
        "rss_growth_mb": round(growth, 1), "tensors_before": before["tensors"], "tensors_after": after["tensors"],
        "hooks_before": before["hooks"], "hooks_after": after["hooks"], "attention_modules": after["modules"],
        "failed_requests": len(soak.failed), "off_image_identical": off_identical,
        "seconds": round(time.monotonic() - started),
    }
    print(json.dumps(report, indent=1))
    for failure in soak.failed:
        print("FAILED", failure)
    ok = (growth < RSS_GROWTH_GOAL_MB and after["tensors"] <= before["tensors"] and after["hooks"] == before["hooks"]
          and not soak.failed and off_identical)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
