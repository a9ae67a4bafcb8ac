"""Preference files for the data tests: random pairs, and JSON Lines with every line a parser can trip on
(imported by name, as tests/s3_server.py is: tests/ is on sys.path)."""

import json
import random

WORDS = "the a film movie plot was great dull long short acting score ending loved hated quiet".split()


def pair_rows(n, seed=0):
    rnd = random.Random(seed)
    say = lambda k: " ".join(rnd.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"prompt": f"Review {i}: {say(4)}", "chosen": " " + say(rnd.randint(1, 12)),
             "rejected": " " + say(rnd.randint(1, 12)) + " no"} for i in range(n)]


def messy_jsonl(path, n=120):
    """JSON Lines with every kind of line a parser can trip on, in several line-ending styles."""
    rows = pair_rows(n)
    lines = []
    for i, row in enumerate(rows):
        if i % 17 == 3:
            row = {**row, "rejected": row["chosen"]}  # identical
        if i % 23 == 5:
            row = {**row, "prompt": "  "}  # empty
        line = json.dumps(row).encode()
        if i % 29 == 7:
            line = b"{not json"
        if i % 31 == 11:
            line = json.dumps(row).encode().replace(b"Review", b"R\xe9view")  # not UTF-8
        lines.append(line)
        if i % 13 == 0:
            lines.append(b"")  # a blank line
    ends = [b"\n", b"\r\n", b"\r"]
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(line + ends[i % 3] for i, line in enumerate(lines)))
    return path
