"""Which blocks a new server hosts when told only how many: a pure function of the swarm's coverage.

For now the rule is the simple one: the first span of ``num_blocks`` consecutive blocks whose
busiest block has the fewest servers (ties broken by the fewest servers in total, then leftmost). A
gap (a block nobody serves) therefore always wins over a covered block. A smarter, throughput-aware
choice and rebalancing are a later step.
"""

from __future__ import annotations


def choose_best_start(servers_per_block: list[int], num_blocks: int) -> int:
    total = len(servers_per_block)
    if not 1 <= num_blocks <= total:
        raise ValueError(f"cannot host {num_blocks} blocks of a model with {total}")
    best_start, best_key = 0, None
    for start in range(total - num_blocks + 1):
        window = servers_per_block[start : start + num_blocks]
        key = (max(window), sum(window))
        if best_key is None or key < best_key:
            best_start, best_key = start, key
    return best_start
