"""Checkpoints in the training loop: the writable-directory check, a save with a clear error, the
resume (verified: parallel.checkpoint.integrity) and the metrics file a resume rewrites.
Re-exported by :mod:`launch.train`, where they were."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time

from parallel import checkpoint
from parallel.checkpoint.integrity import CheckpointError, check_data, data_contract
from parallel.checkpoint.sharded import step_folders, tmp_dir
from parallel.config import Config
from parallel.reliability.faults import restart_attempt
from parallel.reliability.watchdog import is_peer_failure


def check_writable(path: str) -> None:
    """Every rank writes its own shards: fail before training when it cannot."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".p3d-write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        if _disk_full(e):
            where = path
            while not os.path.isdir(where) and os.path.dirname(where) != where:
                where = os.path.dirname(where)
            tmps = sorted(n for n in os.listdir(path) if n.startswith(".tmp-")) if os.path.isdir(path) else []
            left = (f"; it holds partial saves of failed jobs, never checkpoints: {tmps} (remove them)"
                    if tmps else "")
            raise CheckpointError(f"train.checkpoint.dir={path!r}: no space left on device "
                                  f"({shutil.disk_usage(where).free / 2**20:.1f} MiB free){left}: free space on "
                                  "that disk or point train.checkpoint.dir elsewhere") from None
        raise CheckpointError(f"train.checkpoint.dir={path!r} is not writable ({type(e).__name__}: "
                              f"{e.strerror or e}): choose a directory this job can write, or fix its "
                              f"permissions") from None


# torch.save's zip writer on a write that came up short (ENOSPC, EFBIG, a quota): its errno is lost
SHORT_WRITE = re.compile(r"unexpected pos \d+ vs \d+|file write failed|PytorchStreamWriter failed writing")


def _disk_full(exc: BaseException) -> bool | str:
    """True for an OSError of a full disk (ENOSPC, EDQUOT, EFBIG) anywhere in the chain (DCP's per-rank
    ``failures`` included); the message of a short write (a full disk as torch.save reports it: "[enforce fail
    at inline_container.cc:672] . unexpected pos 704 vs 598", no errno) as a string; else False."""
    seen, todo, short = set(), [exc], None
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG):
            return True
        if short is None and not hasattr(e, "failures") and SHORT_WRITE.search(str(e)):   # DCP's wrapper quotes it
            short = f"{type(e).__name__}: {str(e).strip()[:200]}"
        todo += [e.__cause__, e.__context__] + [f[0] for f in getattr(e, "failures", {}).values()]
    return "No space left on device" in str(exc) or short or False


def save_checkpoint(engine, path: str, root: str, extra: dict | None = None) -> str:
    """engine.save with a clear error. A save that fails on this rank removes its ``.tmp-<name>``
    (a crash leaves it, and resume ignores it), so the previous checkpoint stays the one a restart
    resumes from and a full disk is freed again."""
    try:
        return engine.save(path, extra)
    except BaseException as e:                       # DCP's CheckpointException is a BaseException
        if is_peer_failure(e) or not (isinstance(e, (OSError, RuntimeError))
                                      or type(e).__name__ == "CheckpointException"):
            raise
        tmp = tmp_dir(path)
        deadline = time.monotonic() + 5.0            # a peer may still be writing its shards into it
        while True:
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.exists(tmp) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        prev = checkpoint.latest(root)
        full = _disk_full(e)
        cause = ("no space left on device" + (f" (a write came up short: {full})" if isinstance(full, str) else "")
                 if full else f"{type(e).__name__}: {str(e).strip()[:300]}")
        raise CheckpointError(f"writing checkpoint {path} failed: {cause}. The partial save "
                              + (f"is left as {os.path.basename(tmp)} and ignored; " if os.path.exists(tmp) else
                                 f"{os.path.basename(tmp)} was removed; ")
                              + (f"the previous checkpoint {prev} is intact. " if prev else
                                 "there is no earlier checkpoint. ")
                              + f"Free space on the disk of train.checkpoint.dir={root!r} or point it elsewhere") from e


# --- restarts -------------------------------------------------------------------------------------

def truncate_metrics(path: str, step: int) -> None:
    """Keep the metrics lines of steps before ``step`` (a resumed run logs the rest again)."""
    if not path or not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] < step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                pass
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def resume(engine, cfg: Config, rank: int, print_fn, dataset_len: int | None = None) -> None:
    """Load the newest checkpoint when train.resume is set or torchrun restarted us. Verified first
    (parallel.checkpoint.integrity): another model or data contract is refused; a damaged newest
    checkpoint stops the job, or with train.checkpoint.fallback the previous intact one is taken
    (logged). ``.tmp-`` folders (saves that never completed) are not checkpoints and are skipped."""
    ck, attempt = cfg.train.checkpoint, restart_attempt()
    if attempt > 0 and not ck.dir and rank == 0:
        print_fn(f"restart {attempt} (TORCHELASTIC_RESTART_COUNT): train.checkpoint.dir is not set, so nothing to "
                 f"resume from; starting from step 0", flush=True)
    if not (cfg.train.resume or (attempt > 0 and ck.dir)):
        return
    why = f"restart {attempt} (TORCHELASTIC_RESTART_COUNT): " if attempt > 0 else ""
    found, fallback, skipped, reasons = step_folders(ck.dir), ck.fallback, [], []
    if not found:
        if rank == 0:
            print_fn(f"{why}no complete checkpoint in {ck.dir}; starting from step 0", flush=True)
        return
    for path in found:
        try:
            meta = _load_verified(engine, cfg, path, dataset_len)
            break
        except CheckpointError as e:
            if not e.damaged:
                raise
            older = found[found.index(path) + 1:]
            if not fallback:
                raise CheckpointError(f"{e}. train.resume does not skip a damaged checkpoint: repair it or move it "
                                      f"out of train.checkpoint.dir" + (f", or set train.checkpoint.fallback=true to "
                                      f"resume from the previous one ({os.path.basename(older[0])})" if older else
                                      " (there is no earlier checkpoint)"), damaged=True) from e
            skipped.append(os.path.basename(path))
            reasons.append(str(e))
            if rank == 0:
                print_fn(f"{why}{e}; train.checkpoint.fallback=true: trying the previous checkpoint", flush=True)
    else:
        raise CheckpointError(f"no intact checkpoint in {ck.dir}: all of {skipped} are damaged ({'; '.join(reasons)}); "
                              f"repair them, or move them away to start from step 0", damaged=True)
    if rank == 0:
        print_fn(f"{why}resumed from {path} (step {meta['step']}, saved as {meta['layout']})"
                 + (f", skipping the damaged {skipped}" if skipped else ""), flush=True)


def _load_verified(engine, cfg: Config, path: str, dataset_len: int | None) -> dict:
    if not os.path.isfile(os.path.join(path, "meta.json")):
        raise CheckpointError(f"checkpoint {path} is damaged: file meta.json is missing (a save commits its "
                              f"folder only after writing meta.json)", damaged=True)
    meta = checkpoint.read_meta(path)
    if dataset_len is not None:
        check_data(path, meta, data_contract(cfg, dataset_len))
    try:
        return engine.load(path)
    except CheckpointError:
        raise
    except (KeyError, ValueError, FileNotFoundError, RuntimeError) as e:
        if is_peer_failure(e):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        saved = {k: meta.get("model", {}).get(k) for k in ("factory", "kwargs")}
        raise CheckpointError(f"cannot resume from {path}: {msg} (it was saved from model {saved}; this job builds "
                              f"{{'factory': {cfg.model.factory!r}, 'kwargs': {cfg.model.kwargs}}}). Point "
                              f"train.checkpoint.dir at a checkpoint of this model, or at an empty directory") from e
