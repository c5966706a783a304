"""Pre-flight checks: what can be found wrong without the model, before any worker starts.

``python -m launch`` runs these after the config validates and exits 2 (config error) on the first
problem (``--dry-run`` runs only the first two, which change nothing on disk), so a job that cannot
start fails once, in the launcher, in a second — not on every rank after the process groups are up:

* ``train.steps`` is at least 1 (0 would start every worker to train nothing);
* the factories import: ``model.factory``, ``data.factory``, ``train.finish`` and a ``loss`` given
  as ``pkg.module:function`` (importing, not calling them); ``model.kwargs`` / ``data.kwargs`` fit the
  factory's signature (no key it does not take — the closest parameter is suggested — and no required one
  missing; a factory with ``**kwargs`` takes any);
* ``train.checkpoint.dir`` (when checkpoints are written), the directories of
  ``train.metrics_file`` and ``train.tensorboard`` can be created and written;
* ``zero.offload.nvme_path`` (when anything is offloaded to nvme) is an existing, writable
  directory with room for the offloaded state: when the whole job runs on this node the state's
  size is a lower bound from the model built on the meta device (structure only, no memory),
  Ψ parameters:

      optimizer on nvme:  12 bytes (fp32 master, Adam m and v) × Ψ × 2 (old and new copies
                          coexist inside a step: the store reserves twice); with
                          optimizer.state_dtype int8 6 + 8/256 bytes (master, 8-bit m and v with a
                          scale per 256 elements each) instead of 12
      params on nvme:      4 bytes × Ψ × (2 with the optimizer offloaded too, else 1)

  Each element is owned by exactly one rank of its tensor/pipeline slice, so the ranks of one
  node together hold at least Ψ elements; padding, tensor-parallel replicas and the stores'
  copy-on-write slack only add to it. The workers' stores check the exact figure again;
* files named by ``data.kwargs`` (keys ``path``, ``file``, ``*_path``, ``*_file``, ``*_dir``,
  ``files``, ``paths``) exist.

:func:`check_config` holds the checks that need no file system (the worker entry point runs it too).
"""
from __future__ import annotations

import difflib
import inspect
import os
import re
import shutil

import torch

from parallel.checkpoint import owner
from parallel.config import Config, ConfigError, import_object

_PATH_KEY = re.compile(r"^(path|paths|file|files|dir|dirs)$|_(path|paths|file|files|dir|dirs)$")


class PreflightError(ConfigError):
    """A pre-flight check failed; the message names the key, the path and the fix."""


def check_config(cfg: Config) -> None:
    if cfg.train.steps < 1:
        raise PreflightError(f"train.steps={cfg.train.steps}: there is nothing to train; give the number of "
                             f"optimizer steps, e.g. train.steps=100")


def check_imports(cfg: Config) -> None:
    specs = [("model.factory", cfg.model.factory), ("data.factory", cfg.data.factory)]
    specs += [("train.finish", cfg.train.finish)] if cfg.train.finish else []
    specs += [("loss", cfg.loss)] if ":" in cfg.loss else []
    for key, spec in specs:
        try:
            obj = import_object(spec, key)
        except ConfigError:
            raise
        except Exception as e:                  # the module itself raised while being imported
            first = (str(e).strip().splitlines() or [""])[0]
            raise PreflightError(f"{key}={spec!r}: importing module {spec.split(':')[0]!r} raised "
                                 f"{type(e).__name__}: {first}; fix that module") from None
        if not callable(obj):
            raise PreflightError(f"{key}={spec!r} is a {type(obj).__name__}, not a function or class")
        kwargs = {"model.factory": cfg.model.kwargs, "data.factory": cfg.data.kwargs}.get(key)
        if kwargs is not None:
            check_kwargs(key, spec, obj, kwargs)


def check_kwargs(key: str, spec: str, obj, kwargs: dict) -> None:
    """``model.kwargs`` / ``data.kwargs`` against the factory's signature: a key it does not take (a typo such as
    n_embdd) or a required argument left out, named with the closest parameter, before any worker starts (each
    rank's factory call raised TypeError). A factory taking ``**kwargs`` accepts any key."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):             # a builtin or C callable without a readable signature
        return
    kinds = {p.kind for p in params.values()}
    if inspect.Parameter.VAR_KEYWORD in kinds:
        return
    names = [n for n, p in params.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    where = key.replace("factory", "kwargs")
    for k in kwargs:
        if k not in names:
            close = difflib.get_close_matches(k, names, 1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise PreflightError(f"{where}.{k}: {key}={spec!r} takes no argument {k!r}; {hint}it takes {names}")
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return
    missing = [n for n in names if params[n].default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise PreflightError(f"{where}: {key}={spec!r} needs {missing} (no default): add "
                             + ", ".join(f"{where}.{n}=..." for n in missing))


def check_writable_dir(path: str, key: str, create: bool = True) -> None:
    """``path`` is (or, with ``create``, can be made) a directory this process can write into.
    Writability is tried with a probe file: ``os.access`` is wrong for root and read-only mounts."""
    try:
        if create:
            os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".p3d-preflight-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise PreflightError(f"{key}={path!r} is not a writable directory ({type(e).__name__}: {e.strerror or e}): "
                             f"choose a directory this job can write, or fix its permissions") from None


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def offload_bytes(cfg: Config) -> tuple[int, int] | None:
    """(Ψ, lower bound of the nvme bytes of the whole job), or None when the model cannot be built
    on the meta device."""
    off = cfg.zero.offload
    try:
        factory = import_object(cfg.model.factory, "model.factory")
        with torch.device("meta"):
            model = factory(**cfg.model.kwargs)
        psi = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    except Exception:
        return None
    opt = off.optimizer == "nvme"
    per = 12 if cfg.optimizer.state_dtype != "int8" else 6 + 8 / 256     # int8 moments: offload_states.py
    need = (int(2 * per * psi) if opt else 0)
    need += (8 if off.optimizer != "none" else 4) * psi if off.params == "nvme" else 0
    return psi, need


def check_nvme(cfg: Config, whole_job_here: bool) -> None:
    off = cfg.zero.offload
    if "nvme" not in (off.optimizer, off.params):
        return
    path = off.nvme_path
    if not os.path.exists(path):
        raise PreflightError(f"zero.offload.nvme_path {path!r} does not exist; create it (mkdir -p {path}) or point "
                             f"nvme_path at an existing directory on a local disk")
    if not os.path.isdir(path):
        raise PreflightError(f"zero.offload.nvme_path {path!r} is not a directory; point it at a directory")
    check_writable_dir(path, "zero.offload.nvme_path", create=False)
    if not whole_job_here:
        return                                  # this node's share is not known without the layout: workers check
    est = offload_bytes(cfg)
    if est is None:
        return
    psi, need = est
    free = shutil.disk_usage(path).free
    if need > free:
        state = ("24 bytes per parameter: fp32 master, Adam m, v" if cfg.optimizer.state_dtype != "int8" else
                 "12.06 bytes per parameter: fp32 master, 8-bit Adam m, v")
        what = " and ".join(w for w, on in ((f"the optimizer state ({state}; two copies)", off.optimizer == "nvme"),
                                            ("the parameters", off.params == "nvme")) if on)
        raise PreflightError(f"zero.offload.nvme_path {path!r} has {_gib(free)} free but the job offloads at least "
                             f"{_gib(need)} there ({what}, for {psi:,} parameters): free space, or point nvme_path at "
                             f"a larger disk")


def check_paths(cfg: Config) -> None:
    t = cfg.train
    if t.checkpoint.every and t.checkpoint.dir:
        check_writable_dir(t.checkpoint.dir, "train.checkpoint.dir")
    if t.checkpoint.dir and (busy := owner.owner_elsewhere(t.checkpoint.dir)):
        raise PreflightError(busy)
    if t.metrics_file:
        if os.path.isdir(t.metrics_file):
            raise PreflightError(f"train.metrics_file={t.metrics_file!r} is a directory: give a file path, e.g. "
                                 f"train.metrics_file={os.path.join(t.metrics_file, 'metrics.jsonl')}")
        check_writable_dir(os.path.dirname(os.path.abspath(t.metrics_file)), "the directory of train.metrics_file")
    if t.tensorboard:
        check_writable_dir(t.tensorboard, "train.tensorboard")
    for k, v in (cfg.data.kwargs or {}).items():
        if not _PATH_KEY.search(str(k)):
            continue
        for p in (v if isinstance(v, (list, tuple)) else [v]):
            # a corpus prefix (parallel.corpus: <path>.bin/.idx/.json) counts as existing
            if isinstance(p, str) and p and not os.path.exists(p) and not os.path.exists(p + ".bin"):
                raise PreflightError(f"data.kwargs.{k}={p!r} does not exist (data.factory={cfg.data.factory!r} "
                                     f"reads it): give an existing path")
