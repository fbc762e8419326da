"""Data parallelism beyond the gradient all-reduce: which rows a rank owns, and the collectives that
put sharded rows back together with their gradients."""
from bype.parallel.gather import all_gather_rows, gather_rows
from bype.parallel.shard import RowShard, attach_row_shard, shard_range, shard_sizes

__all__ = ["RowShard", "all_gather_rows", "attach_row_shard", "gather_rows", "shard_range", "shard_sizes"]
