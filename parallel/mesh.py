"""The device mesh: named axes ("pp", "dp", "cp", "tp") over torch's DeviceMesh.

Global rank r sits at coordinates (pp, dp, cp, tp) with

    r = ((pp * DP + dp) * CP + cp) * TP + tp,

(cp = 1 gives the 3D layout r = (pp·DP + dp)·TP + tp). cp, context parallelism, shards the sequence
dim of activations (:mod:`parallel.context_parallel`); parameters are replicated over cp and their
gradients reduced over dp×cp, the flattened group ``mesh.group("dp_cp")`` (ZeRO shards over it, as
Megatron-LM does), which is the dp group itself when cp = 1.

so tp is the innermost axis (tensor-parallel peers are neighbouring ranks, on one node when the
node is big enough: their all-reduces are the most frequent) and pp the outermost (pipeline peers
talk least). This is the only place that maps ranks to coordinates (:func:`rank_of`,
:func:`coords_of`, which the planner and the dry run use too); every layer receives the
:class:`parallel.comm.Group` it needs from here, never from a global.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from parallel.comm import CommStats, Group
from parallel.moe.groups import expert_groups, release_expert_groups

AXES = ("pp", "dp", "cp", "tp")


def rank_of(pp: int, dp: int, tp: int, shape: dict, cp: int = 0) -> int:
    """Global rank at coordinates (pp, dp, cp, tp) of a mesh of ``shape`` {"pp": P, "dp": D, "tp": T,
    "cp": C (default 1)}: r = ((pp·D + dp)·C + cp)·T + tp."""
    return ((pp * shape["dp"] + dp) * shape.get("cp", 1) + cp) * shape["tp"] + tp


def coords_of(rank: int, shape: dict) -> dict:
    """{"pp", "dp", "cp", "tp"} coordinates of global ``rank``: the inverse of :func:`rank_of`."""
    T, C, D = shape["tp"], shape.get("cp", 1), shape["dp"]
    return {"pp": rank // (T * C * D), "dp": rank // (T * C) % D, "cp": rank // T % C, "tp": rank % T}


def default_device() -> torch.device:
    """CUDA (this rank's local GPU) when present, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def backend_for(device: torch.device | str) -> str:
    """nccl for CUDA devices, gloo for everything else."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device: torch.device | None = None, timeout_s: float = 60.0) -> torch.device:
    """Initialise the default process group from torchrun's environment (idempotent)."""
    device = device or default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s))
    return device


# One DeviceMesh (one set of process groups) per (world group, device type, shape) in a process. Every
# torch process group keeps gloo/NCCL threads and sockets until it is freed, and c10d's registry holds it
# until destroy_process_group: a long-lived process building many engines (a notebook, a test worker)
# would otherwise accumulate groups and their threads without bound.
_MESHES: dict = {}


def _device_mesh(device_type: str, shape: tuple):
    world = dist.group.WORLD
    for key in [k for k in _MESHES if k[0] is not world]:      # a new default group: the old ones are gone
        del _MESHES[key]
    key = (world, device_type, shape)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device_type, shape, mesh_dim_names=AXES)
    return _MESHES[key]


def _dp_cp_group(dm, grid: torch.Tensor, rank: int):
    """The flattened dp×cp process group of ``rank`` (same pp and tp), made once per mesh: every rank
    creates every such group, in the same order (new_group is collective)."""
    if not hasattr(dm, "_dp_cp_group"):
        P, D, C, T = grid.shape
        mine = None
        for pp in range(P):
            for tp in range(T):
                ranks = [int(r) for r in grid[pp, :, :, tp].flatten()]
                pg = dist.new_group(ranks)
                if rank in ranks:
                    mine = pg
        dm._dp_cp_group = mine
    return dm._dp_cp_group


def release_meshes(destroy: bool = False) -> None:
    """Forget the cached process groups (before destroy_process_group, so their threads can end);
    ``destroy``: also destroy them now. Every rank must call it at the same point of its program (the
    next Mesh creates groups anew, a collective call); a test worker does so after each task."""
    meshes = list(_MESHES.values())
    extra = [pg for groups in _PP_P2P.values() for pg in groups]
    _MESHES.clear()
    _PP_P2P.clear()
    release_expert_groups(destroy)
    if not destroy or not dist.is_initialized():
        return
    done = set()
    dp_cps = [getattr(dm, "_dp_cp_group", None) for dm in meshes]
    for pg in [dm.get_group(name) for dm in meshes for name in AXES] + dp_cps + extra:
        if pg is not dist.group.WORLD and pg is not None and id(pg) not in done:
            done.add(id(pg))
            dist.destroy_process_group(pg)


# The extra process groups per pp line for pipeline messages (parallel.pipeline.p2p_streams), per
# (world group, device type, shape): this rank's groups, in P2P_CHANNELS order.
_PP_P2P: dict = {}
P2P_CHANNELS = ("up0", "up1", "down0", "down1")


def _pp_p2p_groups(device_type: str, shape: tuple, pp: int) -> tuple:
    """Collective (every rank, same point): new_group over each pp line once per channel, in one order."""
    world = dist.group.WORLD
    for key in [k for k in _PP_P2P if k[0] is not world]:
        del _PP_P2P[key]
    key = (world, device_type, shape)
    if key not in _PP_P2P:
        me = dist.get_rank()
        lines = torch.arange(dist.get_world_size()).reshape(pp, -1).t().tolist()    # pp is the outermost axis
        mine = [None] * len(P2P_CHANNELS)
        for line in lines:
            for c in range(len(P2P_CHANNELS)):
                pg = dist.new_group(line)
                if me in line:
                    mine[c] = pg
        _PP_P2P[key] = tuple(mine)
    return _PP_P2P[key]


class Mesh:
    """A (pp, dp, cp, tp) mesh over the initialised world, with one counted :class:`Group` per axis
    (and "dp_cp", the dp×cp group gradients are reduced over).

    ``mesh.group("tp")`` is the tensor-parallel group of this rank, ``mesh.size("dp")`` the dp size,
    ``mesh.coord`` this rank's ``{"pp": i, "dp": j, "cp": c, "tp": k}``, ``mesh.rank_at(pp=.., dp=.., tp=..)``
    the global rank at given coordinates (unnamed axes default to this rank's own), and
    ``mesh.pp_prev`` / ``mesh.pp_next`` the neighbouring pipeline ranks (None at the ends).
    ``ep`` (dividing dp·cp) adds the expert-parallel groups "ep" and "edp" (:mod:`parallel.moe.groups`), carved
    from the flattened dp×cp index dp·CP + cp as from dp when cp = 1 (Megatron-Core's expert groups).
    """

    def __init__(self, pp: int = 1, dp: int = 1, tp: int = 1, device: torch.device | str | None = None,
                 stats: CommStats | None = None, ep: int = 1, cp: int = 1):
        if not dist.is_initialized():
            raise RuntimeError("Mesh needs an initialised process group: run under torchrun "
                               "(or python -m launch), or call parallel.mesh.init_distributed() first")
        world = dist.get_world_size()
        shape = {"pp": pp, "dp": dp, "cp": cp, "tp": tp}
        if any(n < 1 for n in shape.values()) or pp * dp * cp * tp != world:
            raise ValueError(f"mesh pp*dp*cp*tp = {pp}*{dp}*{cp}*{tp} = {pp * dp * cp * tp} must equal the world "
                             f"size {world}: change parallel.pp/dp/cp/tp or the number of processes")
        self.shape = shape
        self.device = torch.device(device) if device is not None else default_device()
        self.stats = stats if stats is not None else CommStats()
        self.rank = dist.get_rank()
        self.world_size = world
        self.device_mesh = _device_mesh("cpu" if self.device.type == "meta" else self.device.type, (pp, dp, cp, tp))
        grid = torch.arange(world).reshape(pp, dp, cp, tp)
        self.coord = coords_of(self.rank, shape)
        c = [self.coord[a] for a in AXES]
        self._groups = {}
        for i, axis in enumerate(AXES):
            idx = list(c)
            idx[i] = slice(None)
            ranks = tuple(int(r) for r in grid[tuple(idx)].flatten())
            self._groups[axis] = Group(self.device_mesh.get_group(axis), axis, ranks, c[i], self.stats)
        dp_cp = self._groups["dp"]
        if cp > 1:
            ranks = tuple(int(r) for r in grid[c[0], :, :, c[3]].flatten())
            dp_cp = Group(_dp_cp_group(self.device_mesh, grid, self.rank), "dp_cp", ranks,
                          ranks.index(self.rank), self.stats)
        self._groups["dp_cp"] = dp_cp
        self._groups["world"] = Group(dist.group.WORLD, "world", tuple(range(world)), self.rank, self.stats)
        self.ep = ep                    # ep is carved from dp×cp (Megatron-Core): a cp rank's tokens are more tokens
        self._groups["ep"], self._groups["edp"] = expert_groups(pp, dp * cp, tp, ep, dp_cp, self.stats)

    def group(self, axis: str) -> Group:
        """The counted group of this rank along ``axis`` ("pp", "dp", "cp", "tp", "dp_cp" or "world")."""
        if axis not in self._groups:
            raise KeyError(f"unknown mesh axis {axis!r}; axes are {AXES + ('dp_cp', 'world', 'ep', 'edp')}")
        return self._groups[axis]

    def pp_p2p_groups(self) -> dict | None:
        """{"up0", "up1", "down0", "down1": Group}: four more process groups over this rank's pp
        ranks for pipeline messages — from an even / odd pp rank to a higher / lower one (None when
        pp = 1). On NCCL a send blocks its group's stream until the peer receives; with these, each
        rank's stream on each group carries one neighbour one way, and no pipeline schedule can
        deadlock (:mod:`parallel.pipeline.p2p_streams`). Built once per mesh shape; the first call is
        collective (every rank, at the same point). Counted under axis "pp"."""
        pp = self._groups["pp"]
        if pp.size == 1:
            return None
        pgs = _pp_p2p_groups(self.device.type, tuple(self.shape.items()), pp.size)
        return {name: Group(pg, "pp", pp.ranks, pp.rank, self.stats) for name, pg in zip(P2P_CHANNELS, pgs)}

    def size(self, axis: str) -> int:
        return self.group(axis).size

    def local_rank(self, axis: str) -> int:
        return self.group(axis).rank

    def rank_at(self, **coords: int) -> int:
        """Global rank at the given coordinates; axes not named keep this rank's coordinate."""
        unknown = set(coords) - set(AXES)
        if unknown:
            raise KeyError(f"unknown mesh axes {sorted(unknown)}; axes are {AXES}")
        c = {**self.coord, **coords}
        for a in AXES:
            if not 0 <= c[a] < self.shape[a]:
                raise IndexError(f"coordinate {a}={c[a]} is outside the mesh ({a} size {self.shape[a]})")
        return rank_of(c["pp"], c["dp"], c["tp"], self.shape, c["cp"])

    @property
    def pp_prev(self) -> int | None:
        return self.rank_at(pp=self.coord["pp"] - 1) if self.coord["pp"] > 0 else None

    @property
    def pp_next(self) -> int | None:
        return self.rank_at(pp=self.coord["pp"] + 1) if self.coord["pp"] < self.shape["pp"] - 1 else None

    def __repr__(self):
        return (f"Mesh(pp={self.shape['pp']}, dp={self.shape['dp']}, cp={self.shape['cp']}, tp={self.shape['tp']}, "
                f"rank={self.rank}, coord={self.coord}, device={self.device})")
