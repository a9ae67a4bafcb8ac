"""`prefopt demo`: the main job on the embedded default, from nothing to a result."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from prefopt.config import RunConfig


def run_demo(cfg: RunConfig, console: Console) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt.models import ensure_model

    with console.status("building the tiny model and its tokenizer (first run only)"):
        model_dir = ensure_model(cfg.model, cfg.output_dir)
    console.print(f"model: [bold]{model_dir}[/]")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    table = Table(title="samples from the untrained tiny model")
    table.add_column("prompt")
    table.add_column("completion")
    for prompt in ("This movie was", "I watched it twice and", "The acting"):
        inputs = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=16, do_sample=True, top_k=50)
        table.add_row(prompt, tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))
    console.print(table)
