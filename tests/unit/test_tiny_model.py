import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.config import ModelConfig, TinyModelConfig
from prefopt.models import ensure_model


def test_round_trip_through_save_and_from_pretrained(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        a, b = model(ids).logits, again(ids).logits
    assert a.shape == (1, 5, model.config.vocab_size)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == TinyModelConfig().num_hidden_layers


@pytest.mark.parametrize(
    "text",
    [
        "Ünïcödé, emoji 🙂🎬 and 日本語 were never in the training corpus",
        "tabs\tand\nnewlines   and    runs of spaces",
        "{\"json\": [1, 2, 3]} <html></html> $$\\LaTeX$$",
    ],
)
def test_tokenizer_round_trips_unseen_text(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert tiny_tokenizer.unk_token_id is None or tiny_tokenizer.unk_token_id not in ids
    assert tiny_tokenizer.decode(ids) == text


def test_tokenizer_special_tokens_and_chat_template(tiny_tokenizer):
    ids = tiny_tokenizer("a good film").input_ids
    assert ids[0] == tiny_tokenizer.bos_token_id and ids.count(tiny_tokenizer.bos_token_id) == 1
    chat = [{"role": "user", "content": "Review?"}, {"role": "assistant", "content": "Great."}]
    rendered = tiny_tokenizer.apply_chat_template(chat, tokenize=False)
    assert rendered.count(tiny_tokenizer.eos_token) == 1 and rendered.endswith(tiny_tokenizer.eos_token)
    assert rendered.count(tiny_tokenizer.bos_token) == 1 and rendered.startswith(tiny_tokenizer.bos_token)


def test_model_generates_after_reload(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inputs = tok("This movie was", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    n = inputs.input_ids.shape[1]
    assert out.shape[1] == n + 8
    assert torch.equal(out[0, :n], inputs.input_ids[0])  # the prompt comes back unchanged ...
    assert tok.decode(out[0, :n], skip_special_tokens=True) == "This movie was"
    with torch.no_grad():  # ... and greedy decoding continues it with the reloaded model's argmax
        first = model(**inputs).logits[0, -1].argmax()
    assert out[0, n] == first


def test_ensure_model_builds_once_and_rebuilds_on_change(tmp_path, monkeypatch):
    small = TinyModelConfig(vocab_size=400, hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    cfg = ModelConfig(tiny=small)
    corpus = ["a small corpus of words, repeated for the merges"] * 20
    from prefopt.models import save_tiny

    monkeypatch.setattr("prefopt.models.tiny._default_corpus", lambda: corpus)  # a rebuild trains on it

    built = save_tiny(tmp_path / "tiny-model", small, corpus=corpus)
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert ensure_model(cfg, tmp_path) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    marker = json.loads((built / "prefopt_tiny.json").read_text())
    assert marker["hidden_size"] == 16
    # A changed model.tiny is a different model: rebuilt in place, and the marker says so.
    wider = ModelConfig(tiny=small.model_copy(update={"hidden_size": 24}))
    assert ensure_model(wider, tmp_path) == built
    assert json.loads((built / "prefopt_tiny.json").read_text())["hidden_size"] == 24
    assert (built / "model.safetensors").stat().st_mtime_ns != stamp
    assert AutoModelForCausalLM.from_pretrained(built).config.hidden_size == 24


def test_ensure_model_rejects_a_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path"):
        ensure_model(ModelConfig(path=str(tmp_path)), tmp_path)
