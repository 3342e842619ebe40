"""ELA under every cross-attention optimisation the WebUI offers on CPU (one WebUI per flag).

The capture recomputes the maps from each layer's own ``to_q`` / ``to_k`` in a pre-hook, so it
does not depend on which forward the WebUI gave ``CrossAttention``; these tests hold that for
each backend: on anchors with a falling loss, off is byte-identical (no ELA entry, ELA sent
disabled, and after an ELA generation). xformers needs CUDA and cannot run here.
"""

from __future__ import annotations

import pytest

from webui_host import (SCRIPT_TITLE, SIZE, SPEC, WebUI, assert_on_changes_the_image_and_the_loss_falls,
                        checkout_in_extensions, ela_args, txt2img_payload)

# (WebUI flag, the name it logs in "Applying attention optimization: NAME"; None: it disables them)
BACKENDS = [
    ("--opt-sdp-attention", "sdp"),
    ("--opt-sdp-no-mem-attention", "sdp-no-mem"),
    ("--opt-sub-quad-attention", "sub-quadratic"),
    ("--opt-split-attention", "Doggettx"),
    ("--opt-split-attention-v1", "V1"),
    ("--opt-split-attention-invokeai", "InvokeAI"),
    ("--disable-opt-split-attention", None),
]


@pytest.fixture(scope="module", params=BACKENDS, ids=[flag for flag, _ in BACKENDS])
def backend_host(request, webui_root, workdir):
    flag, name = request.param
    with checkout_in_extensions(webui_root), WebUI(webui_root, workdir, f"backend{flag}", {"ELA_DEBUG": "1"},
                                                   ready_path="/ela/v1/debug/hooks", extra_flags=(flag,)) as server:
        server.backend_line = (f"Applying attention optimization: {name}... done." if name
                               else "Disabling attention optimization")
        yield server


def test_on_anchors_with_a_falling_loss(backend_host):
    assert_on_changes_the_image_and_the_loss_falls(backend_host, "Euler a")
    assert backend_host.backend_line in backend_host.log.read_text(), backend_host.log_tail()


def test_off_is_byte_identical_before_and_after_an_ela_generation(backend_host):
    payload = txt2img_payload("DPM++ 2M", **SIZE)
    off = backend_host.txt2img(**payload)["images"]
    disabled = backend_host.txt2img(**payload, alwayson_scripts={SCRIPT_TITLE: {"args": [False, SPEC]}})["images"]
    backend_host.txt2img(**payload, **ela_args())
    assert disabled == off and backend_host.txt2img(**payload)["images"] == off
