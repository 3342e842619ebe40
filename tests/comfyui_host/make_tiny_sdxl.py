"""Build the smallest SDXL-family model ComfyUI's detection accepts, for anchoring SDXL in the server.

ComfyUI matches a UNet to a family by a few keys only (``comfy/supported_models.py``): SDXL's own
entry needs ``transformer_depth`` [0, 0, 2, 2, 10, 10] (the full model), but its distillations
share SDXL's text encoders, conditioning and sampling, and KOALA-700M's entry asks only for
``model_channels`` 320, ``context_dim`` 2048, ``adm_in_channels`` 2816, linear ``proj_in`` and
``transformer_depth`` [0, 2, 5] (one res block per level, three levels). Every other shape comes
from the weights: here ``channel_mult`` [1, 1, 1] (320 channels at every level), a middle block
without a transformer and one transformer per output block of the two lower levels: 76 M
parameters, detected as ``KOALA_700M`` (class ``SDXL``'s subclass: SDXL's CLIP-L + CLIP-G,
pooled ``y``, eps). SDXL's text encoders have fixed configs, so CLIP-G is full size and random
(1.4 GB, about 5 GB of memory to build); CLIP-L is ``tiny-clip-l`` of ``comfy-host/mmdit``
(built here if missing); the VAE is SD's 4-channel KL VAE, random.

Writes ``diffusion_models/tiny-sdxl-koala.safetensors``, ``text_encoders/tiny-clip-g.safetensors``
(unless present), ``text_encoders/tiny-clip-l.safetensors`` (unless present) and
``vae/tiny-sd-vae.safetensors``; nothing is downloaded.

Usage: cd $ELA_COMFY/ComfyUI && OMP_NUM_THREADS=1 PYTHONPATH=. $ELA_COMFY/venv/bin/python \
    <checkout>/tests/comfyui_host/make_tiny_sdxl.py
"""

import json
import math
import os

import torch
from safetensors.torch import save_file

import comfy.cli_args

comfy.cli_args.args.cpu = True

import comfy.clip_model  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sd  # noqa: E402
from comfy.ldm.models.autoencoder import AutoencoderKL  # noqa: E402
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402

MODELS = os.path.join(os.getcwd(), "models")
OPS = comfy.ops.disable_weight_init
UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1, 1],
            channel_mult=[1, 1, 1], num_head_channels=64, use_spatial_transformer=True, transformer_depth=[0, 2, 5],
            transformer_depth_output=[0, 0, 1, 1, 1, 1], transformer_depth_middle=-1, context_dim=2048,
            use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential", legacy=False)
VAE = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
       'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}


def randomise(module, generator):
    """LeCun-normal matrices and convolutions, ~1 norm scales, small biases (as comfy-host's recipes)."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "embedding" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
            elif parameter.dim() >= 2:
                fan_in = math.prod(parameter.shape[1:])
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(fan_in))
            elif name.endswith(".weight"):
                parameter.copy_(1.0 + 0.05 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))


def save(state, relative, dtype=torch.float16):
    path = os.path.join(MODELS, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(state, path, metadata={"format": "pt", "note": "tiny random test model"})
    print(f"wrote {relative}: {sum(v.numel() for v in state.values()) / 1e6:.1f} M parameters")
    return path


def clip(config_name, generator):
    with open(os.path.join("comfy", config_name)) as file:
        model = comfy.clip_model.CLIPTextModel(json.load(file), torch.float32, "cpu", OPS)
    randomise(model, generator)
    with torch.no_grad():  # a real CLIP's final LayerNorm has a clearly non-zero bias
        bias = model.text_model.final_layer_norm.bias
        bias.copy_(0.2 + 0.3 * torch.randn(bias.shape, generator=generator))
    return model.state_dict()


def main():
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(20251206)
    unet = UNetModel(**UNET, operations=OPS)
    randomise(unet, generator)
    unet_path = save(unet.state_dict(), "diffusion_models/tiny-sdxl-koala.safetensors", torch.float32)
    del unet
    vae = AutoencoderKL(ddconfig=VAE, embed_dim=4)
    randomise(vae, generator)
    save(vae.state_dict(), "vae/tiny-sd-vae.safetensors")
    del vae
    for name, config in (("tiny-clip-l", "sd1_clip_config.json"), ("tiny-clip-g", "clip_config_bigg.json")):
        if not os.path.exists(os.path.join(MODELS, "text_encoders", f"{name}.safetensors")):
            save(clip(config, generator), f"text_encoders/{name}.safetensors")
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(unet_path)
    detected = type(model.model.model_config).__name__
    print("UNETLoader detects:", detected, "| latent format:", type(model.model.latent_format).__name__)
    assert detected == "KOALA_700M", detected


if __name__ == "__main__":
    main()
