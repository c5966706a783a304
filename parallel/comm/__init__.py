"""Communication on explicit, counted groups: collectives, point-to-point, Megatron's f/g mappings, the gloo ring."""
from parallel.comm.collectives import (
                                      CommStats,
                                      Group,
                                      OpCount,
                                      all_gather,
                                      all_gather_into,
                                      all_reduce,
                                      broadcast,
                                      reduce_scatter,
                                      reduce_scatter_into,
)
from parallel.comm.mappings import (
                                      all_gather_to_seq,
                                      copy_to_group,
                                      gather_from_seq,
                                      reduce_from_group,
                                      reduce_scatter_to_seq,
                                      scatter_to_seq,
)
from parallel.comm.p2p import P2PWork, exchange, exchange_start, isend, recv, send

__all__ = ["CommStats", "Group", "OpCount", "all_reduce", "all_gather", "reduce_scatter", "broadcast",
           "all_gather_into", "reduce_scatter_into", "P2PWork", "exchange", "exchange_start",
           "isend", "send", "recv", "copy_to_group", "reduce_from_group", "scatter_to_seq", "gather_from_seq",
           "reduce_scatter_to_seq", "all_gather_to_seq"]
