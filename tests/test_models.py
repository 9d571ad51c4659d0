import json

import pytest

from selfalign.core.errors import SelfAlignError
from selfalign.core.models import load_model, resolve
from selfalign.core.tiny import save_tiny_model


def test_tiny_reference_builds_once_and_is_cached():
    a = resolve("tiny:llama")
    b = resolve("tiny:llama")
    assert a.kind == "tiny" and a.path == b.path
    model, tok = load_model(a)
    assert model.config.num_hidden_layers == 2 and tok.pad_token_id is not None


def test_folder_reference(tmp_path):
    folder = save_tiny_model("gemma3", tmp_path / "m")
    r = resolve(str(folder))
    assert r.kind == "folder"
    model, tok = load_model(r)
    assert model.config.model_type.startswith("gemma3")


def test_peft_adapter_loads_on_its_base(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base, _ = load_model("tiny:llama")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "tiny:llama"  # a selfalign reference works as the base
    cfg_path.write_text(json.dumps(cfg))
    r = resolve(str(tmp_path / "adapter"))
    assert r.kind == "peft" and r.base.kind == "tiny"
    model, tok = load_model(r)
    assert isinstance(model, PeftModel)


def test_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(SelfAlignError, match="is not a GGUF file"):
        resolve(str(fake))


@pytest.mark.parametrize(
    "ref, message",
    [
        ("missing/model.gguf", "does not exist"),
        ("./no/such/folder", "is not a folder, a .gguf file"),
        ("embedded:llama-9000", "unknown embedded model"),
        ("tiny:transformer", "unknown tiny model"),
        ("", "empty model reference"),
    ],
)
def test_references_that_do_not_resolve(ref, message):
    with pytest.raises(SelfAlignError, match=message):
        resolve(ref)


def test_folder_without_model(tmp_path):
    with pytest.raises(SelfAlignError, match="holds no model"):
        resolve(str(tmp_path))


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = resolve("someorg/some-model-that-is-not-cached")
    assert r.kind == "hub"
    with pytest.raises(SelfAlignError, match="HF_HUB_OFFLINE"):
        load_model(r)


def test_hf_engine_merges_an_adapter_and_scores_as_the_unmerged_model(tmp_path):
    """The engine folds a LoRA adapter into its base once (no adapter matmuls per forward); its
    log-probabilities and greedy text equal those of the unmerged PeftModel."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from selfalign.core.engines import Sampling
    from selfalign.core.engines.hf import HFEngine

    base, _ = load_model("tiny:llama")
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "tiny:llama"
    cfg_path.write_text(json.dumps(cfg))

    merged = HFEngine(str(tmp_path / "adapter"), batch_size=2)
    assert not isinstance(merged.model, PeftModel)
    unmerged_model, tok = load_model(str(tmp_path / "adapter"))
    assert isinstance(unmerged_model, PeftModel)
    unmerged = HFEngine(str(tmp_path / "adapter"), batch_size=2, model=unmerged_model, tokenizer=tok)
    items = [("Human: hi\n\nAssistant:", [" hello there", " go away"]), ("Human: 2+2?\n\nAssistant:", [" 4", " five"])]
    a, b = merged.score_many(items), unmerged.score_many(items)
    assert sum(a, []) == pytest.approx(sum(b, []), abs=1e-4)
    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    assert [c[0].text for c in merged.generate(["Human: hi\n\nAssistant:"], greedy)] == [
        c[0].text for c in unmerged.generate(["Human: hi\n\nAssistant:"], greedy)
    ]
