"""Stopping loses nothing and leaves nothing behind (issue 17): workers die with their launcher, a
checkpoint directory has one live owner, SIGTERM saves at the next step boundary and the resumed
run equals an uninterrupted one, on_nonfinite=skip has a limit."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT = os.path.join(ROOT, "configs", "gpt_dp2.yaml")
ENV = {**os.environ, "P3D_PEAK_FLOPS": "1e12",
       "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])}


def slow_tokens(delay: float = 0.05, **kw):
    """examples.gpt:random_tokens, ``delay`` seconds per sample: steps slow enough to signal mid-run."""
    from examples.gpt import random_tokens
    ds = random_tokens(**kw)

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            time.sleep(delay)
            return ds[i]
    return Slow()


def _start(tmp, *over, torchrun=False):
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "launch.train", "--config", GPT]
    else:
        cmd = [sys.executable, "-m", "launch", "--config", GPT]
    cmd += ["data.factory=test_stop:slow_tokens", "train.timeout_s=120", *over]
    log = open(os.path.join(tmp, f"launch-{time.monotonic_ns()}.log"), "w+")
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True), log


def _output(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if d.isdigit() and int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d))
        except (OSError, IndexError, ValueError):
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"          # a zombie has exited
    except OSError:
        return False


def _lines(path) -> list:
    try:
        with open(path) as f:
            return [json.loads(s) for s in f if s.endswith("\n")]
    except FileNotFoundError:
        return []


def _wait(cond, limit, what, proc=None, log=None):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < limit, f"{what} not within {limit} s:\n" + (_output(log)[-4000:] if log else "")
        assert proc is None or proc.poll() is None, f"ended early ({proc.returncode}):\n{_output(log)[-4000:]}"
        time.sleep(0.1)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc to find the workers")
@pytest.mark.parametrize("torchrun", [False, pytest.param(True, marks=pytest.mark.slow)],   # torchrun: the slow suite
                         ids=["python -m launch", "torchrun"])
def test_sigkilled_launcher_leaves_no_worker(tmp_path, torchrun):
    m, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    proc, log = _start(str(tmp_path), "train.steps=100000", f"train.metrics_file={m}", f"train.checkpoint.dir={ck}",
                       torchrun=torchrun)
    try:
        _wait(lambda: len(_lines(m)) >= 2, 180, "two steps", proc, log)
        workers = _children(proc.pid)
        assert len(workers) == 2, (workers, _output(log)[-3000:])
        if not torchrun:       # a second job on the same checkpoint directory is refused, naming the owner
            r = subprocess.run([sys.executable, "-m", "launch", "--config", GPT, "train.steps=2",
                                "train.metrics_file=null", f"train.checkpoint.dir={ck}"], cwd=ROOT, env=ENV,
                               timeout=240, capture_output=True, text=True)
            owner = json.loads((ck / "OWNER.json").read_text())
            # refused by the launcher's pre-flight check, before any worker starts: exit 2
            assert r.returncode == 2 and owner["launcher_pid"] == proc.pid, r.stderr[-3000:]
            last = r.stderr.splitlines()[-1]
            assert last.startswith("config error (pre-flight check; no worker was started): ") and \
                f"is in use by job {owner['job']} on host {owner['host']} (launcher pid {proc.pid}, started" in last, \
                r.stderr[-3000:]
            assert len(_lines(m)) >= 3                  # the first job trained on
        proc.send_signal(signal.SIGKILL)
        t0 = time.time()
        while any(_alive(w) for w in workers) and time.time() - t0 < 10:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), f"workers {workers} outlived the launcher by 10 s"
    finally:
        proc.kill()
        proc.wait()
        for w in _children(proc.pid):
            os.kill(w, signal.SIGKILL)


@pytest.mark.slow     # three launches, ~70 s idle: the suite budget
def test_sigterm_saves_at_the_next_step_and_resumes_exactly(tmp_path):
    m, m_ref, ck = tmp_path / "m.jsonl", tmp_path / "ref.jsonl", tmp_path / "ck"
    steps = ["train.steps=16", "data.shuffle=true"]
    proc, log = _start(str(tmp_path), *steps, f"train.metrics_file={m}", f"train.checkpoint.dir={ck}")
    try:
        _wait(lambda: len(_lines(m)) >= 3, 180, "three steps", proc, log)
        done = len(_lines(m))                            # steps finished before the signal
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    out = _output(log)
    assert code == 143, out[-4000:]
    assert time.time() - t0 < 60, out[-4000:]
    names = sorted(os.listdir(ck))
    assert len(names) == 1 and names[0].startswith("step_"), (names, out[-3000:])    # no owner file left
    n = int(names[0][5:])
    assert done <= n <= done + 2, (done, n)             # at most the step in flight is added, none lost
    assert [r["step"] for r in _lines(m)] == list(range(n))
    assert f"rank 0: saved {names[0]} ({ck}/{names[0]}, after step {n - 1}) on SIGTERM; resume with " \
           f"train.resume=true" in out, out[-4000:]
    assert out.strip().splitlines()[-1] == (f"launch: stopped by SIGTERM: the workers saved at their next step "
                                            f"boundary; newest checkpoint: {ck}/{names[0]}; resume with "
                                            f"train.resume=true"), out[-3000:]
    common = list(steps)               # the same data source (the checkpoint's data contract is checked)
    outs = []
    for over in ([f"train.metrics_file={m}", f"train.checkpoint.dir={ck}", "train.resume=true"],
                 [f"train.metrics_file={m_ref}"]):
        r = subprocess.run([sys.executable, "-m", "launch", "--config", GPT, "data.factory=test_stop:slow_tokens",
                            *common, *over], cwd=ROOT, env=ENV, timeout=300, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        outs.append(r.stdout + r.stderr)
    assert f"resumed from {ck}/{names[0]} (step {n}," in outs[0], outs[0][-3000:]
    got, want = _lines(m), _lines(m_ref)
    assert [r["step"] for r in got] == list(range(16)) == [r["step"] for r in want]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]       # exact: fp32, the same layout


# --- the owner file ---------------------------------------------------------------------------------

def test_owner_file_refuses_a_live_owner_and_takes_over_a_stale_one(tmp_path):
    from parallel.checkpoint import owner
    root = str(tmp_path / "ck")
    env = {"TORCHELASTIC_RUN_ID": "job-a"}
    me = owner.acquire(root, environ=env)
    assert me["launcher_pid"] == os.getppid() and me["pid"] == os.getpid()
    assert json.loads(open(os.path.join(root, "OWNER.json")).read()) == me
    assert owner.acquire(root, environ=env)["job"] == "job-a"           # a torchrun restart: the same job
    # another job while this one's launcher (our parent) lives: refused, naming the owner
    with pytest.raises(owner.CheckpointDirOwned) as e:
        owner.acquire(root, environ={"TORCHELASTIC_RUN_ID": "job-b"})
    assert f"is in use by {owner.describe(me)}; its launcher is still running" in str(e.value)
    assert "job job-a on host" in str(e.value) and f"If that job is gone, delete {root}/OWNER.json" in str(e.value)
    # a stale file: its launcher pid is gone (a process that has exited and been reaped)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {**me, "job": "job-old", "launcher_pid": dead.pid, "launcher_start": 1}
    with open(os.path.join(root, "OWNER.json"), "w") as f:
        json.dump(stale, f)
    said = []
    new = owner.acquire(root, report=said.append, environ={"TORCHELASTIC_RUN_ID": "job-b"})
    assert new["job"] == "job-b" and said == [f"train.checkpoint.dir={root!r}: taking over from a stale owner file "
                                               f"left by {owner.describe(stale)}, which is no longer running on "
                                               f"this host"]
    # a reused pid (alive, another start time) is stale too; another host's file is refused
    with open(os.path.join(root, "OWNER.json"), "w") as f:
        json.dump({**stale, "launcher_pid": os.getppid(), "launcher_start": -5}, f)
    assert owner.acquire(root, report=said.append, environ=env)["job"] == "job-a" and len(said) == 2
    with open(os.path.join(root, "OWNER.json"), "w") as f:
        json.dump({**stale, "host": "elsewhere"}, f)
    with pytest.raises(owner.CheckpointDirOwned, match="another host: its processes cannot be checked"):
        owner.acquire(root, environ=env)
    os.remove(os.path.join(root, "OWNER.json"))
    me = owner.acquire(root, environ=env)
    assert not owner.release(root, {**me, "pid": 1}) and owner.release(root, me)      # only its own
    assert os.listdir(root) == []


# --- on_nonfinite=skip: at most train.max_skips skipped steps in a row ----------------------------------

def _skips(rank, world):
    from launch.train import build_dataset, build_model, load_batch
    from parallel.config import load_config
    from parallel.engine import parallelize
    from parallel.mesh import Mesh
    cfg = load_config(GPT, ["train.metrics_file=null", "train.steps=10", "train.on_nonfinite=skip",
                            "train.max_skips=3"]).validate(world)
    engine, ds = parallelize(build_model(cfg), cfg, Mesh(dp=world)), build_dataset(cfg)
    bad = {1, 2, 3, 5, 6, 7, 8}                       # rank 1's forward output is NaN in these steps
    engine.add_callback(lambda phase, step: (lambda t: t * float("nan"))
                        if phase == "forward" and step in bad and rank == 1 else None)
    losses = []
    try:
        for step in range(10):
            losses.append(engine.train_step(load_batch(ds, step, cfg, world, rank)))
    except Exception as e:
        return losses, engine.step_count, f"{type(e).__name__}: {e}"
    return losses, engine.step_count, None


def test_skip_stops_after_max_skips_consecutive_nonfinite_steps():
    from harness import run_ranks

    from parallel.config import ConfigError, load_config
    assert load_config(GPT).train.max_skips == 10
    with pytest.raises(ConfigError, match=r"train.max_skips=-1 must be 0 or more"):
        load_config(GPT, ["train.max_skips=-1"]).validate(2)
    for losses, count, err in run_ranks(_skips, 2):
        # steps 1-3: three skips in a row are allowed (max_skips=3); step 4 trains and resets the count;
        # steps 5-7 are skipped, step 8 would be the fourth in a row: it stops, not counted
        assert [x != x for x in losses] == [False, True, True, True, False, True, True, True], losses
        assert count == 8
        assert err == ("NonFiniteError: step 8: 4 consecutive steps (5..8) had a non-finite loss or gradient and "
                       "were skipped, more than train.max_skips=3 allows (train.on_nonfinite=skip): the run diverged "
                       "or the data is bad. Check the data of global batches 5..8 (dataset positions [40, 72)), lower "
                       "optimizer.lr, or raise train.max_skips"), err


def test_a_save_signal_is_bounded_without_a_step_boundary():
    from parallel.reliability.signals import StopRequest
    exits = []
    stop = StopRequest(["SIGUSR1"], deadline_s=0.5, rank=3, exit_fn=lambda code, text: exits.append((code, text)))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)                                   # the handler runs between two bytecodes
        assert stop.signum == signal.SIGUSR1 and exits == []
        time.sleep(1.0)                                   # no step boundary came: 128 + 10, nothing saved
        assert exits == [(138, "rank 3: SIGUSR1: no step boundary within 0.5 s (train.timeout_s): stopping "
                               "without saving")]
        os.kill(os.getpid(), signal.SIGUSR1)              # a second signal stops at once
        time.sleep(0.1)
        assert exits[-1] == (138, "rank 3: SIGUSR1 again: stopping without saving")
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
