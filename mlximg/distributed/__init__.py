"""Several processes, one image job: tensor parallelism (each rank holds a 1/N shard of the transformer's and
text encoder's attention and MLP weights, one all-reduce per attention and per MLP) and data parallelism (each
rank generates its share of the images), over MLX's own distributed layer (`mx.distributed`, started by
`mlx.launch`)."""

from .group import MODES, PeerLost, agree, group_for, peer_lost, rank_line, world

__all__ = ["MODES", "PeerLost", "agree", "group_for", "peer_lost", "rank_line", "world"]
