"""What a weight sync sends: the policy's weights under their Hugging Face names, in buckets.

    for unit in weight_units(model):          parameters gathered together (ZeRO-3: one collective)
        named = plain_weights(unit)           [(name, tensor)] as a plain checkpoint names them

A LoRA layer is one unit (its base weight, A and B) and leaves as one merged weight,
W + scaling * B @ A: the engine serves the model the policy is, with no adapter support asked of
it, and sees the same names whether the policy trains adapters or every weight.
"""

from __future__ import annotations

import torch


def weight_units(model) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """The parameters of `model` (a transformers model, peft's LoRA layers inside it or not) in
    the groups that must be read together: a LoRA layer's whole, any other module's own."""
    from peft.tuners.lora import LoraLayer

    units, inside = [], None
    for module_name, module in model.named_modules():
        if inside is not None and module_name.startswith(inside):
            continue  # a part of the LoRA layer already taken whole
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, LoraLayer):
            inside = prefix
            units.append([(prefix + n, p) for n, p in module.named_parameters()])
        else:
            own = [(prefix + n, p) for n, p in module.named_parameters(recurse=False)]
            units += [own] if own else []
    return units


def plain_weights(model, unit: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """A gathered unit as a plain checkpoint's (name, fp32-or-model-dtype CPU tensor): a LoRA
    layer's adapters merged into its base weight."""
    tensors = {name: p.detach() for name, p in unit}
    base = [n for n in tensors if n.endswith(".base_layer.weight")]
    if not base:
        return [(n, t.cpu().clone()) for n, t in tensors.items()]
    layer = base[0].removesuffix(".base_layer.weight")
    module = model.get_submodule(layer)
    (adapter,) = module.active_adapters
    weight = tensors[f"{layer}.base_layer.weight"].float()
    a, b = tensors[f"{layer}.lora_A.{adapter}.weight"].float(), tensors[f"{layer}.lora_B.{adapter}.weight"].float()
    merged = weight + module.scaling[adapter] * (b @ a)
    out = [(f"{layer}.weight", merged.to(tensors[base[0]].dtype).cpu())]
    if f"{layer}.base_layer.bias" in tensors:
        out.append((f"{layer}.bias", tensors[f"{layer}.base_layer.bias"].cpu().clone()))
    return out
