"""Preference data: rows -> validated examples -> tokens -> batches (padded or packed).

Controller (once per run):

    td = prepare(cfg, tokenizer, out_dir)   # -> TokenizedData; raises DataError on bad data
    td.fingerprint, td.format, td.num_rows, td.report, td.path, td.pad_token_id

Workers (from the path alone; TokenizedData also pickles as its path):

    td = TokenizedData.open(path)
    rows = td.rows(indices)                 # list of dicts, each with "index" = position
    batch = collate(rows, pad_token_id=td.pad_token_id, packing=packing, max_length=td.max_length)
    logps, lengths = prefopt.models.logprobs.sequence_logps(model, batch)

Batch layout: prefopt.data.collate (pairs: chosen of every row first, then rejected);
SEQUENCE_ROLES[td.kind] names the sequences of one example in that order.
Modules, in pipeline order: sources (read), formats (which format), validate (row checks),
tokenize (ids, EOS, truncation), fingerprint, store (write once / open), parts (a source cut
into parts, prepared in parallel and resumably), prepare (all of it),
collate (batches), cli (`prefopt data validate CONFIG`); errors (DataError, Problem) is what
they all report with. User guide: docs/data.md.
"""

from prefopt.data.collate import collate, collate_prompts
from prefopt.data.errors import DataError
from prefopt.data.formats import SEQUENCE_ROLES
from prefopt.data.prepare import check, prepare
from prefopt.data.report import DataReport
from prefopt.data.store import TokenizedData

__all__ = [
    "SEQUENCE_ROLES", "DataError", "DataReport", "TokenizedData", "check", "collate", "collate_prompts",
    "prepare",
]
