"""Every format and source, with real-looking data: masks cover exactly the completion tokens."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefopt.config import RunConfig
from prefopt.data import DataError, check, collate, prepare

EOS, BOS = "<|eos|>", "<|bos|>"

PREFERENCE = [
    {"prompt": "What is the capital of Australia?",
     "chosen": " The capital of Australia is Canberra, not Sydney.",
     "rejected": " Sydney is the capital of Australia."},
    {"prompt": "Write a haiku about autumn.",
     "chosen": " Crimson leaves drifting\nwhispers of a cooling wind\nthe year exhales slow",
     "rejected": " Autumn is a season that comes after summer, and before winter."},
    {"prompt": "Explain, in one sentence, why the sky is blue.",
     "chosen": ' Air scatters short "blue" wavelengths of sunlight far more than red ones.',
     "rejected": " Because it reflects the ocean."},
]

SYSTEM = {"role": "system", "content": "You are a concise assistant."}
CONVERSATIONAL = [
    {"prompt": [SYSTEM, {"role": "user", "content": "How many legs does a spider have?"}],
     "chosen": [{"role": "assistant", "content": "Eight."}],
     "rejected": [{"role": "assistant", "content": "Six, like all insects."}]},
    {"prompt": [{"role": "user", "content": "Recommend a science-fiction novel."},
                {"role": "assistant", "content": "What have you enjoyed before?"},
                {"role": "user", "content": "I liked Dune."}],
     "chosen": [{"role": "assistant", "content": "Try Hyperion by Dan Simmons: it is just as vast."}],
     "rejected": [{"role": "assistant", "content": "Read Dune again."}]},
]

HH = [
    {"chosen": "\n\nHuman: What's a good way to keep basil fresh?\n\nAssistant: Trim the stems "
               "and stand it in a glass of water on the counter, loosely covered.",
     "rejected": "\n\nHuman: What's a good way to keep basil fresh?\n\nAssistant: Put it in the freezer."},
    {"chosen": "\n\nHuman: Can you recommend a sci-fi novel?\n\nAssistant: Sure, what have you "
               "enjoyed before?\n\nHuman: I liked Dune.\n\nAssistant: You might enjoy Hyperion.",
     "rejected": "\n\nHuman: Can you recommend a sci-fi novel?\n\nAssistant: Sure, what have you "
                 "enjoyed before?\n\nHuman: I liked Dune.\n\nAssistant: You might enjoy Foundation."},
]

UNPAIRED = [
    {"prompt": "Summarise: The meeting moved to Thursday at 3pm in room B.",
     "completion": " Meeting: Thursday, 3pm, room B.", "label": True},
    {"prompt": "Summarise: The meeting moved to Thursday at 3pm in room B.",
     "completion": " The meeting is on Monday.", "label": False},
    {"prompt": "Translate to French: good morning", "completion": " bonjour", "label": True},
]

PROMPTS = [{"prompt": "The film opens with"}, {"prompt": "I have never laughed so"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(path, **data):
    return RunConfig.model_validate({"data": {"path": str(path), **data}})


def assert_masks_exact(td, tokenizer):
    """For every sequence: the loss positions predict exactly its completion tokens, in order."""
    rows = td.rows(range(td.num_rows))
    b = len(rows)
    if "chosen_ids" in rows[0]:  # chosen of every pair, then rejected
        completions = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    else:  # KTO: the rows, then prompt i with completion i + 1 (mod N) for the KL term
        completions = [r["completion_ids"] for r in rows]
        completions += [rows[(i + 1) % b]["completion_ids"] for i in range(b)]
    prompts = [r["prompt_ids"] for r in rows] * 2
    for packing in (False, True):
        batch = collate(rows, pad_token_id=td.pad_token_id, packing=packing)
        ids, mask, seq = batch["input_ids"], batch["loss_mask"], batch["seq_index"]
        for i, (p, c) in enumerate(zip(prompts, completions, strict=False)):
            r_idx, t_idx = ((seq == i) & mask).nonzero(as_tuple=True)
            targets = ids[r_idx, t_idx + 1].tolist()
            assert targets == c, (packing, i)
            assert batch["labels"][r_idx, t_idx].tolist() == c
            # The masked positions are exactly the last prompt token .. second-to-last token.
            r_seq, t_seq = (seq == i).nonzero(as_tuple=True)
            start = t_seq.min().item()
            assert t_idx.tolist() == list(range(start + len(p) - 1, start + len(p) + len(c) - 1))
            assert ids[r_seq, t_seq].tolist() == p + c
        assert batch["lengths"].tolist() == [len(c) for c in completions]
    for r in rows:
        assert r["prompt_ids"].count(tokenizer.bos_token_id) == 1 and r["prompt_ids"][0] == tokenizer.bos_token_id
        for name in ("chosen_ids", "rejected_ids", "completion_ids"):
            if name in r:
                assert r[name].count(tokenizer.eos_token_id) == 1 and r[name][-1] == tokenizer.eos_token_id


def test_kind_and_completion_columns_of_every_format():
    from prefopt.data import SEQUENCE_ROLES
    from prefopt.data.formats import COLUMNS, FormatSpec

    assert SEQUENCE_ROLES == {"pair": ("chosen", "rejected"), "unpaired": ("completion", "kl")}
    specs = {name: FormatSpec(name, messages=False) for name in COLUMNS}
    assert {name: (spec.kind, spec.completions) for name, spec in specs.items()} == {
        "preference": ("pair", ("chosen", "rejected")),
        "conversational": ("pair", ("chosen", "rejected")),
        "implicit_prompt": ("pair", ("chosen", "rejected")),
        "unpaired": ("unpaired", ("completion",)),  # the kl sequence comes from another row
        "prompt_only": ("prompt", ()),
    }


def test_standard_preference_jsonl(tmp_path, tiny_tokenizer):
    td = prepare(cfg_for(write_jsonl(tmp_path / "pairs.jsonl", PREFERENCE)), tiny_tokenizer, tmp_path / "out")
    assert td.format == "preference" and td.num_rows == 3
    row = td.rows([1])[0]
    assert tiny_tokenizer.decode(row["prompt_ids"]) == BOS + PREFERENCE[1]["prompt"]
    assert tiny_tokenizer.decode(row["chosen_ids"]) == PREFERENCE[1]["chosen"] + EOS
    assert tiny_tokenizer.decode(row["rejected_ids"]) == PREFERENCE[1]["rejected"] + EOS
    assert row["row"] == 2 and row["index"] == 1
    assert_masks_exact(td, tiny_tokenizer)


def test_user_written_eos_and_bos_are_not_doubled(tmp_path, tiny_tokenizer):
    rows = [{"prompt": BOS + "Say hi.", "chosen": " Hi!" + EOS, "rejected": " No." + EOS + EOS}]
    td = prepare(cfg_for(write_jsonl(tmp_path / "p.jsonl", rows)), tiny_tokenizer, tmp_path / "out")
    row = td.rows([0])[0]
    assert tiny_tokenizer.decode(row["prompt_ids"]) == BOS + "Say hi."
    assert tiny_tokenizer.decode(row["chosen_ids"]) == " Hi!" + EOS
    assert tiny_tokenizer.decode(row["rejected_ids"]) == " No." + EOS


def test_conversational_uses_the_chat_template_with_one_eos(tmp_path, tiny_tokenizer):
    td = prepare(cfg_for(write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONAL)), tiny_tokenizer, tmp_path / "o")
    assert td.format == "conversational"
    row = td.rows([0])[0]
    # The template writes BOS and the role tokens itself, and one EOS after the assistant turn.
    assert tiny_tokenizer.decode(row["prompt_ids"]) == (
        BOS + "<|system|>You are a concise assistant.\n<|user|>How many legs does a spider have?\n<|assistant|>"
    )
    assert tiny_tokenizer.decode(row["chosen_ids"]) == "Eight." + EOS
    assert tiny_tokenizer.decode(row["rejected_ids"]) == "Six, like all insects." + EOS
    # prompt + completion is exactly what the template renders for the whole conversation.
    full = tiny_tokenizer.apply_chat_template(CONVERSATIONAL[0]["prompt"] + CONVERSATIONAL[0]["chosen"], tokenize=False)
    assert tiny_tokenizer.decode(row["prompt_ids"] + row["chosen_ids"]) == full
    assert_masks_exact(td, tiny_tokenizer)


def test_implicit_prompt_anthropic_hh(tmp_path, tiny_tokenizer):
    # Multi-turn transcripts make long prompts: 64 tokens (the default) would refuse row 2.
    td = prepare(cfg_for(write_jsonl(tmp_path / "hh.jsonl", HH), max_prompt_length=128),
                 tiny_tokenizer, tmp_path / "o")
    assert td.format == "implicit_prompt"
    one, two = td.rows([0, 1])
    assert tiny_tokenizer.decode(one["prompt_ids"]) == BOS + "\n\nHuman: What's a good way to keep basil fresh?\n\nAssistant:"
    assert tiny_tokenizer.decode(one["rejected_ids"]) == " Put it in the freezer." + EOS
    # Multi-turn: the prompt runs to the *last* assistant marker, past the shared earlier turns.
    assert tiny_tokenizer.decode(two["prompt_ids"]).endswith("I liked Dune.\n\nAssistant:")
    assert tiny_tokenizer.decode(two["chosen_ids"]) == " You might enjoy Hyperion." + EOS
    assert_masks_exact(td, tiny_tokenizer)


def test_implicit_prompt_with_messages(tmp_path, tiny_tokenizer):
    user = {"role": "user", "content": "Is a tomato a fruit?"}
    rows = [{"chosen": [user, {"role": "assistant", "content": "Botanically, yes: it is a berry."}],
             "rejected": [user, {"role": "assistant", "content": "No, it is a vegetable."}]}]
    td = prepare(cfg_for(write_jsonl(tmp_path / "m.jsonl", rows)), tiny_tokenizer, tmp_path / "o")
    row = td.rows([0])[0]
    assert tiny_tokenizer.decode(row["prompt_ids"]) == BOS + "<|user|>Is a tomato a fruit?\n<|assistant|>"
    assert tiny_tokenizer.decode(row["chosen_ids"]) == "Botanically, yes: it is a berry." + EOS
    assert_masks_exact(td, tiny_tokenizer)


def test_unpaired_parquet_and_kto_batch(tmp_path, tiny_tokenizer):
    pq.write_table(pa.Table.from_pylist(UNPAIRED), tmp_path / "kto.parquet")
    td = prepare(cfg_for(tmp_path / "kto.parquet"), tiny_tokenizer, tmp_path / "o")
    assert td.format == "unpaired"
    assert [r["label"] for r in td.rows([0, 1, 2])] == [True, False, True]
    assert_masks_exact(td, tiny_tokenizer)


def test_conversational_parquet_with_struct_messages(tmp_path, tiny_tokenizer):
    pq.write_table(pa.Table.from_pylist(CONVERSATIONAL), tmp_path / "chat.parquet")
    from_parquet = prepare(cfg_for(tmp_path / "chat.parquet"), tiny_tokenizer, tmp_path / "o")
    from_jsonl = prepare(cfg_for(write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONAL)), tiny_tokenizer, tmp_path / "o")
    assert from_parquet.format == "conversational"
    assert from_parquet.rows([0, 1]) == from_jsonl.rows([0, 1])


def test_csv_with_quotes_commas_and_newlines(tmp_path, tiny_tokenizer):
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(PREFERENCE)
    td = prepare(cfg_for(path), tiny_tokenizer, tmp_path / "o")
    jsonl = prepare(cfg_for(write_jsonl(tmp_path / "pairs.jsonl", PREFERENCE)), tiny_tokenizer, tmp_path / "o")
    assert td.fingerprint == jsonl.fingerprint
    assert tiny_tokenizer.decode(td.rows([1])[0]["chosen_ids"]) == PREFERENCE[1]["chosen"] + EOS


def test_saved_dataset_and_load_dataset_directory(tmp_path, tiny_tokenizer):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(PREFERENCE),
                          "test": datasets.Dataset.from_list(PREFERENCE[:1])}).save_to_disk(tmp_path / "saved")
    saved = prepare(cfg_for(tmp_path / "saved"), tiny_tokenizer, tmp_path / "o")
    test_split = prepare(cfg_for(tmp_path / "saved", split="test"), tiny_tokenizer, tmp_path / "o")
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "train.jsonl", PREFERENCE)
    loaded = prepare(cfg_for(tmp_path / "files"), tiny_tokenizer, tmp_path / "o")
    assert saved.num_rows == loaded.num_rows == 3 and test_split.num_rows == 1
    assert saved.fingerprint == loaded.fingerprint
    with pytest.raises(DataError, match=r"no split 'validation' \(data.split\); splits: train, test"):
        check(cfg_for(tmp_path / "saved", split="validation"), tiny_tokenizer)


def test_prompt_only_rows_and_left_padded_generation_batch(tmp_path, tiny_tokenizer):
    td = prepare(cfg_for(write_jsonl(tmp_path / "p.jsonl", PROMPTS)), tiny_tokenizer, tmp_path / "o")
    assert td.format == "prompt_only"
    rows = td.rows([0, 1])
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in PROMPTS]
    batch = collate(rows, pad_token_id=td.pad_token_id, packing=True)
    assert set(batch) == {"input_ids", "attention_mask", "example_index"}
    short, long = sorted(rows, key=lambda r: len(r["prompt_ids"]))
    i = rows.index(short)
    width = batch["input_ids"].shape[1]
    assert batch["input_ids"][i, width - len(short["prompt_ids"]):].tolist() == short["prompt_ids"]
    assert batch["attention_mask"][i].tolist() == [0] * (width - len(short["prompt_ids"])) + [1] * len(short["prompt_ids"])


def test_explicit_format_overrides_detection(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", PREFERENCE)
    # chosen/rejected alone, as implicit prompts, with prompt ignored: a different format.
    td = check(cfg_for(path, format="prompt_only", ignore_columns=["chosen", "rejected"]), tiny_tokenizer)
    assert td.spec.name == "prompt_only" and td.table.num_rows == 3
