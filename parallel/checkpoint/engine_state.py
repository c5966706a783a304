"""An engine's state as checkpoint pieces: save, load into any layout, consolidate.

Each optimizer "piece" of ZeRO — a range [a, e) of one local parameter inside a flat bucket,
with its fp32 master values and its optimizer state — maps through the layout probe
(:mod:`parallel.checkpoint.layout`) to positions in a parameter of the unmodified model. Ownership, so each
element is written once: the dp partition (ZeRO ≥ 1) or dp rank 0 (stage 0); an expert parameter
(``param_info(p).ep_split``, :mod:`parallel.moe`: rank e of ep holds experts [e·E/ep, (e+1)·E/ep)) by
its expert-data-parallel partition (ZeRO ≥ 1) or edp rank 0 (stage 0), so every ep rank writes its own
experts and the logical tensor is the whole [E, …] stack whatever ep was; tp-sharded
parameters on every tp rank (a replicated kv head on the first rank holding it), replicated ones on
tp rank 0; never the pipeline's duplicate of a tied embedding; never vocabulary padding (it maps to no
element). Loading fills every piece (owned or not) and writes the masters back to the parameters, so
a checkpoint from any (dp, tp, pp, ZeRO stage) loads into any other.

Persistent buffers (BatchNorm's running statistics and batch count, ...) are pieces too
(``buffer/<name>``): each is written whole by one rank (dp rank 0, tp rank 0, the lowest pp rank whose
stages run the module that holds it) and read back by every rank that holds it; consolidation takes
them from there, so a resumed or consolidated model has the trained statistics, not the initial ones.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

from parallel.checkpoint.integrity import check_model, model_structure, verify_files
from parallel.checkpoint.layout import ParamOrigin, materialize, probe_origins
from parallel.checkpoint.meta_probe import LocalIndex, meta_origins
from parallel.checkpoint.ranged import ReadStats
from parallel.checkpoint.sharded import Piece, load_pieces, read_meta, save_pieces
from parallel.parameters import param_info
from parallel.zero.zero_one import restore_local_params


def _origins(engine) -> dict:
    """The layout probe, once per engine: on the meta device (:mod:`.meta_probe`: no copy of the model);
    should the sharding not replay on meta, the float64 value probe (8 bytes per model element, once)."""
    if getattr(engine, "_origins", None) is None:
        keep = engine.tensor_parallel                  # _shard records the probe's conversion: keep the real one
        try:
            engine._origins = meta_origins(engine.template, engine._shard, engine.stages, engine.tp.size,
                                           engine.tp.rank)
        except Exception as e:                          # any failure of the meta replay
            if engine.mesh.device.type == "meta":
                raise
            if engine.mesh.rank == 0:
                warnings.warn(f"checkpoint layout probe: the sharding does not replay on the meta device "
                              f"({type(e).__name__}: {str(e)[:200]}); using the float64 probe, which holds a copy of "
                              f"the model (8 bytes per element) while it runs", stacklevel=3)
            engine._origins = {k: ParamOrigin(o.name, o.full_shape, LocalIndex(o.full_shape, tuple(o.index.shape),
                                                                                table=o.index))
                               for k, o in probe_origins(engine.template, engine._shard, engine.stages).items()}
        finally:
            engine.tensor_parallel = keep
    return engine._origins


def _pieces(engine, with_optim: bool = True) -> tuple[list, dict]:
    z, origins = engine.zero, _origins(engine)
    dp_owner = z.stage > 0 or engine.dp_cp.rank == 0          # dp×cp: cp ranks hold replicas too
    ep_owner = z.stage > 0 or engine.cfg.parallel.ep == 1 or engine.mesh.group("edp").rank == 0
    pieces, scalars, state_keys = [], {}, set()
    for b, i, a, e, view in z._pieces:
        param = b.params[i]
        o = origins[id(param)]
        off = b.offsets[i]
        idx = o.index.range(a - off, e - off)
        keep = idx >= 0
        info = param_info(param)
        owner = ((ep_owner if info.ep_split else dp_owner) and (info.tp_split or engine.tp.rank == 0)
                 and not info.pp_duplicate and not info.tp_duplicate)
        pieces.append(_piece(f"model/{o.name}", o.full_shape, view, idx, keep, owner))
        if not with_optim:
            continue
        for k, v in z.optimizer.state.get(view, {}).items():
            if isinstance(v, torch.Tensor) and v.numel() == view.numel() and v.dim() > 0:
                state_keys.add(k)
                pieces.append(_piece(f"optim/{o.name}/{k}", o.full_shape, v, idx, keep, owner))
            elif v is not None:
                scalars[k] = float(v)
    return pieces, {"optim_scalars": scalars, "optim_state_keys": sorted(state_keys)}


def _piece(key, shape, t, idx, keep, owner) -> Piece:
    """The piece of ``t`` whose positions ``idx`` are kept (padding, position −1, left out): a view of ``t``
    when the kept elements are a prefix, else a copy that a load scatters back (``Piece.scatter``)."""
    if bool(keep.all()):
        return Piece(key, shape, t, idx, owner)
    k = int(keep.sum())
    if bool(keep[:k].all()):
        return Piece(key, shape, t.reshape(-1)[:k], idx[:k], owner)
    return Piece(key, shape, t[keep], idx[keep], owner, scatter=(t, keep))


def _buffer_pieces(engine) -> list:
    """Pieces of the persistent buffers this rank's stages hold under their unmodified-model names
    (stand-ins of blocks other stages own hold none; a buffer whose shape the conversion changed is
    left to the template). The owner of each is decided once, with the pp group (control traffic)."""
    want = {n: t for n, t in engine.template.state_dict(keep_vars=True).items()
            if not isinstance(t, torch.nn.Parameter)}
    held = {}
    for st in engine.stages:
        for n, b in st.named_buffers(remove_duplicate=False):
            if n in want and n not in held and tuple(b.shape) == tuple(want[n].shape):
                held[n] = b
    owners = getattr(engine, "_buffer_owners", None)
    if owners is None:
        names = [sorted(held)] * engine.pp.size
        if engine.pp.size > 1:
            names = [None] * engine.pp.size
            dist.all_gather_object(names, sorted(held), group=engine.pp.pg)
        owners = engine._buffer_owners = {n: next(r for r, ns in enumerate(names) if n in ns) for n in held}
    first = engine.dp_cp.rank == 0 and engine.tp.rank == 0
    return [Piece(f"buffer/{n}", tuple(b.shape), b, torch.arange(b.numel()),
                  first and owners[n] == engine.pp.rank) for n, b in held.items()]


def save_engine(engine, path: str, extra: dict, on_written=None) -> str:
    """Collective. Writes ``path`` atomically (see :func:`parallel.checkpoint.sharded.save_pieces`,
    which calls ``on_written()`` once this rank's shards are in the temporary folder). With
    optimizer offload the partition is read from its store for the duration (12 bytes/element)."""
    with engine.zero.materialized():
        return _save(engine, path, extra, on_written)


def _save(engine, path: str, extra: dict, on_written=None) -> str:
    pieces, meta, rank_meta = save_parts(engine, extra)
    return save_pieces(pieces, path, meta, rank_meta, on_written=on_written)


def save_parts(engine, extra: dict) -> tuple:
    """(pieces, meta, rank_meta) of a save: what :func:`save_engine` and the background writer
    (:mod:`parallel.checkpoint.async_save`) write."""
    pieces, optim_meta = _pieces(engine)
    pieces += _buffer_pieces(engine)
    return (pieces, *save_meta(engine, extra, optim_meta))


def optim_meta(engine) -> dict:
    """The optimizer's scalars and per-element state keys, as :func:`_pieces` reports them (without the pieces)."""
    scalars, keys = {}, set()
    for *_, view in engine.zero._pieces:
        for k, v in engine.zero.optimizer.state.get(view, {}).items():
            if isinstance(v, torch.Tensor) and v.numel() == view.numel() and v.dim() > 0:
                keys.add(k)
            elif v is not None:
                scalars[k] = float(v)
    return {"optim_scalars": scalars, "optim_state_keys": sorted(keys)}


def state_sources(engine) -> tuple:
    """The storage every saved tensor lives in (data pointer, size, dtype), in order: equal between two saves
    exactly when a snapshot plan (:mod:`parallel.checkpoint.snapshot`) built at the first serves the second."""
    out = []
    for *_, view in engine.zero._pieces:
        out.append((view.data_ptr(), view.numel(), view.dtype))
        for k, v in engine.zero.optimizer.state.get(view, {}).items():
            if isinstance(v, torch.Tensor) and v.numel() == view.numel() and v.dim() > 0:
                out.append((k, v.data_ptr(), v.dtype))
    for st in engine.stages:
        out += [(b.data_ptr(), b.numel(), b.dtype) for b in st.buffers()]
    return tuple(out)


def save_meta(engine, extra: dict, optim: dict) -> tuple:
    """(meta, rank_meta) of a save; ``optim``: :func:`optim_meta`. The rank meta's tensors are copies (a
    background writer saves them while training goes on)."""
    c = engine.cfg
    meta = {"step": engine.step_count, "format": "parallel3d-2", "layout": _layout(engine),
            "model": {"factory": c.model.factory, "kwargs": c.model.kwargs, **_structure(engine)},
            "optimizer": c.optimizer.name, "loss_scale": engine.zero.loss_scale,
            "scheduler_last_epoch": engine.scheduler.last_epoch, **optim, **extra}
    rank_meta = {"rng": torch.get_rng_state(), "world": engine.mesh.world_size}
    if hasattr(engine.zero.optimizer, "comm_state"):         # 1-bit Adam: this rank's error-feedback buffers
        rank_meta["optimizer_comm"] = _cloned(engine.zero.optimizer.comm_state)
    return meta, rank_meta


def _cloned(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _cloned(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cloned(v) for v in x)
    return x


def _structure(engine) -> dict:
    if getattr(engine, "_structure", None) is None:
        engine._structure = model_structure(engine.template)
    return engine._structure


def load_engine(engine, path: str) -> dict:
    """Collective: the ranks share the checksum verification (``integrity.verify_files``), and the
    final parameter write-back all-gathers (ZeRO). First the checkpoint's model must be this one
    (``integrity.check_model``: ValueError otherwise) and its files intact (``CheckpointError``
    otherwise); nothing is loaded before. With optimizer offload the loaded masters and moments
    are written back to the store. Returns the meta; the engine takes its step from ``meta["step"]``."""
    meta = read_meta(path)
    check_model(meta, engine.cfg.model.factory, engine.cfg.model.kwargs, _structure(engine))
    verify_files(path, meta)
    with engine.zero.materialized(write_back=True):
        return _load(engine, path)


def scalar_state(optimizer, view: torch.Tensor, value: float) -> torch.Tensor:
    """A loaded scalar state entry (Adam's ``step``) where torch's own ``Optimizer.load_state_dict`` puts it
    (``_process_value_according_to_param_policy``): on the parameter's device for a fused or capturable group,
    whose kernels read it there (``optimizer.fused``, on by default when every parameter is on CUDA), else on
    the CPU. It was always made on the CPU: a fused CUDA step after a resume handed the kernel a host pointer."""
    group = next((g for g in optimizer.param_groups if any(p is view for p in g["params"])), {})
    on_device = bool(group.get("fused") or group.get("capturable"))
    return torch.tensor(float(value), dtype=torch.float32, device=view.device if on_device else "cpu")


def _load(engine, path: str) -> dict:
    meta = read_meta(path)
    if meta.get("optimizer") != engine.cfg.optimizer.name and meta.get("optim_state_keys"):
        raise ValueError(f"checkpoint {path!r} holds {meta.get('optimizer')} state but optimizer.name="
                         f"{engine.cfg.optimizer.name!r}: load with the optimizer it was saved with")
    z = engine.zero
    keys = meta.get("optim_state_keys", [])
    for _, _, _, _, view in z._pieces:                 # create the state the checkpoint carries
        if keys:
            st = z.optimizer.state[view]
            for k in keys:
                st[k] = torch.zeros_like(view)
            for k, v in meta.get("optim_scalars", {}).items():
                st[k] = scalar_state(z.optimizer, view, v)
    pieces, _ = _pieces(engine)
    pieces = [p for p in pieces if p.key.startswith("model/") or p.key.split("/")[-1] in keys]
    buffers = _buffer_pieces(engine)
    saved = [p for p in buffers if p.key in meta.get("shapes", {})]
    if len(saved) < len(buffers) and engine.mesh.rank == 0:
        warnings.warn(f"checkpoint {path} holds no values for {len(buffers) - len(saved)} persistent buffers (e.g. "
                      f"{buffers[0].key[len('buffer/'):]!r}; saved before buffers were checkpointed): they keep their "
                      f"initial values", stacklevel=2)
    engine.checkpoint_reads = ReadStats()          # bytes this rank read (parallel.checkpoint.ranged)
    load_pieces(pieces + saved, path, engine.checkpoint_reads)
    z._write_back()
    if z.scaler.enabled and meta.get("loss_scale"):
        z.scaler.scale = float(meta["loss_scale"])
    for _ in range(int(meta.get("scheduler_last_epoch", 0)) - engine.scheduler.last_epoch):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine.scheduler.step()
    rank_file = os.path.join(path, f"rank_{engine.mesh.rank}.pt")
    if meta.get("layout", {}).get("dp") == engine.cfg.parallel.dp and meta.get("world_size") == engine.mesh.world_size \
            and os.path.isfile(rank_file) and meta["layout"] == _layout(engine):
        rank_meta = torch.load(rank_file, weights_only=False)
        torch.set_rng_state(rank_meta["rng"])
        if hasattr(z.optimizer, "comm_state"):
            z.optimizer.comm_state = rank_meta.get("optimizer_comm", {})
            restore_local_params(z)                        # 0/1 Adam: this rank's own weights (zero/zero_one.py)
    elif getattr(z.optimizer, "comm_state", None) is not None and engine.mesh.rank == 0 \
            and z.optimizer.t > z.optimizer.param_groups[0].get("freeze_step", 0):
        warnings.warn(f"checkpoint {path}: 1-bit Adam's error-feedback buffers are per rank and this layout differs "
                      f"from the saved one: they restart at zero (the resume is not bit-exact)", stacklevel=2)
    return meta


def _layout(engine) -> dict:
    c = engine.cfg
    ep = {"ep": c.parallel.ep} if c.parallel.ep > 1 else {}       # (absent for ep = 1: older checkpoints match)
    return {"dp": c.parallel.dp, "tp": c.parallel.tp, "pp": c.parallel.pp, "zero_stage": c.zero.stage,
            "precision": c.precision, **ep}


def full_state_dict(engine) -> dict | None:
    """Gather every owned model element to rank 0 and return the unmodified model's state_dict there."""
    with engine.zero.materialized():
        pieces, _ = _pieces(engine, with_optim=False)
        mine = [(p.key[len("model/"):], p.full_shape, p.index.reshape(-1).clone(),
                 p.local.detach().reshape(-1).float().cpu().clone()) for p in pieces if p.owner]
        mine += [(p.key, p.full_shape, p.index.clone(), p.local.detach().reshape(-1).cpu().clone())
                 for p in _buffer_pieces(engine) if p.owner]
    world = engine.mesh.world_size
    gathered = [None] * world if engine.mesh.rank == 0 else None
    if world > 1:
        dist.gather_object(mine, gathered, dst=0)
    else:
        gathered = [mine]
    if engine.mesh.rank != 0:
        return None
    full: dict = {}
    for part in gathered:
        for name, shape, idx, vals in part:
            if name.startswith("buffer/"):
                full[name] = vals
                continue
            if name not in full:
                full[name] = torch.full((torch.Size(shape).numel(),), float("nan"))
            full[name][idx] = vals
    names = {}
    for n, p in engine.template.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    sd = {}
    for key, t in engine.template.state_dict(keep_vars=True).items():
        if isinstance(t, torch.nn.Parameter):
            canon = names[id(t)]
            v = full[canon].view(t.shape).to(t.dtype)
            if torch.isnan(v).any():
                raise RuntimeError(f"consolidation: elements of {canon!r} were owned by no rank (a layout bug)")
            sd[key] = v
        elif f"buffer/{key}" in full:                   # a persistent buffer as trained
            sd[key] = full[f"buffer/{key}"].view(t.shape).to(t.dtype)
        else:
            sd[key] = t.detach().clone()
    return sd


def full_model(engine):
    sd = full_state_dict(engine)
    if sd is None:
        return None
    model = materialize(engine.template)
    model.load_state_dict(sd, strict=True)
    return model
