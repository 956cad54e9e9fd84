"""SelfExtend decode attention read in place from a paged KV cache: one query per row, any number of rows.

Engines that page their cache (vLLM) keep each request's keys in fixed-size blocks listed by a block table.
A decode step's rows go through a fixed count of batched operations, whatever their number and lengths:
  - grouped logits of every row over all its keys, from the grouped keys' blocks (kept, or rotated here);
  - neighbor logits over the few blocks that hold each row's last W keys only, scattered over the grouped
    ones where i - j < W (the rest of the window's columns go to a spare column that is dropped);
  - one softmax per row, keys past the row's length hidden, then the values.
Nothing is left-padded or copied per row. The indices depend only on the block table and the lengths, so an
engine builds them once per step (`decode_plan`) and every layer of the step reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rotary import GroupedRotation, rotate


@dataclass(frozen=True)
class DecodePlan:
    """Where a step's decoding rows' keys are, as index tensors shared by every layer of the step.

    Blocks are selected from a per-block view flattened over (block, head), so one `index_select` gives each
    row's keys head by head in order: [rows·heads·count, block_size, d] is [rows·heads, count·block_size, d].
    """

    lengths: torch.Tensor  # [rows] keys per row; the query is the last, at position length - 1
    heads: int  # key/value heads
    block_size: int
    all_blocks: torch.Tensor  # [rows·heads·count] (block, head) index of every block a row uses, in order
    window_blocks: torch.Tensor  # [rows·heads·span] the same for the span blocks that hold its last W keys
    window_columns: torch.Tensor  # [rows, span·block_size] a window key's column, or `total` (spare) when i - j >= W
    hidden: torch.Tensor  # [rows, total] keys past the row's length
    hidden_values: torch.Tensor  # their value rows in [rows·heads·total, d], head by head
    query_angles: tuple[torch.Tensor, torch.Tensor]  # cos/sin [rows, d/2] from the query's position to its grouped one

    @property
    def total(self) -> int:
        """Key columns per row: the longest row's blocks."""
        return self.hidden.shape[1]


def decode_plan(block_table: torch.Tensor, lengths: torch.Tensor, n_blocks: int, block_size: int, heads: int,
                rotation: GroupedRotation) -> DecodePlan:
    """The indices of `paged_decode_attention` for rows with `lengths` keys in the blocks of `block_table`
    [rows, ≥ blocks needed]; table entries past a row's last block may be anything (their keys are hidden)."""
    lengths = lengths.long()
    device, window = lengths.device, rotation.window_size
    count = -(-int(lengths.max()) // block_size)
    total = count * block_size
    head = torch.arange(heads, device=device)[None, :, None]

    def flat(blocks: torch.Tensor) -> torch.Tensor:  # [rows, n] block numbers -> [rows·heads·n] (block, head) index
        return (blocks.long().clamp(0, n_blocks - 1)[:, None, :] * heads + head).flatten()

    span = min(-(-window // block_size) + 1, count)  # blocks the last W keys can touch
    first = ((lengths - window).clamp_min(0) // block_size).clamp_max(count - span)  # first of them, per row
    window_index = first[:, None] + torch.arange(span, device=device)
    columns = window_index[:, :, None] * block_size + torch.arange(block_size, device=device)
    columns = columns.flatten(1)
    query = (lengths - 1)[:, None]
    near = (columns <= query) & (query - columns < window)
    cos, sin = rotation.angles(query, "query", device)
    hidden = torch.arange(total, device=device)[None, :] >= lengths[:, None]
    row, column = hidden.nonzero(as_tuple=True)
    return DecodePlan(
        lengths=lengths, heads=heads, block_size=block_size,
        all_blocks=flat(block_table[:, :count]),
        window_blocks=flat(block_table.gather(1, window_index.to(block_table.dtype))),
        window_columns=torch.where(near, columns, total),
        hidden=hidden,
        hidden_values=((row[:, None] * heads + head[0, :, 0]) * total + column[:, None]).flatten(),
        query_angles=(cos[:, 0], sin[:, 0]),
    )


def _select(blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Blocks [n_blocks, heads, block_size, d] (any strides) at the flat (block, head) `index`, as
    [len(index), block_size, d], copied in the order they are stored (keys stored transposed stay so)."""
    flat = blocks.flatten(0, 1)
    if flat.stride(-2) == 1 and flat.stride(-1) != 1:  # stored [d, block_size]: copy that way, view back
        return flat.transpose(-1, -2).index_select(0, index).transpose(-1, -2)
    return flat.index_select(0, index)


def paged_decode_attention(query: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor,
                           plan: DecodePlan, rotation: GroupedRotation, scale: float,
                           grouped_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """SelfExtend attention of one query per row, [rows, query_heads, d] rotated at its position (length - 1),
    over the rows' keys and values in blocks [n_blocks, heads, block_size, d] (any strides).

    grouped_blocks: the keys at their grouped positions, in the same blocks and slots (kept by the engine);
    without them the row's keys are gathered and rotated here. Returns [rows, query_heads, d].
    """
    rows, query_heads, dim = query.shape
    heads, total = plan.heads, plan.total
    group = query_heads // heads
    folded = query.reshape(rows * heads, group, dim)
    grouped_query = rotate(query[:, :, None], plan.query_angles[0][:, None, None], plan.query_angles[1][:, None, None])
    grouped_query = grouped_query.reshape(rows * heads, group, dim)
    if grouped_blocks is not None:
        grouped_keys = _select(grouped_blocks, plan.all_blocks).reshape(rows * heads, total, dim)
    else:
        keys = _select(key_blocks, plan.all_blocks).reshape(rows, heads, total, dim)
        positions = torch.arange(total, device=query.device).expand(rows, total)
        grouped_keys = rotation(keys, positions, "key").reshape(rows * heads, total, dim)
    logits = torch.matmul(grouped_query, grouped_keys.transpose(-1, -2)).float()
    logits = torch.nn.functional.pad(logits, (0, 1))  # the spare column: window keys that are not neighbors
    window = _select(key_blocks, plan.window_blocks)
    span = window.shape[0] // (rows * heads)
    window = window.reshape(rows * heads, span, *window.shape[1:])
    near = torch.matmul(folded[:, None], window.transpose(-1, -2)).float()  # [rows·heads, span, group, block]
    near = near.transpose(1, 2).reshape(rows, heads * group, span * plan.block_size)
    logits = logits.view(rows, heads * group, total + 1)
    logits.scatter_(-1, plan.window_columns[:, None].expand_as(near), near)
    logits[..., :total].masked_fill_(plan.hidden[:, None], float("-inf"))
    logits[..., total] = float("-inf")
    probs = torch.softmax(logits.mul_(scale), dim=-1)[..., :total].to(value_blocks.dtype)
    values = _select(value_blocks, plan.all_blocks)
    values.view(-1, dim).index_fill_(0, plan.hidden_values, 0.0)  # unwritten slots may hold anything, even NaN
    out = torch.matmul(probs.view(rows * heads, group, total), values.view(rows * heads, total, dim))
    return out.view(rows, query_heads, dim).to(query.dtype)
