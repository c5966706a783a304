"""Failures end the job everywhere, promptly, with one clear report; bad input gets a clear error;
diverging collectives are reported, not hung (issue 9)."""
import datetime
import multiprocessing as mp
import os
import re
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
from harness import run_ranks

from parallel.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT = os.path.join(ROOT, "configs", "gpt_dp2.yaml")
QUIET = dict(print_fn=lambda *a, **k: None)


@pytest.fixture(autouse=True)
def faults_on(monkeypatch):
    """Fault injection is honoured only under the test switch (parallel.config.faults.ENABLE_ENV)."""
    monkeypatch.setenv("P3D_ENABLE_FAULTS", "1")


# --- jobs of real processes: `launch.train.main` per rank, no agent to clean up after them --------

_ctx = None


def _context():
    global _ctx
    if _ctx is None:                # a fork server with torch and the trainer imported once
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(["launch.train", "examples.gpt"])
    return _ctx


def _rank_main(rank, world, port, argv, out):
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
                      TORCHELASTIC_RESTART_COUNT="0", P3D_PEAK_FLOPS="1e12", P3D_ENABLE_FAULTS="1",
                      TORCHELASTIC_ERROR_FILE=out + ".error.json")     # the failure record (launch.failures)
    from launch.train import main
    rc = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def run_job(tmp, overrides, world=2, limit=240.0):
    """Start ``world`` ranks of launch.train (the store is hosted here, as torchrun's agent does);
    return exit codes, exit times and outputs. Processes still alive after ``limit`` are killed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    outs = [os.path.join(tmp, f"rank{r}.log") for r in range(world)]
    argv = ["--config", GPT, "train.metrics_file=null", *overrides]
    procs = [_context().Process(target=_rank_main, args=(r, world, port, argv, outs[r])) for r in range(world)]
    for p in procs:
        p.start()
    ends, t0 = {}, time.time()
    while len(ends) < world and time.time() - t0 < limit:
        for r, p in enumerate(procs):
            if r not in ends and p.exitcode is not None:
                ends[r] = time.time()
        time.sleep(0.02)
    hung = [r for r, p in enumerate(procs) if p.exitcode is None]
    for p in procs:
        if p.exitcode is None:
            p.kill()
        p.join(5)
    del store
    texts = [open(o).read() for o in outs]
    assert not hung, f"ranks {hung} still running after {limit} s:\n" + "\n".join(texts)
    return [p.exitcode for p in procs], ends, texts


def ragged_tokens(bad=12, **kwargs):
    """random_tokens with one short sample (dataset index ``bad``)."""
    from examples.gpt import random_tokens
    ds = random_tokens(**kwargs)

    class Ragged(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            x, y = ds[i]
            return (x[:-4], y[:-4]) if i == bad else (x, y)
    return Ragged()


FAULTS = [  # (fault, extra overrides, message on the failing rank)
    ("{rank: 1, step: 2, phase: forward, kind: raise}", [], "InjectedFault: injected fault: raise on rank 1 at step 2"),
    ("{rank: 0, step: 3, phase: backward, kind: kill}", [], None),
    ("{rank: 1, step: 1, phase: optimizer, kind: oom}", [], "OutOfMemoryError: injected fault: oom on rank 1"),
    ("{rank: 0, step: 2, phase: forward, kind: hang}", ["train.timeout_s=12", "train.check_collectives=true"],
     "watchdog: no progress for"),
    ("{rank: 1, step: 3, phase: checkpoint, kind: kill}", [], None),
    pytest.param("{rank: 1, step: 3, phase: checkpoint, kind: kill}", ["train.checkpoint.async=true"], None,
                 marks=pytest.mark.slow, id="async-checkpoint-kill"),   # killed in the background write (issue 25)
    ("{rank: 0, step: 3, phase: checkpoint, kind: enospc}", [],
     "failed: no space left on device. The partial save .tmp-step_00000004 was removed; the previous checkpoint"),
    ("{rank: 1, step: 2, phase: backward, kind: nan}", [],
     "NonFiniteError: step 2: the loss or gradient is non-finite"),
    (None, ["data.factory=test_faults:ragged_tokens"],
     "DataError: step 1: the samples of global batch 1 have different shapes"),
]


def _check_checkpoints(ck, fault):
    from parallel import checkpoint
    done = sorted(n for n in os.listdir(ck) if n.startswith("step_"))
    assert done == ["step_00000002"], done                 # the save after step 3 never completed
    assert checkpoint.latest(ck).endswith("step_00000002")
    meta = checkpoint.read_meta(os.path.join(ck, done[0]))
    full = checkpoint.load_full(os.path.join(ck, done[0]), list(meta["shapes"]), meta)
    assert all(torch.isfinite(t).all() for t in full.values())
    if "checkpoint" in (fault or ""):                      # killed: the interrupted one, ignored by latest();
        assert (".tmp-step_00000004" in os.listdir(ck)) == ("kill" in fault)   # a failed save removes its own


@pytest.mark.parametrize("fault,extra,message", FAULTS, ids=lambda v: str(v)[:40] if isinstance(v, str) else None)
def test_injected_fault_ends_every_rank_promptly(tmp_path, fault, extra, message):
    ck, f = tmp_path / "ck", fault or ""
    # the watchdog is under test only in the hang case; elsewhere a loaded machine must not trip it
    timeout = next((float(o.split("=")[1]) for o in extra if o.startswith("train.timeout_s=")), 120.0)
    over = ["train.steps=5", f"train.timeout_s={timeout:g}", "train.checkpoint.every=2", f"train.checkpoint.dir={ck}",
            *extra] + ([f"train.fault={fault}"] if fault else [])
    codes, ends, texts = run_job(str(tmp_path), over)
    joined = "\n".join(texts)
    assert all(c != 0 for c in codes), (codes, joined)
    if fault:
        r = int(re.search(r"rank: (\d)", f).group(1))
        step, phase = re.search(r"step: (\d), phase: (\w+)", f).groups()
        phase = "optimizer" if "nan" in f else phase           # a NaN gradient is caught before the update
        t_fault = float(re.search(r"injected fault: .* \[unix time ([\d.]+)\]", texts[r]).group(1))
        # every process is gone soon after the fault: at once, or one watchdog period for a hang
        bound = (timeout if "hang" in f else 0) + 15
        assert max(ends.values()) - t_fault < bound, (max(ends.values()) - t_fault, joined)
    else:
        r, step, phase = 1, "1", "data"                        # index 12 is in rank 1's half of global batch 1
    if "kill" in f:
        assert codes[r] == -9
    elif "hang" in f:
        assert codes[r] == 3 and f"at step {step} ({phase})" in texts[r]
        assert "stack of the main thread" in texts[r] and "faults.py" in texts[r]      # where it hangs
        assert "collective fingerprints" in joined
    else:
        assert codes[r] == 1 and f"rank {r} failed at step {step} ({phase})" in texts[r], joined
    if message:
        assert message in texts[r], joined
    # one rank prints a traceback (none for a kill or a hang); the other says in one line why it stops
    tracebacks = sum("Traceback (most recent call last)" in t for t in texts)
    assert tracebacks == (0 if "kill" in f or "hang" in f else 1), joined
    other = texts[1 - r]
    assert "peer failure" in other or "watchdog: no progress" in other or "NonFiniteError" in other, joined
    # the launcher's summary of these exits and records (as torchrun hands them over) names rank r last
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from launch.failures import summarize
    lines, code = summarize({q: ProcessFailure(q, 0, c, os.path.join(tmp_path, f"rank{q}.log.error.json"))
                             for q, c in enumerate(codes)})
    if "kill" in f:
        assert lines[-1].startswith(f"launch: rank {r} was killed by SIGKILL (exit -9)"), lines
    elif "hang" in f:
        assert code == 3 and lines[-1].startswith(f"launch: rank {r} stopped making progress at step {step} "
                                                  f"({phase}) (exit 3): watchdog: no progress for"), lines
    else:                                                      # NaN: every rank raises; either may be first
        who = "[01]" if "nan" in f else str(r)
        assert re.match(rf"launch: rank {who} failed at step {step} \({phase}\) \(exit 1\): \w+: ", lines[-1]), lines
        assert (message or "").split(": ", 1)[-1][:40] in lines[-1], lines
    from parallel import checkpoint
    if int(step) >= 2:                                         # the save after step 1 completed
        _check_checkpoints(str(ck), f)
    else:
        assert checkpoint.latest(str(ck)) is None


# --- bad input: one clear error, on every rank, before or instead of a hang ------------------------

def factory_raises(**kw):
    raise ValueError("no such layer size")


def factory_not_module(**kw):
    return {"weights": 1}


def _bad_inputs(rank, world, tmp):
    from launch.train import run
    from parallel.mesh import Mesh
    mesh = Mesh(dp=world)
    out = {}
    cases = {
        "factory_raises": ["model.factory=test_faults:factory_raises"],
        "not_module": ["model.factory=test_faults:factory_not_module"],
        "short_dataset": ["data.kwargs.n=4"],
        "unwritable": [f"train.checkpoint.dir={tmp}/a_file/ck", "train.checkpoint.every=1"],
        "save_small": [f"train.checkpoint.dir={tmp}/ck", "train.checkpoint.every=1", "train.steps=1"],
        "incompatible": [f"train.checkpoint.dir={tmp}/ck", "train.resume=true", "model.kwargs.n_embd=16"],
    }
    for name, over in cases.items():
        cfg = load_config(GPT, ["train.metrics_file=null", "train.steps=2", *over]).validate(world)
        try:
            run(cfg, mesh, **QUIET)
            out[name] = "ok"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def test_bad_inputs_give_clear_errors(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    for out in run_ranks(_bad_inputs, 2, str(tmp_path)):
        assert out["factory_raises"].startswith("RuntimeError: model.factory 'test_faults:factory_raises' raised "
                                                "ValueError: no such layer size (check model.kwargs=")
        assert out["not_module"] == ("TypeError: model.factory 'test_faults:factory_not_module' returned dict, "
                                     "not an nn.Module")
        assert out["short_dataset"].startswith("ValueError: the dataset has 4 samples, fewer than one global batch "
                                               "(data.global_batch_size=8)")
        assert out["unwritable"].startswith(f"CheckpointError: train.checkpoint.dir='{tmp_path}/a_file/ck' is not "
                                            f"writable") and "choose a directory" in out["unwritable"]
        assert out["save_small"] == "ok"
        assert out["incompatible"].startswith(f"CheckpointError: cannot resume from {tmp_path}/ck/step_00000001: ")
        assert re.search(r"checkpoint tensor 'model/\S+' has shape \(.*32.*\) but this model's is \(.*16.*\)",
                         out["incompatible"])
        assert "'n_embd': 32}}; this job builds {'factory': 'examples.gpt:build', 'kwargs': {" in out["incompatible"]
        assert "Point train.checkpoint.dir at a checkpoint of this model" in out["incompatible"]


def test_fault_config_errors(monkeypatch):
    def err(fault, *more):
        with pytest.raises(ConfigError) as e:
            load_config(GPT, [f"train.fault={fault}", *more]).validate(2)
        return str(e.value)
    assert "train.fault.phase='sideways' is not one of" in err("{rank: 0, step: 1, phase: sideways, kind: raise}")
    assert "train.fault.rank=2 does not exist: the job has 2 ranks" in \
        err("{rank: 2, step: 1, phase: forward, kind: kill}")
    assert "never fires" in err("{rank: 0, step: 2, phase: checkpoint, kind: kill}", "train.checkpoint.every=2",
                                "train.checkpoint.dir=/tmp/x")
    assert "kind=nan applies to phase forward or backward" in err("{rank: 0, step: 1, phase: optimizer, kind: nan}")
    assert "missing ['kind']" in err("{rank: 0, step: 1, phase: forward}")
    assert "train.on_nonfinite='maybe' is not one of ['stop', 'skip']" in str(
        pytest.raises(ConfigError, lambda: load_config(GPT, ["train.on_nonfinite=maybe"]).validate(2)).value)
    from parallel.reliability.faults import FaultSpec, fault_from
    cfg = load_config(GPT).validate(2)
    env = {"P3D_FAULT": "rank=1,step=3,phase=backward,kind=kill", "P3D_ENABLE_FAULTS": "1"}
    assert fault_from(cfg, env) == FaultSpec(1, 3, "backward", "kill")
    # without the test switch: train.fault is a config error naming it; $P3D_FAULT is ignored with a warning
    said = []
    assert fault_from(cfg, {**env, "P3D_ENABLE_FAULTS": ""}, warn=said.append) is None
    assert said == ["warning: $P3D_FAULT='rank=1,step=3,phase=backward,kind=kill' is ignored: fault injection is for "
                    "tests and needs P3D_ENABLE_FAULTS=1; unset P3D_FAULT"]
    monkeypatch.delenv("P3D_ENABLE_FAULTS")
    assert "honoured only in tests, with P3D_ENABLE_FAULTS=1 in the environment: remove train.fault" in \
        err("{rank: 0, step: 1, phase: forward, kind: raise}")


# --- non-finite loss: skip the update, or stop naming the step -----------------------------------

def _nonfinite(rank, world, mode):
    from launch.train import run
    from parallel.mesh import Mesh
    os.environ["P3D_ENABLE_FAULTS"] = "1"                 # the pool's ranks may predate the fixture
    cfg = load_config(GPT, ["train.metrics_file=null", "train.steps=5", f"train.on_nonfinite={mode}",
                            "train.fault={rank: 1, step: 2, phase: forward, kind: nan}"]).validate(world)
    try:
        return run(cfg, Mesh(dp=world), **QUIET)["losses"]
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def test_nonfinite_loss_skip_matches_a_loop_without_that_update():
    from examples.gpt import build, random_tokens
    torch.manual_seed(0)
    model, data = build(vocab_size=64, seq_len=16, n_layer=2, n_head=4, n_embd=32), random_tokens(64, 16, 64, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    want = []
    for t in range(5):
        x, y = torch.utils.data.default_collate([data[i] for i in range(8 * t, 8 * t + 8)])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        want.append(loss.item())
        if t != 2:                                        # the step whose loss was NaN is skipped
            opt.zero_grad()
            loss.backward()
            opt.step()
    for losses in run_ranks(_nonfinite, 2, "skip"):
        assert losses[2] != losses[2]                     # NaN reported for the skipped step
        for t in (0, 1, 3, 4):
            assert abs(losses[t] - want[t]) <= 1e-5 * abs(want[t]), (t, losses, want)
    for msg in run_ranks(_nonfinite, 2, "stop"):
        assert msg.startswith("NonFiniteError: step 2: the loss or gradient is non-finite") and \
            "the update was not applied" in msg and "train.on_nonfinite=skip" in msg


# --- collective divergence: reported with both calls, not hung -----------------------------------

def _diverge(rank, world, mode):
    from parallel import comm
    from parallel.reliability.fingerprint import Checker, CollectiveDivergence, Recorder
    from parallel.reliability.watchdog import Progress, Watchdog, default_store
    five = datetime.timedelta(seconds=5)   # the deadlocked groups give up after 5 s (the pool lives on)
    g = comm.Group(dist.new_group(backend="gloo", timeout=five), "dp", tuple(range(world)), rank, comm.CommStats())
    ctrl = dist.new_group(backend="gloo", timeout=five)
    progress = Progress(rank)
    rec = g.stats.recorder = Recorder(rank, progress)
    progress.checker = Checker(rec, rank, world, pg=ctrl, store=default_store(), wait_s=2.5)
    x = torch.ones(4)
    reports = []
    wd = Watchdog(progress, 1.5 if mode == "skip" else 30, exit_fn=reports.append).start()
    progress.begin_step(0)
    comm.all_reduce(x, g)                                            # both ranks: same call
    try:
        if mode == "site":                                           # same op and shape, other lines
            if rank == 0:
                comm.all_reduce(x, g)                                # LINE rank0-site
            else:
                comm.all_reduce(x, g)                                # LINE rank1-site
        elif mode == "p2p":
            if rank == 0:
                comm.isend(torch.ones(3), 1, g, tag=7)               # never received
        else:                                                        # rank 1 skips the first call
            if rank == 0:
                comm.all_reduce(x, g)                                # LINE skipped-by-rank1
            comm.all_reduce(x, g)                                    # LINE both
        progress.checker.check("at the end of step 0")
        result = "no divergence found"
    except CollectiveDivergence as e:
        result = str(e)
    except RuntimeError as e:                                        # the deadlocked group timed out
        result = f"timed out: {str(e)[:80]}"
    wd.stop()
    return result, (reports[0] if reports else None), wd.fired


def _line(tag):
    src = open(__file__).read().splitlines()
    return next(i + 1 for i, s in enumerate(src) if s.endswith(f"# LINE {tag}"))


def test_divergent_call_site_is_reported_at_the_step_boundary():
    res = run_ranks(_diverge, 2, "site")
    for result, _code, fired in res:
        assert fired is None                                         # caught by the check, no timeout
        assert result.startswith("ranks issued different collectives (checked at the end of step 0")
        assert "dp group [0, 1]: first differing call is #1" in result
        site = "all_reduce on dp [4] float32 at tests/test_faults.py"
        assert f"rank 0: {site}:{_line('rank0-site')} (_diverge)" in result
        assert f"rank 1: {site}:{_line('rank1-site')} (_diverge)" in result


def test_unmatched_send_is_reported():
    for result, _, _ in run_ranks(_diverge, 2, "p2p"):
        assert "p2p 0->1: the two ends disagree" in result
        assert "rank 0 issued send to rank 1 tag 7 [3] float32 on dp at tests/test_faults.py:" in result
        assert "rank 1 posted no matching recv" in result


def test_skipped_collective_is_reported_by_the_watchdog_not_hung():
    t0 = time.monotonic()
    res = run_ranks(_diverge, 2, "skip", timeout=60)
    assert time.monotonic() - t0 < 30
    fired = [f for _, _, f in res]
    assert all(f and "watchdog: no progress for" in f for f in fired), fired
    assert [code for _, code, _ in res] == [3, 3]
    report = next(f for f in fired if "first differing call" in f)
    assert "dp group [0, 1]: first differing call is #1" in report
    site = f"tests/test_faults.py:{_line('skipped-by-rank1')}"
    assert f"rank 0: all_reduce on dp [4] float32 at {site} (_diverge)" in report
    assert f"rank 1: all_reduce on dp [4] float32 at tests/test_faults.py:{_line('both')} (_diverge)" in report
    assert all(r.startswith("timed out") for r, _, _ in res)
