"""Record what ComfyUI computes for MM-DiT models, for the host-free tests (tests/test_joint_attention.py).

Run with the prepared ComfyUI's Python, from its checkout, after the tiny models are built
(comfy-host/mmdit/make_tiny_sd3.py and make_tiny_flux.py):

    cd $ELA_COMFY/ComfyUI && PYTHONPATH=. $ELA_COMFY/venv/bin/python \
        <checkout>/tests/comfyui_host/record_mmdit_fixtures.py \
        <checkout>/tests/fixtures

It writes ``comfy_mmdit_tokens.json``: ``CLIP.tokenize`` output of ComfyUI's SD3 tokenizer (CLIP-L,
CLIP-G, T5) and Flux tokenizer (CLIP-L, T5) for each prompt and word the tests resolve, with the T5
pieces; and ``comfy_mmdit_attention.safetensors``: the queries, keys, values and ComfyUI's own
attention output of the first joint block of the tiny SD3 MMDiT and the tiny Flux at the first
sampling step (4 heads kept of Flux's 24, to keep the file small), exactly as ComfyUI hands them
to its attention function (``optimized_attention_override``), with the text length.
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import comfy.cli_args

comfy.cli_args.args.cpu = True

import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.text_encoders.flux  # noqa: E402
import comfy.text_encoders.sd3_clip  # noqa: E402

PROMPTS = ["a black cat and a green frog", "a red cube and a blue ball", "a hummingbird and a cats",
           "a (black cat:1.2) and a green frog"]
WORDS = ["black", "cat", "green", "frog", "red", "cube", "blue", "ball", "hummingbird", "bird", "cats"]
FLUX_HEADS_KEPT = 4


def chunks_json(chunks):
    return [[[int(entry[0]), float(entry[1])] for entry in chunk] for chunk in chunks]


def tokenizers():
    out = {}
    for family, tokenizer in (("sd3", comfy.text_encoders.sd3_clip.SD3Tokenizer()),
                              ("flux", comfy.text_encoders.flux.FluxTokenizer())):
        texts = {text: {key: chunks_json(chunks) for key, chunks in tokenizer.tokenize_with_weights(text).items()}
                 for text in PROMPTS + WORDS}
        t5 = tokenizer.t5xxl.tokenizer
        ids = sorted({entry[0] for value in texts.values() for entry in value["t5xxl"][0]})
        out[family] = {"texts": texts, "t5_pieces": dict(zip(map(str, ids), t5.convert_ids_to_tokens(ids))),
                       "t5_end": int(tokenizer.t5xxl.end_token), "t5_pad": int(tokenizer.t5xxl.pad_token),
                       "t5_min_length": int(tokenizer.t5xxl.min_length)}
    return out


def record_block0(model, positive, negative, cfg, name, store):
    """Run 1 euler step with block 0 replaced by a pass-through that records its attention call."""
    def attention(function, *args, **kwargs):
        if name + ".q" not in store:
            query, key, value = args[:3]
            output = kept = function(*args, **kwargs)
            heads = kwargs["heads"] if "heads" in kwargs else args[3]
            if kwargs.get("skip_reshape"):  # Flux: (B, H, L, D); keep the first heads
                query, key, value = (t[:, :FLUX_HEADS_KEPT] for t in (query, key, value))
                kept = output[..., :FLUX_HEADS_KEPT * query.shape[-1]]
                heads = FLUX_HEADS_KEPT
            for suffix, tensor in (("q", query), ("k", key), ("v", value), ("out", kept)):
                store[f"{name}.{suffix}"] = tensor[:1].contiguous().clone()
            store[f"{name}.heads"] = torch.tensor(heads)
            store[f"{name}.n_text"] = torch.tensor(store_n_text[0])
            return output
        return function(*args, **kwargs)

    store_n_text = [0]

    def block(args, extra):
        store_n_text[0] = args["txt"].shape[1]
        options = dict(args["transformer_options"], optimized_attention_override=attention)
        return extra["original_block"](dict(args, transformer_options=options))

    patched = model.clone()
    patched.set_model_patch_replace(block, "dit", "double_block", 0)
    latent = torch.zeros(1, 16, 8, 8)
    comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 7), 1, cfg, "euler", "simple", positive,
                        negative, latent, seed=7, disable_pbar=True)


def attention(models: Path):
    store = {}
    with torch.inference_mode():
        sd3 = comfy.sd.load_diffusion_model(str(models / "diffusion_models/tiny-sd3-mmdit.safetensors"))
        clip = comfy.sd.load_clip([str(models / "text_encoders/tiny-clip-l.safetensors")],
                                  clip_type=comfy.sd.CLIPType.SD3)
        cond, pooled = clip.encode_from_tokens(clip.tokenize(PROMPTS[0]), return_pooled=True)
        uncond, upooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
        record_block0(sd3, [[cond, {"pooled_output": pooled}]], [[uncond, {"pooled_output": upooled}]], 4.0,
                      "sd3", store)
        del sd3
        flux = comfy.sd.load_diffusion_model(str(models / "diffusion_models/tiny-flux.safetensors"))
        generator = torch.Generator().manual_seed(3)
        context, vector = torch.randn(1, 12, 4096, generator=generator), torch.randn(1, 768, generator=generator)
        positive = [[context, {"pooled_output": vector, "guidance": 3.5}]]
        negative = [[torch.zeros_like(context), {"pooled_output": torch.zeros_like(vector)}]]
        record_block0(flux, positive, negative, 1.0, "flux", store)
    return {key: value.detach().clone() for key, value in store.items()}


def main():
    out = Path(sys.argv[1])
    (out / "comfy_mmdit_tokens.json").write_text(json.dumps(tokenizers(), sort_keys=True) + "\n")
    save_file(attention(Path(os.getcwd()) / "models"), str(out / "comfy_mmdit_attention.safetensors"))
    print("wrote", out / "comfy_mmdit_tokens.json", out / "comfy_mmdit_attention.safetensors")


if __name__ == "__main__":
    main()
