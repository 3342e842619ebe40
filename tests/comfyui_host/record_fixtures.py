"""Record what ComfyUI computes, for the host-free tests of ``ela_comfy`` (tests/test_comfy_glue.py).

Run with the prepared ComfyUI's Python, from its checkout (the tokenizers' vocabularies ship with
it, so nothing is downloaded):

    cd $ELA_COMFY/ComfyUI && PYTHONPATH=. $ELA_COMFY/venv/bin/python <checkout>/tests/comfyui_host/record_fixtures.py \
        <checkout>/tests/fixtures/comfy_recorded.json

It writes (1) ``CLIP.tokenize`` output of ComfyUI's SD 1.x, SD 2.x and SDXL tokenizers for each
prompt and word the tests resolve, embedding vectors included (a random two-vector CLIP-L
embedding), and (2) each k-diffusion sampler's model evaluations on a real 8-step schedule: the
noise level of every call and whether its ``x`` is the sampler's own latent of that step (the
object the sampler hands to its step callback), the ground truth for ``ela_comfy.steps``.
"""

import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

import comfy.cli_args

comfy.cli_args.args.cpu = True  # before model_management is imported: this machine has no CUDA

import comfy.k_diffusion.sampling  # noqa: E402,F401 - the samplers
import comfy.model_sampling  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.sdxl_clip  # noqa: E402
import comfy.text_encoders.sd2_clip  # noqa: E402

PROMPTS = [
    "a black cat and a green frog",
    "a (black cat:1.2) and a ((green)) frog",
    "a photo of " + ", ".join(["highly detailed"] * 40) + ", a red cube and a blue ball",
    "a embedding:ElaTestEmbedding and a green frog",
    "",
]
WORDS = ["black", "cat", "green", "frog", "red", "cube", "blue", "ball", "dog", "embedding:ElaTestEmbedding"]
SAMPLERS = ["euler", "euler_ancestral", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
            "dpmpp_2m"]


def entry_json(entry):
    token = entry[0]
    token = token.tolist() if isinstance(token, torch.Tensor) else int(token)
    return [token, float(entry[1])]


def tokenizer_outputs(embedding_dir):
    tokenizers = {"sd1": comfy.sd1_clip.SD1Tokenizer(embedding_directory=embedding_dir),
                  "sd2": comfy.text_encoders.sd2_clip.SD2Tokenizer(embedding_directory=embedding_dir),
                  "sdxl": comfy.sdxl_clip.SDXLTokenizer(embedding_directory=embedding_dir)}
    out = {}
    for family, tokenizer in tokenizers.items():
        encoders = {key: getattr(tokenizer, f"clip_{key}") for key in tokenizer.tokenize_with_weights("")}
        texts = {}
        for text in PROMPTS + WORDS:
            texts[text] = {key: [[entry_json(entry) for entry in chunk] for chunk in chunks]
                           for key, chunks in tokenizer.tokenize_with_weights(text).items()}
        ids = {entry[0] for by_key in texts.values() for chunks in by_key.values() for chunk in chunks
               for entry in chunk if isinstance(entry[0], int)}
        vocabulary = next(iter(encoders.values())).inv_vocab  # the same CLIP BPE vocabulary for all
        out[family] = {"encoders": {key: {"end": int(t.end_token), "pad": int(t.pad_token), "max_length": t.max_length}
                                    for key, t in encoders.items()},
                       "texts": texts, "pieces": {str(i): vocabulary[i] for i in sorted(ids)}}
    return out


def sampler_evaluations():
    discrete = type("Discrete", (comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS), {})()
    sigmas = comfy.samplers.calculate_sigmas(discrete, "normal", 8)
    out = {"sigmas": sigmas.tolist(), "samplers": {}}
    for name in SAMPLERS:
        calls, latents = [], []

        class Model:
            """Denoises to half the input; ancestral samplers look up the model's sampling type."""
            inner_model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=discrete))

            def __call__(self, x, sigma, **_):
                calls.append(float(sigma[0]))
                latents.append(x)
                return x * 0.5

        def callback(info):
            latents.append(("callback", info["i"], info["x"]))

        torch.manual_seed(0)
        function = comfy.samplers.ksampler(name).sampler_function
        function(Model(), torch.randn(1, 4, 8, 8) * float(sigmas[0]), sigmas, extra_args={"seed": 0},
                 callback=callback, disable=True)
        # The evaluation whose x is the sampler's own latent of step i: the object callback i gets.
        evaluated = [item for item in latents if not isinstance(item, tuple)]
        firsts = {}
        for item in latents:
            if isinstance(item, tuple):
                _, step, x = item
                firsts[step] = next(index for index, candidate in enumerate(evaluated) if candidate is x)
        out["samplers"][name] = {"function": function.__name__, "calls": calls,
                                 "first_evaluation": {str(step): index for step, index in firsts.items()}}
    return out


def main(target):
    with tempfile.TemporaryDirectory() as embedding_dir:
        generator = torch.Generator().manual_seed(0)
        save_file({"emb_params": torch.randn(2, 768, generator=generator)},
                  str(Path(embedding_dir) / "ElaTestEmbedding.safetensors"))
        recorded = {"comfyui": "Comfy-Org/ComfyUI a125cd84 (v0.3.64)", "tokenizers": tokenizer_outputs(embedding_dir),
                    "evaluations": sampler_evaluations()}
    Path(target).write_text(json.dumps(recorded))


if __name__ == "__main__":
    main(sys.argv[1])
