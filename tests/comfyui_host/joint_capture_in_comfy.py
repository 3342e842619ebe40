"""Which attention the joint capture reads on an SD3.5 checkpoint, in ComfyUI's Python (no server).

The server tests see the report and the images, not where the maps came from. Here the node and
a sampler run as the server runs them (``ElaAnchoring.patch``, then ``comfy.sample.sample`` under
``inference_mode``) with ``JointAttentionCapture.record`` and the q norms (``ln_q``) of every joint
block's ``x_block.attn`` (the joint attention) and ``x_block.attn2`` (SD3.5 Medium's image-only
one) watched. It prints one JSON line: the model's detected ``qk_norm`` and dual-attention
blocks, the report, and each kind of call the capture got, counted: the block, the query's
length, whether the capture kept it, and whose image queries it holds (``attn`` or ``attn2``).
Run by ``test_mmdit_in_comfy.py::test_the_capture_reads_the_joint_attention_never_attn2`` as

    cd $ELA_COMFY/ComfyUI && PYTHONPATH=. $ELA_COMFY/venv/bin/python \
        <checkout>/tests/comfyui_host/joint_capture_in_comfy.py <checkout> <checkpoint file name>
"""

import collections
import json
import sys

import comfy.cli_args

comfy.cli_args.args.cpu = True  # before model_management is imported

import torch  # noqa: E402

import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402

sys.path.append(sys.argv[1])

from ela_comfy.nodes import DEFAULTS, SETTINGS, ElaAnchoring  # noqa: E402
from ela_ext.joint_attention import JointAttentionCapture  # noqa: E402

PROMPT = "a black cat and a green frog"


def watch_queries(diffusion_model) -> dict:
    """The latest queries (after ``ln_q``, as the attention gets them) of each block's ``attn``
    and ``attn2``, by (block, name)."""
    latest = {}
    for index, block in enumerate(diffusion_model.joint_blocks):
        for name in ("attn", "attn2"):
            attention = getattr(block.x_block, name, None)
            if attention is not None:
                def keep(_module, _inputs, output, key=(index, name)):
                    latest[key] = output.reshape(output.shape[0], output.shape[1], -1)
                attention.ln_q.register_forward_hook(keep)
    return latest


def main():
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(f"models/checkpoints/{sys.argv[2]}", output_vae=False,
                                                      output_clip=False)[0]
        clip = comfy.sd.load_clip(["models/text_encoders/tiny-clip-l.safetensors"], clip_type=comfy.sd.CLIPType.SD3)
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    settings = {name: getattr(DEFAULTS, name) for name in SETTINGS}
    anchored, report = ElaAnchoring().patch(model, clip, PROMPT, True, "black cat | green frog", **settings)["result"]
    latest = watch_queries(model.model.diffusion_model)
    calls = collections.Counter()
    record = JointAttentionCapture.record

    def watched_record(capture, block, query, key, n_text, heads=None, n_image=None):
        wanted = capture.wants(block)
        image_queries = query[:, -n_image:]
        whose = [name for name in ("attn", "attn2") if (block, name) in latest
                 and latest[block, name].shape == image_queries.shape and torch.equal(latest[block, name], image_queries)]
        try:
            record(capture, block, query, key, n_text, heads, n_image)
        finally:
            kept = wanted and not capture.wants(block)
            calls[json.dumps({"block": block, "length": query.shape[1], "text": n_text, "image": n_image,
                              "kept": kept, "queries": whose})] += 1

    JointAttentionCapture.record = watched_record
    latent = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        comfy.sample.sample(anchored, noise, 4, 4.5, "euler", "sgm_uniform", positive, negative, latent,
                            disable_pbar=True, seed=1)
    config = model.model.model_config.unet_config
    print(json.dumps({"qk_norm": config.get("qk_norm"), "dual_attention": config.get("x_block_self_attn_layers"),
                      "report": report.text(), "calls": [dict(json.loads(call), count=count)
                                                         for call, count in calls.items()]}))


if __name__ == "__main__":
    main()
