"""Tiny Llama models and byte-level BPE tokenizers, built without any hub.

Everything downstream loads models with `from_pretrained(path)` exactly as it would load a
real checkpoint, so the tiny model is saved in Hugging Face format first. Building is
deterministic (fixed seeds, fixed corpus), so the same TinyModelConfig gives the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prefopt.config import ModelConfig, TinyModelConfig

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# One assistant turn ends with exactly one EOS, emitted by the template itself, so the data
# pipeline must not append another (docs/data.md, "Tokens, EOS and truncation").
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + m['role']) }}"
    "{% endif %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus`. Any text encodes: all 256 bytes are in the alphabet."""
    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # Like Llama's tokenizer: BOS in front of every encoded text unless add_special_tokens=False.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=None,
    )


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _default_corpus(limit: int = 4000) -> list[str]:
    from prefopt.tasks.imdb import load_reviews

    return load_reviews(limit=limit, source=None)


def save_tiny(out_dir: str | Path, cfg: TinyModelConfig, corpus: Iterable[str] | None = None) -> Path:
    """Build tokenizer + model and save both in Hugging Face format to `out_dir`."""
    from prefopt.models import quiet_transformers

    quiet_transformers()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus if corpus is not None else _default_corpus(), cfg.vocab_size)
    model = build_tiny_model(cfg, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Written last: its presence says the directory is complete and built from this config.
    (out / "prefopt_tiny.json").write_text(json.dumps(cfg.model_dump(), indent=2, sort_keys=True))
    return out


def ensure_model(model_cfg: ModelConfig, output_dir: str | Path) -> Path:
    """The directory to `from_pretrained` from: `model.path`, or the tiny model (built once)."""
    if model_cfg.path is not None:
        from prefopt.models.model_dir import model_config
        from prefopt.storage import localize

        path = localize(model_cfg.path)  # a store's URI: downloaded once per machine
        model_config(str(path), "model.path", FileNotFoundError)
        return path
    tiny_dir = Path(output_dir) / "tiny-model"
    marker = tiny_dir / "prefopt_tiny.json"
    if marker.is_file() and json.loads(marker.read_text()) == model_cfg.tiny.model_dump():
        return tiny_dir
    return save_tiny(tiny_dir, model_cfg.tiny)


def model_and_tokenizer(model_cfg: ModelConfig, output_dir: str | Path):
    """The opening of every command that reads a run's data: (model directory, its tokenizer)."""
    from transformers import AutoTokenizer

    model_dir = ensure_model(model_cfg, output_dir)
    return model_dir, AutoTokenizer.from_pretrained(model_dir)
