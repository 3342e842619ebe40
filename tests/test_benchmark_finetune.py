"""``benchmark.commands.finetune`` end to end for a few steps: it writes a LoRA file (and its JSON) that the
hosts' naming maps onto the bundled model, and the file changes the model's prediction."""

import json

import torch

from benchmark.commands.finetune import main
from benchmark.models.model import load_model
from benchmark.paths import BUNDLED_WEIGHTS
from ela_ext.lora_file import merged_lora, read_lora, read_metadata


def _prediction(model, context):
    with torch.no_grad():
        return model.unet(model.initial_noise([0]), 500, encoder_hidden_states=context).sample


def test_finetune_writes_a_lora_the_bundled_model_takes(tmp_path):
    out = tmp_path / "lora.safetensors"
    main(["--inputs", "anchored", "--projections", "to_k,to_v", "--prompts", "3", "--sample-seeds", "8",
          "--steps", "3", "--batch-size", "2", "--out", str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["steps"] == 3 and record["training_examples"] >= 1
    assert record["command"].startswith("python -m benchmark.commands.finetune --inputs anchored")
    assert json.loads(read_metadata(out)["ela_training"])["settings"]["projections"] == ["to_k", "to_v"]
    keys = read_lora(out)
    assert keys and all(key.startswith("lora_unet_") and key.endswith(("_to_k", "_to_v")) for key in keys)

    model = load_model(BUNDLED_WEIGHTS)
    context = model.text_encoder(model.tokenizer(["a red square and a blue star"], padding="max_length", max_length=77,
                                                 return_tensors="pt").input_ids)[0]
    plain = _prediction(model, context)
    with merged_lora(model.unet, out, 1.0) as merged:
        assert len(merged) == len(keys)
        tuned = _prediction(model, context)
    assert not torch.equal(plain, tuned)
    assert torch.equal(plain, _prediction(model, context))


def test_finetune_paper_recipe_trains_keys_on_noise(tmp_path):
    out = tmp_path / "paper.safetensors"
    main(["--inputs", "noise", "--objective", "separate_enhance", "--projections", "to_k", "--prompts", "3",
          "--steps", "2", "--batch-size", "2", "--out", str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["inputs"] == "noise" and record["settings"]["denoising"] == 0.0
    assert all(key.endswith("_to_k") for key in read_lora(out))
