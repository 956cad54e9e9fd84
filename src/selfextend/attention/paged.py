"""SelfExtend attention read in place from a paged KV cache, for many short rows at once: a decode step's rows
(one query each) or short prefill chunks (a few queries each, padded to the most).

Engines that page their cache (vLLM) keep each request's keys in fixed-size blocks listed by a block table.
The rows go through a fixed count of batched operations, whatever their number and lengths:
  - grouped logits of every query over all its row's keys, from the grouped keys' blocks (kept, or rotated
    here);
  - neighbor logits over the few blocks that hold the keys within W of the row's queries only, scattered
    over the grouped ones where i - j < W (the rest of those columns go to a spare column that is dropped);
  - one softmax per query, keys after it hidden, then the values.
Nothing is copied per row. Memory is rows × queries × keys logits, so this is for short rows and chunks; long
prefill chunks belong to the blockwise kernel. The indices depend only on the block table, the lengths and
the query counts, so an engine builds them once per step (`paged_plan`) and every layer reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rotary import GroupedRotation, rotate


@dataclass(frozen=True)
class PagedPlan:
    """Where a step's rows' keys are, as index tensors shared by every layer of the step.

    Blocks are selected from a per-block view flattened over (block, head), so one `index_select` gives each
    row's keys head by head in order: [rows·heads·count, block_size, d] is [rows·heads, count·block_size, d].
    Row r's queries are its last q_r tokens; a row with fewer than the most queries repeats its last one.
    """

    heads: int  # key/value heads
    steps: torch.Tensor  # [rows, queries] which of its row's queries each is (padding repeats the last)
    real: torch.Tensor  # [rows, queries] which are not padding
    block_size: int
    all_blocks: torch.Tensor  # [rows·heads·count] (block, head) index of every block a row uses, in order
    window_blocks: torch.Tensor  # [rows·heads·span] the same for the blocks holding keys within W of its queries
    window_columns: torch.Tensor  # [rows, queries, span·block_size] a window key's column, `total` if not a neighbor
    hidden: torch.Tensor  # [rows, queries, total] keys after the query (or past the row's length)
    hidden_values: torch.Tensor  # value rows past each row's length in [rows·heads·total, d], head by head
    query_angles: tuple[torch.Tensor, torch.Tensor]  # cos/sin [rows, queries, d/2] to the grouped query positions

    @property
    def total(self) -> int:
        """Key columns per row: the longest row's blocks."""
        return self.hidden.shape[2]


def paged_plan(block_table: torch.Tensor, lengths: torch.Tensor, queries: torch.Tensor | None, n_blocks: int,
               block_size: int, heads: int, rotation: GroupedRotation) -> PagedPlan:
    """The indices of `paged_attention` for rows with `lengths` keys in the blocks of `block_table`
    [rows, ≥ blocks needed], of which the last `queries` (None: one each) are the rows' queries. Table
    entries past a row's last block may be anything (their keys are hidden)."""
    lengths = lengths.long()
    device, window = lengths.device, rotation.window_size
    queries = torch.ones_like(lengths) if queries is None else queries.long()
    most = int(queries.max())
    count = -(-int(lengths.max()) // block_size)
    total = count * block_size
    head = torch.arange(heads, device=device)

    def flat(blocks: torch.Tensor) -> torch.Tensor:  # [rows, n] block numbers -> [rows·heads·n] (block, head) index
        return (blocks.long().clamp(0, n_blocks - 1)[:, None, :] * heads + head[None, :, None]).flatten()

    span = min(-(-(window + most - 1) // block_size) + 1, count)  # blocks the neighbor keys can touch
    first = ((lengths - queries - window + 1).clamp_min(0) // block_size).clamp_max(count - span)
    window_index = first[:, None] + torch.arange(span, device=device)
    columns = (window_index[:, :, None] * block_size + torch.arange(block_size, device=device)).flatten(1)
    query_index = torch.arange(most, device=device)[None, :]
    step = torch.minimum(query_index, queries[:, None] - 1)
    position = (lengths - queries)[:, None] + step  # [rows, queries]; padding repeats the last query
    near = (columns[:, None, :] <= position[..., None]) & (position[..., None] - columns[:, None, :] < window)
    cos, sin = rotation.angles(position, "query", device)
    key_index = torch.arange(total, device=device)
    row, column = (key_index[None, :] >= lengths[:, None]).nonzero(as_tuple=True)  # past each row's length
    return PagedPlan(
        heads=heads, steps=step, real=query_index < queries[:, None], block_size=block_size,
        all_blocks=flat(block_table[:, :count]),
        window_blocks=flat(block_table.gather(1, window_index.to(block_table.dtype))),
        window_columns=torch.where(near, columns[:, None, :], total),
        hidden=key_index[None, None, :] > position[..., None],
        hidden_values=((row[:, None] * heads + head) * total + column[:, None]).flatten(),
        query_angles=(cos, sin),
    )


def blocks_in_order(blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """blocks[index] along the first axis, copied in the order the last two axes are stored (keys stored
    transposed, [d, block_size], stay so: a strided copy the other way is several times slower)."""
    if blocks.stride(-2) == 1 and blocks.stride(-1) != 1:
        return blocks.transpose(-1, -2).index_select(0, index).transpose(-1, -2)
    return blocks.index_select(0, index)


def _select(blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Blocks [n_blocks, heads, block_size, d] (any strides) at the flat (block, head) `index`, as
    [len(index), block_size, d]."""
    heads = blocks.shape[1]
    if blocks.stride(0) != heads * blocks.stride(1):  # slots between a block's heads (vLLM's GPU layout)
        return blocks[index // heads, index % heads].contiguous()
    return blocks_in_order(blocks.flatten(0, 1), index)


def paged_attention(query: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor, plan: PagedPlan,
                    rotation: GroupedRotation, scale: float, grouped_blocks: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """SelfExtend attention of the rows' queries [rows, queries, query_heads, d], rotated at their positions,
    over the rows' keys and values in blocks [n_blocks, heads, block_size, d] (any strides).

    grouped_blocks: the keys at their grouped positions, in the same blocks and slots (kept by the engine);
    without them the rows' keys are gathered and rotated here. Returns [rows, queries, query_heads, d].
    """
    rows, most, query_heads, dim = query.shape
    heads, total = plan.heads, plan.total
    group = query_heads // heads

    def folded(x: torch.Tensor) -> torch.Tensor:  # [rows, queries, query_heads, d] -> [rows·heads, group·queries, d]
        return x.view(rows, most, heads, group, dim).permute(0, 2, 3, 1, 4).reshape(rows * heads, group * most, dim)

    cos, sin = plan.query_angles
    grouped_query = folded(rotate(query, cos[:, :, None], sin[:, :, None]))
    if grouped_blocks is not None:
        grouped_keys = _select(grouped_blocks, plan.all_blocks).reshape(rows * heads, total, dim)
    else:
        keys = _select(key_blocks, plan.all_blocks).reshape(rows, heads, total, dim)
        positions = torch.arange(total, device=query.device).expand(rows, total)
        grouped_keys = rotation(keys, positions, "key").reshape(rows * heads, total, dim)
    logits = torch.matmul(grouped_query, grouped_keys.transpose(-1, -2)).float()
    logits = torch.nn.functional.pad(logits, (0, 1)).view(rows, heads * group, most, total + 1)  # + the spare column
    window = _select(key_blocks, plan.window_blocks)
    span = window.shape[0] // (rows * heads)
    window = window.reshape(rows * heads, span, *window.shape[1:])
    near = torch.matmul(folded(query)[:, None], window.transpose(-1, -2)).float()  # [rows·heads, span, gq, block]
    near = near.transpose(1, 2).reshape(rows, heads * group, most, span * plan.block_size)
    logits.scatter_(-1, plan.window_columns[:, None].expand_as(near), near)
    logits[..., :total].masked_fill_(plan.hidden[:, None], float("-inf"))
    logits[..., total] = float("-inf")
    probs = torch.softmax(logits.mul_(scale), dim=-1)[..., :total].to(value_blocks.dtype)
    values = _select(value_blocks, plan.all_blocks)
    values.view(-1, dim).index_fill_(0, plan.hidden_values, 0.0)  # unwritten slots may hold anything, even NaN
    out = torch.matmul(probs.reshape(rows * heads, group * most, total), values.view(rows * heads, total, dim))
    return out.view(rows, heads, group, most, dim).permute(0, 3, 1, 2, 4).reshape(rows, most, query_heads, dim)
