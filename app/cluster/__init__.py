"""The gallery sharded on a Ray cluster (the `cluster` extra: ray, psycopg).

app.cluster.shard holds one slice of one modality's gallery (a Ray actor); app.cluster.frontend
embeds once, fans out to the shards and merges. Neither module is imported by the single
process: ray is imported only when `--ray` is given.
"""

from __future__ import annotations


class ShardUnavailableError(Exception):
    """A shard did not answer in time (dead, restarting, its node gone): the answer would be
    incomplete, so the request gets 503 + Retry-After instead. The message says what was done
    (for a write: committed to the database, not yet applied by every shard)."""
