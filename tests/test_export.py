"""`selfalign export`: merged HF folder, chat template, model card, and a GGUF that transformers' own
GGUF reader (independent of our writer) loads back to the same logits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from selfalign.core.chat import PLAIN_STOPS, render_plain
from selfalign.core.errors import SelfAlignError
from selfalign.core.training import TrainSettings, sft_train

PROMPTS = ["Human: What is the capital of France?\n\nAssistant:", "Hello, world", "Human: hi\n\nAssistant: hey"]
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Help me?"},
     {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "Thanks!"}],
]


def make_run(root, arch: str):
    """A run folder as the pipeline leaves it: a finished LoRA training stage and an eval stage."""
    run = root / f"run-{arch}"
    examples = [{"prompt": render_plain([{"role": "user", "content": f"say {i}"}]), "completion": f" {i} ok"}
                for i in range(8)]
    stage = run / "02-engrave"
    result = sft_train(f"tiny:{arch}", examples, stage, TrainSettings(r=4, lr=5e-2, epochs=2, max_length=64))
    (stage / "_done.json").write_text(json.dumps({"model": result["model"]}))
    ev = run / "01-eval_base"
    ev.mkdir(parents=True)
    (ev / "results.json").write_text(json.dumps({"evals": {"hhh": {
        "metrics": {"likelihood": {"overall": 0.5}, "likelihood_margin": {"overall": -3.0}},
        "counts": {"overall": 32}}}}))
    (ev / "_done.json").write_text("{}")
    (run / "run.json").write_text(json.dumps({"name": "tiny-run", "model": f"tiny:{arch}",
                                              "inputs": [{"source": "builtin:quickstart", "lines": 16, "words": 182}]}))
    (run / "recipe.yaml").write_text("name: tiny-run\ndescription: a test\nstages:\n  - stage: eval\n"
                                     "  - stage: engrave\n")
    return run, result["model"]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def exported(request, tmp_path_factory, private_cache):
    from selfalign.export import export

    root = tmp_path_factory.mktemp(f"export-{request.param}")
    run, adapter = make_run(root, request.param)
    out = root / "out"
    written = export(str(run), out, gguf="f16")
    return {"arch": request.param, "run": run, "adapter": adapter, "out": out, "written": written}


def logits(model, tokenizer, text):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits[0]


def test_export_writes_a_merged_folder_equal_to_the_adapter_model(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfalign.core.models import load_model

    out = exported["out"]
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    peft_model, _ = load_model(exported["adapter"], device="cpu", dtype="float32")
    for text in PROMPTS:
        torch.testing.assert_close(logits(merged, tok, text), logits(peft_model, tok, text), atol=1e-4, rtol=1e-4)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["stop_strings"] == PLAIN_STOPS and gen["eos_token_id"] == tok.eos_token_id


def test_exported_chat_template_reproduces_the_training_format(exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported["out"])
    for chat in CHATS:
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert text == tok.bos_token + render_plain(chat)
        assert tok(text, add_special_tokens=False)["input_ids"] == tok(render_plain(chat))["input_ids"]


def test_training_saves_the_template_with_the_adapter(exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported["adapter"])
    assert (tok.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True)
            == tok.bos_token + render_plain(CHATS[1]))


def test_model_card_has_ledger_and_eval_interval(exported):
    card = (exported["out"] / "README.md").read_text()
    assert "tiny:" in card and "builtin:quickstart | 16 | 182" in card
    # Wilson 95% interval of 16/32
    assert "| eval_base | hhh | likelihood | 0.500 | 0.336–0.664 | 32 |" in card
    assert "likelihood_margin" not in card


def test_gguf_f16_loads_back_in_transformers_with_f16_rounded_logits(exported):
    """f16 export: transformers' GGUF reader gives exactly the merged model with its matrices rounded to f16."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = exported["out"]
    assert (out / "Modelfile").read_text().startswith("# Ollama")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    rounded = {k: (v.half().float() if v.dim() > 1 else v) for k, v in merged.state_dict().items()}
    merged.load_state_dict(rounded)
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf", dtype=torch.float32)
    back_tok = AutoTokenizer.from_pretrained(out, gguf_file="model-f16.gguf")
    # (transformers' reader prefers the folder's tokenizer files over the GGUF's chat template: read the field)
    field = gguf.GGUFReader(str(out / "model-f16.gguf")).fields["tokenizer.chat_template"]
    assert field.contents() == tok.chat_template
    for text in PROMPTS:
        assert back_tok(text)["input_ids"] == tok(text)["input_ids"]
        torch.testing.assert_close(logits(back, tok, text), logits(merged, tok, text), atol=1e-5, rtol=1e-5)


def test_gguf_q8_0_matches_the_q8_0_rounded_model(exported, tmp_path):
    """q8_0: the reference is the merged model with each matrix passed through gguf's own q8_0
    quantize/dequantize, so only our names, layout and metadata are under test."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfalign.core.models import load_model
    from selfalign.export.gguf_writer import write_gguf

    model, tok = load_model(str(exported["out"]), device="cpu", dtype="float32")
    write_gguf(model, tok, tmp_path / "m.gguf", "q8_0")
    q8 = gguf.GGMLQuantizationType.Q8_0

    def q8_round(v):
        if v.dim() < 2 or v.shape[-1] % 32:
            return v
        data = v.numpy().astype(np.float32)
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, q8), q8).reshape(data.shape).copy())

    model.load_state_dict({k: q8_round(v) for k, v in model.state_dict().items()})
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf") is not None
    for text in PROMPTS:
        torch.testing.assert_close(logits(back, tok, text), logits(model, tok, text), atol=1e-4, rtol=1e-4)


def test_adapter_only_keeps_the_peft_adapter(exported, tmp_path):
    from peft import AutoPeftModelForCausalLM

    from selfalign.export import export

    out = tmp_path / "adapter"
    export(str(exported["run"]), out, adapter_only=True)
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    assert not (out / "selfalign_base.json").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(out)  # the base is named by a plain path
    assert model is not None


def test_unsupported_architecture_and_missing_stage_are_one_line_errors(exported):
    from selfalign.export import run_model
    from selfalign.export.gguf_writer import gguf_arch

    with pytest.raises(SelfAlignError, match="'gpt2'"):
        gguf_arch("gpt2")
    with pytest.raises(SelfAlignError, match="no finished stage 'sft'"):
        run_model(exported["run"], "sft")
    assert run_model(exported["run"])[0] == "engrave"


def test_gemma3_layouts_llama_cpp_cannot_express_are_refused():
    from selfalign.core.tiny import build_tiny_model
    from selfalign.export.gguf_writer import _check_gemma3_fixed_hparams

    config = build_tiny_model("gemma3").config
    _check_gemma3_fixed_hparams(config)  # the default pattern passes
    config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(SelfAlignError, match="every 6th layer global"):
        _check_gemma3_fixed_hparams(config)


def test_cli_export_rejects_an_unknown_gguf_format(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "selfalign.cli", "export", str(tmp_path), "--to",
                           str(tmp_path / "o"), "--gguf", "q4"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown --gguf format 'q4'" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_wilson_interval():
    from selfalign.export.card import wilson_interval

    lo, hi = wilson_interval(0.5, 32)
    assert lo == pytest.approx(0.3363, abs=1e-3) and hi == pytest.approx(0.6637, abs=1e-3)
    assert wilson_interval(1.0, 10)[1] == 1.0 and wilson_interval(0.0, 10)[0] == 0.0


@pytest.mark.slow
def test_embedded_gemma_round_trips_through_gguf_f16(tmp_path):
    """GGUF in, GGUF out: the embedded gemma-3-270m exported at f16 reads back (transformers' reader,
    vocabulary copied from the GGUF it came from) to the f16-rounded model's logits and token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfalign.export import export

    out = tmp_path / "gemma"
    export("embedded:gemma-3-270m", out, gguf="f16")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    model.load_state_dict({k: (v.half().float() if v.dim() > 1 else v) for k, v in model.state_dict().items()})
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf", dtype=torch.float32)
    back_tok = AutoTokenizer.from_pretrained(out, gguf_file="model-f16.gguf")
    for text in PROMPTS:
        assert back_tok(text)["input_ids"] == tok(text)["input_ids"]
        torch.testing.assert_close(logits(back, tok, text), logits(model, tok, text), atol=1e-3, rtol=1e-4)
