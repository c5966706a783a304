"""Checkpoint state of a ZeroOptimizer: partitioned (this rank's own) and full (per parameter name).

``state_dict()`` / ``load_state_dict()`` — each rank saves and restores only its partition: the
optimizer's own ``state_dict()`` over the flat shards, the fp32 masters and the loss scaler. It
loads only into the same layout (stage, dp size, rank, buckets); anything else raises.

``full_state_dict()`` / ``load_full_state_dict()`` — the unpartitioned view, for resharding
checkpoints across layouts: ``{"params": {name: fp32 tensor}, "state": {name: {key: value}},
"param_groups": [hyperparameters], "loss_scaler": {...}, "steps": n}``. Per-element optimizer
state (tensors shaped like the flat master: exp_avg, momentum_buffer, sum, …) is all-gathered over
dp bucket by bucket and cut into per-parameter tensors; anything else (Adam's scalar ``step``) is
copied. Loading takes each rank's slice of every parameter, so a full state dict saved under any
stage / dp size loads under any other. Tied parameters appear once, under their first name.
"""
from __future__ import annotations

import torch

from parallel.comm import all_gather_into
from parallel.data_parallel.bucket import FlatBucket
from parallel.zero.onebit import full_comm_state, load_full_comm_state
from parallel.zero.zero_one import restore_local_params

__all__ = ["ZeroStateMixin"]


class ZeroStateMixin:
    """State-dict methods of :class:`~parallel.zero.optimizer.ZeroOptimizer` (uses its attributes
    ``_all``, ``_pieces``, ``optimizer``, ``group``, ``stage``, ``scaler``, ``steps``, ``prec``)."""

    # --- partitioned ------------------------------------------------------------------------------
    def _layout(self) -> dict:
        return {"stage": self.stage, "dp": self.group.size, "rank": self.group.rank,
                "buckets": [(tuple(b.names), b.numel) for b in self._all]}

    def state_dict(self) -> dict:
        """This rank's partition: optimizer state over its shards, fp32 masters, loss scaler."""
        self.wait_param_gather()
        return {"layout": self._layout(), "optimizer": self.optimizer.state_dict(),
                "master": [b.master.detach().clone() for b in self._all],
                "loss_scaler": self.scaler.state_dict(), "steps": self.steps, "precision": self.prec.name}

    def load_state_dict(self, sd: dict) -> None:
        mine = self._layout()
        if sd.get("layout") != mine:
            old = sd.get("layout", {})
            raise ValueError(f"partitioned ZeRO state saved with stage={old.get('stage')}, dp={old.get('dp')}, "
                             f"rank={old.get('rank')} does not match stage={mine['stage']}, dp={mine['dp']}, "
                             f"rank={mine['rank']} (or the buckets differ): save with full_state_dict() and "
                             f"load with load_full_state_dict() to change layouts")
        self.optimizer.load_state_dict(sd["optimizer"])
        with torch.no_grad():
            for b, m in zip(self._all, sd["master"]):
                b.master.copy_(m)
        self.scaler.load_state_dict(sd["loss_scaler"])
        self.steps = sd.get("steps", 0)
        self._write_back()
        restore_local_params(self)                                   # 0/1 Adam's local weights (zero_one.py)

    # --- full, per parameter name ----------------------------------------------------------------
    def _full_flat(self, b: FlatBucket, shard: torch.Tensor) -> torch.Tensor:
        """The whole bucket (padded) from every rank's shard (stage 0: the shard is the whole)."""
        if b.shard == b.padded:
            return shard
        out = torch.empty(b.padded, dtype=shard.dtype, device=shard.device)
        work = all_gather_into(out, shard.contiguous(), b.group or self.group)
        if work is not None:
            work.wait()
        return out

    def _state_keys(self) -> dict:
        """{key: elementwise?} of the optimizer state, from the first piece that has state (Adam's
        exp_avg is shaped like its piece; its step is a scalar). Same on every rank."""
        for _, _, a, e, view in self._pieces:
            st = self.optimizer.state.get(view)
            if st:
                return {k: isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == e - a for k, v in st.items()}
        return {}

    def full_state_dict(self) -> dict:
        """Unpartitioned fp32 params and optimizer state per parameter name (every rank gets all)."""
        self.wait_param_gather()
        keys = self._state_keys()
        scalars = {}
        for _, _, _, _, view in self._pieces:
            for k, v in self.optimizer.state.get(view, {}).items():
                if not keys.get(k, False):
                    scalars.setdefault(k, v.clone() if isinstance(v, torch.Tensor) else v)
        params, state = {}, {}
        for b in self._all:
            mine = [pc for pc in self._pieces if pc[0] is b]
            flat = self._full_flat(b, b.master.detach())
            flats = {}
            for k, elementwise in keys.items():
                if elementwise:
                    shard = torch.zeros(b.shard, dtype=torch.float32, device=b.master.device)
                    for _, _, a, e, view in mine:
                        shard[a - b.lo:e - b.lo] = self.optimizer.state[view][k]
                    flats[k] = self._full_flat(b, shard)
            for i, name in enumerate(b.names):
                o, n, shape = b.offsets[i], b.sizes[i], b.shapes[i]
                params[name] = flat[o:o + n].view(shape).clone()
                if keys:
                    state[name] = {k: (flats[k][o:o + n].view(shape).clone() if ew else
                                       (scalars[k].clone() if isinstance(scalars[k], torch.Tensor) else scalars[k]))
                                   for k, ew in keys.items()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        out = {"params": params, "state": state, "param_groups": groups,
               "loss_scaler": self.scaler.state_dict(), "steps": self.steps}
        comm = full_comm_state(self)                                 # 1-bit Adam's per-rank error buffers
        if comm is not None:
            out["onebit_comm"] = comm
        return out

    def load_full_state_dict(self, sd: dict) -> None:
        """Take this rank's slice of every parameter (and its optimizer state) from a full dict."""
        names = [n for b in self._all for n in b.names]
        missing = [n for n in names if n not in sd["params"]]
        if missing:
            raise KeyError(f"load_full_state_dict: {len(missing)} parameter(s) missing from the state dict, "
                           f"e.g. {missing[:5]}; it has {list(sd['params'])[:5]}…")
        for b in self._all:
            for i, name in enumerate(b.names):
                if tuple(sd["params"][name].shape) != b.shapes[i]:
                    raise ValueError(f"load_full_state_dict: {name!r} has shape {tuple(sd['params'][name].shape)} "
                                     f"in the state dict but {b.shapes[i]} in the model")
        states = sd.get("state", {})
        if states and any(n not in states for n in names):
            raise ValueError(f"load_full_state_dict: optimizer state is missing for "
                             f"{[n for n in names if n not in states][:5]}; save a complete state")
        with torch.no_grad():
            for b, i, a, e, view in self._pieces:
                o = b.offsets[i]
                name = b.names[i]
                view.copy_(sd["params"][name].reshape(-1)[a - o:e - o])
                self.optimizer.state.pop(view, None)
                if states:
                    self.optimizer.state[view] = {
                        k: (v.reshape(-1)[a - o:e - o].to(view.dtype).clone()
                            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) == b.shapes[i]
                            else (v.clone() if isinstance(v, torch.Tensor) else v))
                        for k, v in states[name].items()}
        for g, sg in zip(self.optimizer.param_groups, sd.get("param_groups", [])):
            g.update({k: v for k, v in sg.items() if k != "params"})
        if "loss_scaler" in sd:
            self.scaler.load_state_dict(sd["loss_scaler"])
        self.steps = sd.get("steps", self.steps)
        load_full_comm_state(self, sd.get("onebit_comm"))
        self._write_back()
        restore_local_params(self)


def storage_bytes(tensors, seen: set, meta: bool = False) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once across calls sharing
    ``seen`` (a view and its base count once; a storage resized to 0 counts 0). Meta tensors count
    only with ``meta`` (an engine simulated on the meta device: :mod:`launch.simulate`)."""
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta" and not meta:
            continue
        st = t.untyped_storage()
        key = ("meta", st._cdata) if t.device.type == "meta" else (st.data_ptr(), t.device)
        if st.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total
