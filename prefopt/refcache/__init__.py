"""The reference log-prob cache: per-row reference log-probs, computed once per set of inputs.

A cache is a dataset, not a side effect: Parquet shards plus a manifest, on any filesystem pyarrow
understands (a local path, file://, s3://, gs://), keyed by a fingerprint of its inputs. A
changed input is a miss, never a silent reuse; a run killed midway keeps its finished shards.

    from prefopt.refcache import RefCache, RefCacheMismatch, fingerprint_parts, weights_fingerprint

    parts = fingerprint_parts(data.fingerprint, model_dir, tokenizer_fingerprint(tokenizer),
                              max_length, max_prompt_length, dtype)  # {part name: str}
    cache = RefCache.open(root, parts, num_rows=data.num_rows, roles=["chosen", "rejected"])
    for shard in cache.missing_shards():                  # Shard(index, start, stop): rows [start, stop)
        cache.write_shard(shard, {role: logps[role] for role in cache.roles})  # each [shard.num_rows]
    ref = cache.read()                                    # role -> float32 [num_rows], in row order

Parts: data, reference_weights, tokenizer, max_length, max_prompt_length, dtype (the dtype the
reference computes in; stored values are always float32 log-probs summed over completion tokens,
in nats). Each part changed alone gives another fingerprint, hence another cache directory.
Roles are column names chosen by the caller: chosen, rejected for pairs; completion, kl for
unpaired (KTO) data, whose mismatched KL pairs are just another column.

RefCache.open(root, parts, *, num_rows, roles, shard_rows=4096, filesystem=None): the cache
lives at <root>/<fingerprint[:16]>/, created if absent. If <root> itself holds a manifest.json
(a user pointed at one cache), it must have been computed for `parts`, else RefCacheMismatch
names each differing part with both values. A manifest at <root>/<fingerprint[:16]>/ that
disagrees (a collision of 16 hex digits, or corruption) also raises RefCacheMismatch.
RefCache.nearest(root, parts) -> (uri, differing part names) | None: the cache under root that
differs least, for a "miss because <part> changed" message.

Attributes: fingerprint, uri, parts, num_rows, roles, shard_rows, manifest. Methods: shards(),
check() ({shard: why} for every shard to (re)compute: ABSENT, or what failed verification: a
truncated or unreadable file, values that no longer match the checksum in its footer, no
checksum), missing_shards() (the shards of check()), is_complete(), verify() (RefCacheIncomplete
unless every shard verifies), write_shard(shard, values), read() (verifies each shard as it reads
it; RefCacheIncomplete, naming each absent or failing shard, if any).

Modules: fingerprint (parts, weights hash and its cost), store (layout, manifest checks). The
shards themselves are a `prefopt.shards` data set: atomic writes and why they are atomic on
object stores too, checksums and what verification costs are said there.
"""

from prefopt.refcache.fingerprint import PART_NAMES, fingerprint_parts, weights_fingerprint
from prefopt.refcache.store import ABSENT, RefCache, RefCacheIncomplete, RefCacheMismatch, Shard

__all__ = [
    "ABSENT", "PART_NAMES", "RefCache", "RefCacheIncomplete", "RefCacheMismatch", "Shard", "fingerprint_parts",
    "weights_fingerprint",
]
