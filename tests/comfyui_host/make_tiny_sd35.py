"""Build two tiny random SD3.5-shaped checkpoints for anchoring SD3.5 in the server.

ComfyUI 0.3.64 has no SD3.5 class: ``comfy/model_detection.py`` reads an MMDiT's shape from its
weights and ``supported_models.SD3`` takes every MMDiT. What makes an SD3.5 is in the weights:
``joint_blocks.0.context_block.attn.ln_q.weight`` turns on the q/k RMS norms (``qk_norm`` "rms",
SD3.5 Large and Medium) and each ``joint_blocks.N.x_block.attn2.qkv.weight`` adds block N to
``x_block_self_attn_layers`` (SD3.5 Medium's dual attention: an image-only self-attention
beside the joint one, in its first 13 of 24 blocks). Depth 2 (hidden 128, 2 heads of 64), patch 2
and ``pos_embed`` 32 x 32 as ``comfy-host/mmdit/make_tiny_sd3.py``'s SD3; the VAE is a random
16-channel TAESD with SD3's scale and shift. No text encoder in the files, as in the released
SD3.5 checkpoints: the workflows load CLIP-L with CLIPLoader(``type=sd3``).

Writes (nothing is downloaded):
  checkpoints/tiny-sd35-large.safetensors   q/k RMS norms
  checkpoints/tiny-sd35-medium.safetensors  q/k RMS norms and dual attention in block 0 (of the
                                            blocks the default ``middle`` choice reads, 0 and 1)
  text_encoders/tiny-clip-l.safetensors     full-size random CLIP-L, unless present

Usage: cd $ELA_COMFY/ComfyUI && OMP_NUM_THREADS=1 PYTHONPATH=. $ELA_COMFY/venv/bin/python \
    <checkout>/tests/comfyui_host/make_tiny_sd35.py
"""

import os

import torch
from make_tiny_sdxl import MODELS, clip, randomise, save

import comfy.ops  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.taesd.taesd  # noqa: E402
from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper, get_2d_sincos_pos_embed_torch  # noqa: E402

DEPTH, PATCH, POSITIONS = 2, 2, 32
VARIANTS = {"tiny-sd35-large": dict(qk_norm="rms", x_block_self_attn_layers=[]),
            "tiny-sd35-medium": dict(qk_norm="rms", x_block_self_attn_layers=[0])}


def mmdit(generator, **variant):
    hidden = 64 * DEPTH
    model = OpenAISignatureMMDITWrapper(
        input_size=None, patch_size=PATCH, in_channels=16, out_channels=16, depth=DEPTH, adm_in_channels=2048,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": hidden}},
        num_patches=POSITIONS * POSITIONS, pos_embed_max_size=POSITIONS, operations=comfy.ops.disable_weight_init,
        **variant)
    randomise(model, generator)
    with torch.no_grad():
        model.pos_embed.copy_(get_2d_sincos_pos_embed_torch(hidden, POSITIONS, POSITIONS)[None])
    return model.state_dict()


def taesd3(generator):
    autoencoder = comfy.taesd.taesd.TAESD(latent_channels=16)
    randomise(autoencoder, generator)
    state = {k: v for k, v in autoencoder.state_dict().items() if k.startswith("taesd_")}
    state["vae_scale"], state["vae_shift"] = torch.tensor(1.5305), torch.tensor(0.0609)  # VAELoader's "taesd3"
    return state


def main():
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(20251213)
    vae = {"first_stage_model." + k: v for k, v in taesd3(generator).items()}
    for name, variant in VARIANTS.items():
        state = {"model.diffusion_model." + k: v for k, v in mmdit(generator, **variant).items()}
        path = save({**state, **vae}, f"checkpoints/{name}.safetensors", torch.float32)
        with torch.inference_mode():
            model, _, loaded_vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_clip=False)
        config = model.model.model_config
        found = {key: config.unet_config.get(key) for key in ("depth", "qk_norm", "x_block_self_attn_layers")}
        print(f"{name} detected as {type(config).__name__} {found}, VAE latent channels {loaded_vae.latent_channels}")
        assert type(config).__name__ == "SD3" and found == {"depth": DEPTH, **variant}, found
    if not os.path.exists(os.path.join(MODELS, "text_encoders", "tiny-clip-l.safetensors")):
        save(clip("sd1_clip_config.json", generator), "text_encoders/tiny-clip-l.safetensors")


if __name__ == "__main__":
    main()
