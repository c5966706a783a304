"""Build a model on the meta device, then produce any of its tensors with the values the seeded
full build would have given — one tensor at a time, so a rank never holds the whole model.

    torch.manual_seed(0)
    model, init = deferred_init(GPT, n_layer=48)       # no parameter memory allocated
    w = init.materialize(model.blocks[3].mlp.fc.weight) # == that weight of a CPU-built GPT

Approach (after torchdistx's deferred_init): the factory runs under a TorchDispatchMode that sends
every CPU allocation to the meta device (not a ``torch.device("meta")`` context: Hugging Face
models skip their weight init under one) and records every aten op on meta tensors — its arguments (meta tensors as
(storage, size, stride, offset) references), and, for random ops, the CPU generator state just
before it. Each random op is also *run for real* on a scratch tensor of the same layout, so the
generator advances exactly as in a CPU build and every later op draws the same numbers; the
scratch is freed at once (peak: the largest single tensor).

``materialize(t)`` replays, for t's storage only, the op that created it and then the in-place
ops applied to it, in order, each random op from its recorded generator state (replay starts
at the last op that overwrote the whole storage: ``normal_``, ``uniform_``, ``fill_``, ``zero_``,
``copy_``, …). Tensors an op read from are produced the same way, as of that op. The default CPU
generator's state is restored afterwards.

Limits: random ops with an explicit ``generator=`` are refused; ops needing data values (``.item()``,
data-dependent shapes) fail on meta anyway; real tensors used as inputs are kept by reference.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["deferred_init", "InitRecord"]

_aten = torch.ops.aten
_OVERWRITE = {_aten.normal_, _aten.uniform_, _aten.fill_, _aten.zero_, _aten.random_, _aten.exponential_,
              _aten.cauchy_, _aten.log_normal_, _aten.geometric_, _aten.copy_, _aten.bernoulli_}
_META = torch.device("meta")
_CPU = torch.device("cpu")


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _Ref:
    """A meta tensor as an op saw it: which storage, and the view of it."""
    __slots__ = ("key", "size", "stride", "offset", "dtype")

    def __init__(self, t: torch.Tensor):
        self.key, self.size, self.stride = _key(t), tuple(t.shape), tuple(t.stride())
        self.offset, self.dtype = t.storage_offset(), t.dtype

    def on(self, storage) -> torch.Tensor:
        return torch.empty(0, dtype=self.dtype, device=_CPU).set_(storage, self.offset, self.size, self.stride)


class _Event:
    __slots__ = ("seq", "func", "args", "kwargs", "rng")

    def __init__(self, seq, func, args, kwargs, rng):
        self.seq, self.func, self.args, self.kwargs, self.rng = seq, func, args, kwargs, rng


class _Storage:
    def __init__(self, meta: torch.Tensor, producer: _Event, index: int):
        self.meta = meta                       # keeps the meta storage (and its id) alive
        self.nbytes = meta.untyped_storage().nbytes()
        self.producer, self.index = producer, index
        self.mutations: list = []              # (event, _Ref of the written argument)


class InitRecord(TorchDispatchMode):
    """The recorded construction; ``materialize(meta_tensor)`` returns its real CPU value."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, _Storage] = {}
        self.seq = 0

    # --- recording --------------------------------------------------------------------------------
    def _spec(self, x):
        if isinstance(x, torch.Tensor) and x.is_meta:
            if _key(x) not in self.storages:
                raise NotImplementedError("deferred_init: an op read a meta tensor created outside the "
                                          "recorded factory; create every meta tensor inside it")
            return _Ref(x)
        return x

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(a.name == "device" and a.kwarg_only for a in func._schema.arguments):
            dev = kwargs.get("device")
            if dev is None or torch.device(dev).type == "cpu":
                kwargs = {**kwargs, "device": _META}          # CPU allocations become meta ones
        rng = None
        if torch.Tag.nondeterministic_seeded in func.tags:
            if kwargs.get("generator") is not None:
                raise NotImplementedError(f"deferred_init: {func} with an explicit generator= cannot be "
                                          f"replayed; use the default generator (torch.manual_seed)")
            rng = torch.get_rng_state()
        out = func(*args, **kwargs)
        self.seq += 1
        ev = _Event(self.seq, func, tree_map(self._spec, args), tree_map(self._spec, kwargs), rng)
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                t = args[i] if i < len(args) else kwargs.get(a.name)
                for tt in (t if isinstance(t, (list, tuple)) else [t]):
                    if isinstance(tt, torch.Tensor) and tt.is_meta:
                        self.storages[_key(tt)].mutations.append((ev, _Ref(tt)))
        for j, o in enumerate(tree_flatten(out)[0]):
            if isinstance(o, torch.Tensor) and o.is_meta and _key(o) not in self.storages:
                self.storages[_key(o)] = _Storage(o, ev, j)
        if rng is not None:
            self._advance(ev)
        return out

    def _advance(self, ev: _Event) -> None:
        """Run a random op for real so the CPU generator moves exactly as in a CPU build."""
        refs = [x for x in tree_flatten((ev.args, ev.kwargs))[0] if isinstance(x, _Ref)]
        if ev.func.overloadpacket in _OVERWRITE and len(refs) == 1 and refs[0] is ev.args[0]:
            scratch = {refs[0].key: torch.UntypedStorage(self.storages[refs[0].key].nbytes)}
            self._run(ev, scratch, keep_rng=False)
        else:
            self._run(ev, {}, keep_rng=False)

    # --- replay -----------------------------------------------------------------------------------
    def _resolve(self, x, before: int, override: dict):
        if isinstance(x, _Ref):
            st = override.get(x.key)
            if st is None:
                st = self._storage_at(self.storages[x.key], before)
            return x.on(st)
        if isinstance(x, torch.device) and x == _META:
            return _CPU
        return x

    def _run(self, ev: _Event, override: dict, keep_rng: bool = True):
        args = tree_map(lambda x: self._resolve(x, ev.seq, override), ev.args)
        kwargs = tree_map(lambda x: self._resolve(x, ev.seq, override), ev.kwargs)
        saved = torch.get_rng_state() if keep_rng else None
        if ev.rng is not None:
            torch.set_rng_state(ev.rng)
        try:
            return ev.func(*args, **kwargs)
        finally:
            if saved is not None:
                torch.set_rng_state(saved)

    def _storage_at(self, st: _Storage, before: float):
        """The real storage of ``st`` as it was just before event number ``before``."""
        out = tree_flatten(self._run(st.producer, {}))[0][st.index]
        storage = out.untyped_storage()
        if storage.nbytes() != st.nbytes:
            raise NotImplementedError(f"deferred_init: replaying {st.producer.func} gave a storage of "
                                      f"{storage.nbytes()} bytes, the meta one has {st.nbytes}")
        muts = [(ev, ref) for ev, ref in st.mutations if ev.seq < before]
        start = 0
        for k in range(len(muts) - 1, -1, -1):
            ev, ref = muts[k]
            whole = (ref.offset == 0 and ref.dtype.itemsize * _numel(ref.size) == st.nbytes
                     and ref.stride == _contiguous(ref.size))
            tgt = ev.args[0] if ev.args else None
            if (ev.func.overloadpacket in _OVERWRITE and whole and isinstance(tgt, _Ref) and tgt.key == ref.key
                    and (tgt.offset, tgt.size, tgt.stride) == (ref.offset, ref.size, ref.stride)):
                start = k
                break
        for ev, ref in muts[start:]:
            self._run(ev, {ref.key: storage})
        return storage

    def materialize(self, t: torch.Tensor) -> torch.Tensor:
        """Real CPU value of meta tensor ``t`` (a parameter or buffer built by the factory)."""
        if not t.is_meta:
            return t.detach()
        st = self.storages.get(_key(t))
        if st is None:
            raise KeyError("materialize: this meta tensor was not created inside deferred_init's factory")
        return _Ref(t).on(self._storage_at(st, float("inf")))


def _numel(size) -> int:
    n = 1
    for s in size:
        n *= s
    return n


def _contiguous(size) -> tuple:
    stride, acc = [], 1
    for s in reversed(size):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def deferred_init(factory, *args, **kwargs):
    """Run ``factory(*args, **kwargs)`` on the meta device, recording its initialisation.
    Returns ``(module, record)``; seed before calling it exactly as before a full build."""
    rec = InitRecord()
    with rec:
        model = factory(*args, **kwargs)
    return model, rec
