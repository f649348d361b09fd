"""Launch command lines for a cluster layout, one per node, in each engine's own flags (cluster_engines.toml)."""
from __future__ import annotations

from .cluster import Layout, engine_data

HEAD = "HEAD_IP"  # the address of node 0, as the other nodes reach it


def node_commands(lay: Layout, model: str, nodes: int, per_node: int, context: int,
                  concurrency: int) -> list[list[str]]:
    """argv of the command each node runs, node 0 first."""
    e = engine_data()["engines"][lay.engine]
    build = _vllm if lay.engine == "vllm" else _sglang
    return [build(e, e["flags"], lay, model, nodes, per_node, context, concurrency, rank) for rank in range(nodes)]


def _vllm(e: dict, f: dict, lay: Layout, model: str, nodes: int, per_node: int, context: int, concurrency: int,
          rank: int) -> list[str]:
    argv = list(e["launcher"]) + [model, f["context"], str(context), f["max_seqs"], str(-(-concurrency // lay.dp))]
    if lay.tp > 1:
        argv += [f["tp"], str(lay.tp)]
    if lay.pp > 1:
        argv += [f["pp"], str(lay.pp)]
    if lay.ep:
        argv.append(f["ep"])
    if lay.dp > 1:
        argv += [f["dp"], str(lay.dp)]
        if nodes > 1:  # data-parallel engines on every node, one API server on node 0
            local = lay.dp // nodes
            argv += [f["dp_local"], str(local), f["dp_address"], HEAD, f["dp_rpc_port"], str(e["rpc_port"])]
            if rank:
                argv += [f["headless"], f["dp_start_rank"], str(rank * local)]
    elif nodes > 1:  # one engine spanning the nodes through torch.distributed
        argv += [f["nnodes"], str(nodes), f["node_rank"], str(rank), f["master_addr"], HEAD, f["master_port"],
                 str(e["master_port"])]
        if rank:
            argv.append(f["headless"])
    return argv


def _sglang(e: dict, f: dict, lay: Layout, model: str, nodes: int, per_node: int, context: int, concurrency: int,
            rank: int) -> list[str]:
    argv = list(e["launcher"]) + [e["model"], model, f["tp"], str(lay.tp), f["context"], str(context),
                                  f["max_seqs"], str(concurrency)]
    if lay.pp > 1:
        argv += [f["pp"], str(lay.pp)]
    if lay.attn_dp > 1:
        argv += [f["attn_dp"], str(lay.attn_dp)]
    if lay.ep:
        argv += [f["ep"], str(lay.moe_group)]
    if nodes > 1:
        argv += [f["dist_init_addr"], f"{HEAD}:{e['dist_port']}", f["nnodes"], str(nodes), f["node_rank"], str(rank)]
    if rank == 0:  # the HTTP server runs on node 0; listen beyond localhost
        argv += [f["host"], "0.0.0.0"]
    return argv
