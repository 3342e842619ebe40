"""SDXL's path through the node pack with ComfyUI's own classes, in ComfyUI's Python (no server).

SDXL's text encoders are too large to build here, so the conditioning is random; everything
else is ComfyUI's: its SDXL tokenizer gives the two encoders' columns, ``supported_models.SDXL``
and ``model_base.SDXL`` build a small random UNet in SDXL's layout (linear transformer in/out,
context 2048, the pooled ``y`` of 2816, cross-attention only in the two lower levels), and
``comfy.sample.sample`` samples under ``inference_mode`` as the server does. Run by
``test_comfyui.py::test_sdxl_layout_and_pooled_conditioning_anchor`` as

    cd $ELA_COMFY/ComfyUI && PYTHONPATH=. $ELA_COMFY/venv/bin/python <checkout>/tests/comfyui_host/sdxl_in_comfy.py <checkout>

and prints one JSON line: the layers chosen, the anchored run's report, whether the image changed,
and whether the model's weights and a plain run afterwards are as before.
"""

import json
import sys

import comfy.cli_args

comfy.cli_args.args.cpu = True  # before model_management is imported

import torch  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sdxl_clip  # noqa: E402
import comfy.supported_models  # noqa: E402

sys.path.append(sys.argv[1])

from ela_comfy.columns import EncoderTokens, describe, resolve_prompt  # noqa: E402
from ela_comfy.patch import AnchoringPatch  # noqa: E402
from ela_comfy.report import RunReport  # noqa: E402
from ela_ext.capture import find_cross_attention_layers  # noqa: E402
from ela_ext.config import ElaConfig  # noqa: E402
from ela_ext.entities import parse_spec  # noqa: E402

PROMPT = "a black cat and a green frog"
UNET = {"model_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [0, 0, 1, 1, 1, 1],
        "transformer_depth_middle": 1, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
        "context_dim": 2048, "adm_in_channels": 2816, "use_temporal_attention": False, "use_temporal_resblock": False,
        "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "num_head_channels": 64, "in_channels": 4,
        "out_channels": 4, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "use_checkpoint": False}


def main():
    tokenizer = comfy.sdxl_clip.SDXLTokenizer()
    encoders = [EncoderTokens(key, int(getattr(tokenizer, f"clip_{key}").end_token),
                              int(getattr(tokenizer, f"clip_{key}").pad_token)) for key in ("g", "l")]
    columns = resolve_prompt(parse_spec("black cat | green frog"), PROMPT, tokenizer.tokenize_with_weights, encoders)

    torch.manual_seed(0)
    config = comfy.supported_models.SDXL(UNET)
    model = config.get_model({})
    with torch.no_grad():
        for parameter in model.parameters():  # ComfyUI's ops leave weights uninitialised
            parameter.normal_(0, 0.05)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    layers = [name for name, _ in find_cross_attention_layers(model.diffusion_model)]

    cross_attn, pooled = torch.randn(1, 77, 2048), torch.randn(1, 1280)
    positive = [[cross_attn, {"pooled_output": pooled}]]
    negative = [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280)}]]
    latent = torch.zeros(1, 4, 16, 16)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    weights_before = {name: parameter.clone() for name, parameter in model.diffusion_model.named_parameters()}

    def sample(model_patcher, sampler):
        with torch.inference_mode():
            return comfy.sample.sample(model_patcher, noise, 8, 5.0, sampler, "normal", positive, negative, latent,
                                       disable_pbar=True, seed=1)

    report = RunReport(enabled=True)
    anchored_model = AnchoringPatch(ElaConfig(enabled=True), columns, cross_attn, report).apply(patcher)
    results = {"layers": layers, "columns": describe(columns), "samplers": {}}
    for sampler in ("euler", "dpmpp_2m"):
        plain = sample(patcher, sampler)
        anchored = sample(anchored_model, sampler)
        plain_again = sample(patcher, sampler)
        results["samplers"][sampler] = {
            "report": report.text(), "changed": float((anchored - plain).abs().mean()),
            "plain_again_identical": bool(torch.equal(plain, plain_again))}
    results["weights_restored"] = all(
        torch.equal(parameter, weights_before[name]) and parameter.is_inference() == weights_before[name].is_inference()
        for name, parameter in model.diffusion_model.named_parameters())
    print(json.dumps(results))


if __name__ == "__main__":
    main()
