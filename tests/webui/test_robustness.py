"""Reliability in the real WebUI: odd input to the token route, two clients at once, and the debug
routes absent without ``ELA_DEBUG=1`` (see conftest.py for the host).

The token route runs in FastAPI's thread pool beside whatever generation holds the queue lock, so
it must neither fail on any text a user pastes nor disturb that generation.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prompt_strategies import PROMPTS, SPECS
from webui_host import (SIZE, SPEC, WebUI, checkout_in_extensions, ela_args, hook_counts, infotext, pixels,
                        txt2img_payload)

TOKENS = "/ela/v1/tokens"
DEBUG_ROUTES = [("GET", "/ela/v1/debug/calls"), ("GET", "/ela/v1/debug/hooks"), ("POST", "/ela/v1/debug/fault"),
                ("GET", "/ela/v1/debug/memory")]


def test_debug_routes_are_absent_without_ela_debug(webui_root, workdir):
    """Its own WebUI, started with ELA_DEBUG=0 (first in this file: the shared host starts later)."""
    with checkout_in_extensions(webui_root), WebUI(webui_root, workdir, "no-debug", {"ELA_DEBUG": "0"},
                                                   ready_path="/sdapi/v1/sd-models") as server:
        # Extensions' routes come last (on_app_started), with the token route the debug ones would.
        deadline = time.monotonic() + 120
        while server.request("POST", TOKENS, {"prompt": "a cat and a frog", "entities": ""})[0] != 200:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.5)
        for method, path in DEBUG_ROUTES:
            assert server.request(method, path, {} if method == "POST" else None)[0] == 404, path


def _assert_answer_or_reason(status: int, payload, prompt: str, spec: str) -> None:
    """200 with columns that are text tokens, or 422 with a reason; never a 500."""
    assert status in (200, 422), (status, payload, prompt, spec)
    if status == 422:
        assert isinstance(payload["detail"], str) and payload["detail"], payload
        return
    texts = {token["column"]: token["text"] for token in payload["tokens"]}
    for entity in payload["entities"]:
        assert entity["columns"] and all(column in texts for column in entity["columns"]), entity


OUTCOMES: dict[int, int] = {}


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(PROMPTS, st.one_of(st.just(""), SPECS))
def test_token_route_answers_any_prompt_and_spec(host, prompt, spec):
    status, payload = host.request("POST", TOKENS, {"prompt": prompt, "entities": spec})
    OUTCOMES[status] = OUTCOMES.get(status, 0) + 1
    _assert_answer_or_reason(status, payload, prompt, spec)


def test_token_route_outcomes_counted(capsys):
    """Runs after the property above: prints how many answers of each status it got."""
    with capsys.disabled():
        print(f"\ntoken route, generated prompts and specs: {dict(sorted(OUTCOMES.items()))}")
    assert set(OUTCOMES) <= {200, 422}


def test_prompts_the_webui_cannot_parse_answer_422(host):
    """The WebUI's own parsers raise on these (ValueError, OverflowError); that was a 500."""
    for prompt, reason in [("a black cat and a (green:.) frog", "emphasis weight"),
                           ("a (...:.) cat and a frog", "emphasis weight"),
                           ("a cat and a [frog:dog:1e999]", "cannot parse this prompt")]:
        status, payload = host.request("POST", TOKENS, {"prompt": prompt, "entities": ""})
        assert status == 422 and reason in payload["detail"], (prompt, status, payload)


def _timed(host, body: dict) -> tuple[int, object, float]:
    started = time.perf_counter()
    status, payload = host.request("POST", TOKENS, body)
    return status, payload, time.perf_counter() - started


def test_oversized_input_is_refused_quickly(host, capsys):
    """Over the limits of routes.py: 422 naming the limit, before any parsing. Times are printed
    (the CI machine's load varies); the largest accepted prompt is answered too."""
    words = ("a black cat and a green frog, " * 700)[:20_000]
    cases = {
        "20000-char prompt (the limit)": ({"prompt": words, "entities": SPEC}, 200, None),
        "20001-char prompt": ({"prompt": words + "x", "entities": ""}, 422, "20000"),
        "5 MB prompt": ({"prompt": "cat " * 1_250_000, "entities": ""}, 422, "20000"),
        "2001-char spec": ({"prompt": "a cat and a frog", "entities": "cat " * 500 + "x"}, 422, "2000"),
        "41 brackets with [a|b]": ({"prompt": "[cat|dog] " * 41, "entities": ""}, 422, "too many brackets"),
        "20000 spaces": ({"prompt": " " * 19_980 + "a cat and a frog", "entities": ""}, 200, None),
        "3000 round brackets": ({"prompt": "(cat) " * 3_000, "entities": ""}, 200, None),
    }
    for name, (body, expected, reason) in cases.items():
        status, payload, seconds = _timed(host, body)
        with capsys.disabled():
            print(f"\ntoken route, {name}: HTTP {status} in {seconds:.2f} s")
        assert status == expected, (name, status, str(payload)[:500])
        if reason:
            assert reason in str(payload["detail"]), (name, payload)


def test_two_clients_at_once(host):
    """While an ELA generation runs, other clients preview tokens and queue generations with ELA on
    and off: every answer equals what the same request gives alone, and no hook is left."""
    long_run = {**txt2img_payload("Euler a", steps=16, **SIZE), **ela_args(window_end=1.0)}
    others = [txt2img_payload("DPM++ 2M", seed=7, **SIZE),
              {**txt2img_payload("Euler a", seed=8, batch_size=2, **SIZE), **ela_args()},
              {**txt2img_payload("DDIM", seed=9, prompt="a red cube next to a blue ball", **SIZE),
               **ela_args(entities="")}]
    previews = [{"prompt": "a black cat and a green frog", "entities": SPEC},
                {"prompt": "a (black:1.3) cat BREAK a [green] frog, " * 12, "entities": ""},
                {"prompt": "a cat <lora:x:1> and a [dog:frog:0.5]", "entities": "cat | frog"},
                {"prompt": "a lonely cat", "entities": "cat | dog"}]
    hooks = hook_counts(host)
    alone_long = host.txt2img(**long_run)
    alone_others = [host.txt2img(**payload) for payload in others]
    alone_previews = [host.request("POST", TOKENS, body) for body in previews]

    with ThreadPoolExecutor(max_workers=8) as pool:
        long_future = pool.submit(host.txt2img, **long_run)
        long_done = threading.Event()
        long_future.add_done_callback(lambda _: long_done.set())
        deadline = time.monotonic() + 120
        while host.get("/sdapi/v1/progress?skip_current_image=true")["state"]["sampling_step"] < 1:
            assert not long_future.done() and time.monotonic() < deadline, host.log_tail()
            time.sleep(0.05)
        other_futures = [pool.submit(host.txt2img, **payload) for payload in others]
        preview_futures = [pool.submit(host.request, "POST", TOKENS, body) for body in previews * 10]
        previews_together, answered_while_sampling = [], 0
        for future in preview_futures:
            previews_together.append(future.result())
            answered_while_sampling += not long_done.is_set()
        assert answered_while_sampling > 0
        together_long = long_future.result()
        together_others = [future.result() for future in other_futures]

    assert previews_together == alone_previews * 10
    for alone, together in zip([alone_long, *alone_others], [together_long, *together_others]):
        assert [pixels(image) for image in together["images"]] == [pixels(image) for image in alone["images"]]
        assert together["info"]["infotexts"] == alone["info"]["infotexts"]
    assert "ELA log: steps=16;" in infotext(together_long)
    assert hook_counts(host) == hooks
