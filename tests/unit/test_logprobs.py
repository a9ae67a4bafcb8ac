"""Per-sequence log-probs: hand-computed values, exact gradients, packed == padded on the tiny model."""

import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefopt.data import collate
from prefopt.data.collate import pack, pad
from prefopt.models import logprobs
from prefopt.models.logprobs import (
    forward_logits,
    logps_from_logits,
    packing_supported,
    resolve_packing,
    selected_logps,
    sequence_logps,
    token_logps,
)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    # from_pretrained returns the model in eval mode: the case where a KV cache would be made
    # by default and packed sequences would see each other (prefopt.models.logprobs).
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def reference_logps(logits, mask, labels):
    """The obvious (memory-hungry) way: a full log_softmax, then gather."""
    full = torch.log_softmax(logits.float(), dim=-1)
    return full.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)[mask]


def test_hand_computed_sequence_logps():
    # Vocabulary of 2; every position gives logits [0, ln 3]: p(1) = 3/4, p(0) = 1/4.
    batch = pack([[0], [1, 0]], [[1, 1, 0], [0]])  # sequence 0: 3 completion tokens, sequence 1: 1
    logits = torch.tensor([0.0, math.log(3.0)]).expand(1, batch["input_ids"].shape[1], 2)
    logps, lengths = logps_from_logits(logits, batch)
    # 2 ln(3/4) + ln(1/4) = -0.575364 - 1.386294 = -1.961659; ln(1/4) = -1.386294
    torch.testing.assert_close(logps, torch.tensor([-1.961659, -1.386294]), atol=1e-6, rtol=0)
    assert lengths.tolist() == [3, 1] and logps.dtype == torch.float32


def test_selected_logps_values_and_gradients_match_log_softmax(monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 2 * 11)  # 2 rows a chunk: chunk edges get used
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, requires_grad=True)
    mask = torch.rand(3, 7, generator=g) > 0.4
    labels = torch.randint(0, 11, (3, 7), generator=g).masked_fill(~mask, -100)
    weights = torch.randn(int(mask.sum()), generator=g)

    ours = selected_logps(logits, mask, labels)
    ref = reference_logps(logits, mask, labels)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-6, rtol=0)
    assert grad_ours[~mask].abs().max() == 0  # positions outside the completion get no gradient


def test_selected_logps_gradcheck_in_double(monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 5)
    logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    labels = torch.tensor([[1, -100, 4, 0], [-100, 2, 3, -100]])
    assert torch.autograd.gradcheck(lambda x: selected_logps(x, mask, labels), (logits,))


def test_bf16_logits_stay_bf16_and_are_read_in_fp32():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 50, generator=g).to(torch.bfloat16).requires_grad_()
    mask = torch.ones(2, 6, dtype=torch.bool)
    labels = torch.randint(0, 50, (2, 6), generator=g)
    ours = selected_logps(logits, mask, labels)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference_logps(logits.detach(), mask, labels), atol=1e-6, rtol=0)
    ours.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def _pairs(n, seed):
    """Rows of varied lengths, as TokenizedData gives them (prompt with BOS, completions with EOS)."""
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(10, 1000, (k,), generator=g).tolist()

    rows = []
    for i in range(n):
        rows.append({"index": i, "prompt_ids": [1, *ids(3 + 5 * i % 11)],
                     "chosen_ids": [*ids(2 + 7 * i % 13), 2], "rejected_ids": [*ids(4 + 3 * i % 9), 2]})
    return rows


def test_packed_and_padded_pairs_give_the_same_logps_and_gradients(tiny_model):
    rows = _pairs(5, seed=0)
    packed = collate(rows, pad_token_id=0, packing=True)
    padded = collate(rows, pad_token_id=0, packing=False)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert padded["input_ids"].shape[0] == 10

    results = []
    for batch in (packed, padded):
        tiny_model.zero_grad()
        logps, lengths = sequence_logps(tiny_model, batch)
        (logps[:5] - logps[5:]).sum().backward()  # a DPO-like use of chosen and rejected
        grad = tiny_model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        results.append((logps.detach(), lengths, grad))
    (lp_a, len_a, grad_a), (lp_b, len_b, grad_b) = results
    # Sums of ~30 tokens are ~ -200, where one fp32 ulp is 1.5e-5: compare them to 1e-5
    # relative, and every token's log-prob to 1e-5 absolute.
    torch.testing.assert_close(lp_a, lp_b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        tok_a = token_logps(tiny_model, packed)[packed["loss_mask"]]
        tok_b = token_logps(tiny_model, padded)[padded["loss_mask"]]
    # Same tokens in the same sequence order: row-major over padded rows = packed order.
    torch.testing.assert_close(tok_a, tok_b, atol=1e-5, rtol=0)
    assert torch.equal(len_a, len_b)
    assert len_a.tolist() == [len(r["chosen_ids"]) for r in rows] + [len(r["rejected_ids"]) for r in rows]
    torch.testing.assert_close(grad_a, grad_b, atol=1e-5, rtol=1e-4)
    # And both equal each sequence run on its own.
    for i, r in enumerate(rows):
        alone = collate([r], pad_token_id=0, packing=False)
        with torch.no_grad():
            single, _ = sequence_logps(tiny_model, alone)
        torch.testing.assert_close(single, lp_a[[i, 5 + i]], atol=1e-5, rtol=1e-5)


def test_packed_and_padded_unpaired_batches_agree_including_kl_pairs(tiny_model):
    pairs = _pairs(4, seed=1)
    rows = [{"index": i, "prompt_ids": r["prompt_ids"], "completion_ids": r["chosen_ids"], "label": i % 2 == 0,
             "kl_completion_ids": pairs[(i + 1) % 4]["chosen_ids"]} for i, r in enumerate(pairs)]
    with torch.no_grad():
        a, _ = sequence_logps(tiny_model, collate(rows, pad_token_id=0, packing=True))
        b, _ = sequence_logps(tiny_model, collate(rows, pad_token_id=0, packing=False))
    assert a.shape == (8,)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_token_logps_sum_to_sequence_logps(tiny_model):
    batch = collate(_pairs(3, seed=2), pad_token_id=0, packing=False)
    with torch.no_grad():
        per_token = token_logps(tiny_model, batch)
        summed, _ = sequence_logps(tiny_model, batch)
    assert per_token.shape == batch["input_ids"].shape
    assert per_token[~batch["loss_mask"]].abs().max() == 0
    torch.testing.assert_close(per_token.sum(1), summed, atol=1e-5, rtol=1e-6)  # summation order


class LeakyAttention(torch.nn.Module):
    """A model that always passes an all-ones mask, so packed sequences attend to each other."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, attention_mask=None, **kw):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)


def test_packing_is_detected_and_falls_back_with_one_warning(tiny_model, caplog, monkeypatch):
    assert packing_supported(tiny_model)
    assert resolve_packing(tiny_model, True) is True
    assert resolve_packing(tiny_model, False) is False
    leaky = LeakyAttention(tiny_model)
    assert not packing_supported(leaky)
    monkeypatch.setattr(logprobs, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="prefopt.models"):
        assert resolve_packing(leaky, True) is False
        assert resolve_packing(leaky, True) is False
    assert len(caplog.records) == 1
    assert "LeakyAttention" in caplog.messages[0] and "using padded batches instead" in caplog.messages[0]


def test_pad_and_pack_layouts_by_hand():
    prompts, completions = [[1, 5], [1]], [[7, 2], [8, 9, 2]]
    padded = pad(prompts, completions, pad_token_id=0)
    assert padded["input_ids"].tolist() == [[1, 5, 7, 2], [1, 8, 9, 2]]
    assert padded["labels"].tolist() == [[-100, 7, 2, -100], [8, 9, 2, -100]]
    packed = pack(prompts, completions)
    assert packed["input_ids"].tolist() == [[1, 5, 7, 2, 1, 8, 9, 2]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    # Position 3 (the EOS of sequence 0) must not predict sequence 1's first token.
    assert packed["labels"].tolist() == [[-100, 7, 2, -100, 8, 9, 2, -100]]
    assert packed["seq_index"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    short = pad([[1, 5]], [[7, 2]], pad_token_id=0)
    mixed = pad([[1, 5], [1, 4, 4, 4]], [[7, 2], [3, 2]], pad_token_id=0)
    assert mixed["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert mixed["seq_index"][0].tolist() == [0, 0, 0, 0, -1, -1]
    assert mixed["labels"][0].tolist() == short["labels"][0].tolist() + [-100, -100]


def test_unpaired_batch_pairs_each_prompt_with_its_kl_partner():
    rows = [{"index": i, "prompt_ids": [1, 10 + i], "completion_ids": [20 + i, 2], "label": i != 1,
             "kl_completion_ids": [30 + i, 2]} for i in range(3)]
    batch = collate(rows, pad_token_id=0, packing=False)
    assert batch["input_ids"].tolist() == [
        [1, 10, 20, 2], [1, 11, 21, 2], [1, 12, 22, 2],  # prompt i + completion i
        [1, 10, 30, 2], [1, 11, 31, 2], [1, 12, 32, 2],  # prompt i + its KL partner completion
    ]
    assert batch["desirable"].tolist() == [True, False, True]
    assert batch["example_index"].tolist() == [0, 1, 2]
    long = [{**r, "prompt_ids": [1, 3, 3, 3]} if i == 0 else r for i, r in enumerate(rows)]
    long[0]["kl_completion_ids"] = [5, 5, 5, 2]
    cut = collate(long, pad_token_id=0, packing=True, max_length=6)
    # Real: 2, 2, 2. KL pair 0 is 4 prompt tokens + the first 2 of its partner's 4 tokens.
    assert cut["lengths"].tolist() == [2, 2, 2, 2, 2, 2]
    assert cut["input_ids"][cut["seq_index"] == 3].tolist() == [1, 3, 3, 3, 5, 5]
    single = collate(rows[:1], pad_token_id=0, packing=True)  # one example is enough now
    assert single["lengths"].tolist() == [2, 2]


def test_kl_partner_is_fixed_by_the_data_set_not_the_batch(tiny_tokenizer, tmp_path):
    from prefopt.config import RunConfig
    from prefopt.data import prepare

    td = prepare(RunConfig.model_validate({"data": {"num_examples": 6, "format": "unpaired"}}), tiny_tokenizer,
                 tmp_path)
    everything = td.rows(range(td.num_rows))
    for index in (0, 3, td.num_rows - 1):
        (row,) = td.rows([index])
        assert row["kl_completion_ids"] == everything[(index + 1) % td.num_rows]["completion_ids"]
    # The same example gets the same partner in any batch.
    assert td.rows([4, 1])[1]["kl_completion_ids"] == td.rows([1])[0]["kl_completion_ids"]


@pytest.mark.parametrize("fmt", ["preference", "unpaired"])
def test_packed_equals_padded_on_the_built_in_task(tiny_model, tiny_tokenizer, tmp_path, fmt):
    from prefopt.config import RunConfig
    from prefopt.data import prepare

    td = prepare(RunConfig.model_validate({"data": {"num_examples": 8, "format": fmt}}), tiny_tokenizer, tmp_path)
    rows = td.rows(range(td.num_rows))
    with torch.no_grad():
        a, la = sequence_logps(tiny_model, collate(rows, pad_token_id=td.pad_token_id, packing=True))
        b, lb = sequence_logps(tiny_model, collate(rows, pad_token_id=td.pad_token_id, packing=False))
    assert a.shape == (16,) and torch.equal(la, lb)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_packing_into_bounded_rows_keeps_sequences_whole_and_logps_equal(tiny_model):
    pairs = _pairs(6, seed=3)
    prompts = [r["prompt_ids"] for r in pairs] * 2
    completions = [r["chosen_ids"] for r in pairs] + [r["rejected_ids"] for r in pairs]
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    binned = pack(prompts, completions, row_tokens=longest, pad_token_id=0)
    assert binned["input_ids"].shape[1] == longest and binned["input_ids"].shape[0] > 1
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        r, t = (binned["seq_index"] == i).nonzero(as_tuple=True)
        assert r.unique().numel() == 1  # never split across rows
        assert binned["input_ids"][r, t].tolist() == p + c
        assert binned["position_ids"][r, t].tolist() == list(range(len(p) + len(c)))
    # Row ends are padding with their own positions from 0 and no labels.
    pad_tokens = binned["seq_index"] == -1
    assert (binned["labels"][pad_tokens] == -100).all()
    with torch.no_grad():
        a, la = logps_from_logits(forward_logits(tiny_model, binned), binned)
        one_row = pack(prompts, completions)
        b, lb = logps_from_logits(forward_logits(tiny_model, one_row), one_row)
    assert torch.equal(la, lb)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_completion_only_logits_give_the_full_forward_logps_and_gradients(tiny_model):
    pairs = _pairs(5, seed=7)
    batch = collate([{**r, "index": i} for i, r in enumerate(pairs)], pad_token_id=0, packing=True, max_length=64)
    tiny_model.zero_grad(set_to_none=True)  # the fixture is shared: start from no gradients
    full, full_lengths = logps_from_logits(forward_logits(tiny_model, batch), batch)
    full.sum().backward()
    full_grads = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    lean, lean_lengths = sequence_logps(tiny_model, batch)  # output layer at completion positions only
    lean.sum().backward()
    assert torch.equal(full_lengths, lean_lengths)
    torch.testing.assert_close(lean, full, atol=1e-5, rtol=1e-5)
    for p, g in zip(tiny_model.parameters(), full_grads, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)
    tiny_model.zero_grad()


def test_packing_is_skipped_when_it_would_remove_little_padding():
    even = [{"index": i, "prompt_ids": [1, 5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 9, 2]} for i in range(3)]
    padded = collate(even, pad_token_id=0, packing=True, min_packing_gain=0.1)
    assert "attention_mask" in padded and padded["input_ids"].shape == (6, 6)  # no padding to remove
    ragged = [{**even[0], "chosen_ids": [7] * 20 + [2]}, *even[1:]]
    packed = collate(ragged, pad_token_id=0, packing=True, min_packing_gain=0.1)
    assert "attention_mask" not in packed  # padded would waste most of the batch
    assert collate(even, pad_token_id=0, packing=True)["input_ids"].shape[0] == 1  # default: always pack
