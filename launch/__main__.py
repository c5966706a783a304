"""``python -m launch [--nproc N] --config X.yaml [torchrun flags] [key=value ...]``

Starts the job under torchrun (torch.distributed.run): every torchrun flag (--nnodes, --node-rank,
--rdzv-backend, --rdzv-endpoint, --rdzv-id, --max-restarts, ...) passes through unchanged, and
``key.sub=value`` words become config overrides. Without --nproc the process count is the config's
dp·tp·pp divided by the number of nodes. A single-node job without rendezvous flags runs
``--standalone`` (a free local port, no fixed 29500).

Exit status 2 (config or usage error) comes from here, before any worker starts: a bad flag, an
invalid config, or a failed pre-flight check (:mod:`launch.preflight`: train.steps, factory
imports, checkpoint/metrics directories, zero.offload.nvme_path and its free space, data files).
When workers fail, the last lines name the first failing rank, where it was (setup phase or
step and phase) and its one-line reason, or the signal that killed it (:mod:`launch.failures`);
the exit status is then that rank's 2 or 3, else 1. One exception: ZeRO-3 regions refusing the merged units of a
DeepSpeed file's prefetch bucket run the job once more with zero.unit_mb=0, saying so (:mod:`launch.unmerged`).

Signals: torchrun's agent (in this process) forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT and the
signals of train.save_on_signal (SIGUSR1 by default; ``--signals-to-handle``) to the workers and
waits ``--shutdown-timeout`` seconds (default here 2·train.timeout_s + 30) before SIGKILL; the
workers save at their next step boundary and exit 128 + the signal, and so does the launcher, naming
the newest checkpoint. Killed itself (SIGKILL), it takes its workers along: each has a parent-death
signal (:mod:`parallel.reliability.signals`).
"""
from __future__ import annotations

import argparse
import re
import sys

from torch.distributed import run as elastic_run
from torch.distributed.elastic.multiprocessing.api import SignalException

from launch import preflight
from launch.dry_run import describe
from launch.failures import summarize
from launch.plan import parse_bytes
from launch.unmerged import release_refused_owner, retry_unmerged
from parallel.checkpoint import latest
from parallel.config import ConfigError, load_config
from parallel.config.deepspeed import deepspeed_hint, format_report

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


class UsageError(Exception):
    """A bad command line (exit 2, like argparse's own usage errors)."""


def split_argv(argv: list[str]):
    """Separate our flags, torchrun flags (with their values) and key=value overrides."""
    actions = elastic_run.get_args_parser()._option_string_actions
    ours = argparse.ArgumentParser(prog="python -m launch", add_help=True,
                                   description="Run a parallel3d training job under torchrun.")
    ours.add_argument("--config", required=True, help="YAML config")
    ours.add_argument("--nproc", "--nproc-per-node", "--nproc_per_node", dest="nproc", type=int, default=None,
                      help="processes on this node (default: dp*tp*pp*cp / nnodes); torchrun's spelling is the same "
                      "flag, so the config is checked against it before any worker starts")
    ours.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config to map onto the YAML config")
    ours.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, start nothing")
    ours.add_argument("--memory", default=None, help="with --dry-run: memory per device (e.g. 24GiB); says whether "
                      "the job fits and, if not, the smallest change that does")
    known, rest = ours.parse_known_args(argv)
    torchrun, overrides, i = [], [], 0
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("-"):
            flag = tok.split("=", 1)[0]
            action = actions.get(flag) or actions.get(flag.replace("-", "_"))
            if action is None:
                raise UsageError(f"python -m launch: unknown flag {tok!r} (not ours and not torchrun's; see --help "
                                 f"and python -m torch.distributed.run --help)")
            torchrun.append(tok)
            if "=" not in tok and action.nargs != 0 and i + 1 < len(rest):
                torchrun.append(rest[i + 1])
                i += 1
        elif _OVERRIDE.match(tok):
            overrides.append(tok)
        else:
            raise UsageError(f"python -m launch: unexpected argument {tok!r}; config overrides look like key.sub=value")
        i += 1
    return known, torchrun, overrides


def _flag_value(torchrun: list[str], *names: str):
    for i, tok in enumerate(torchrun):
        for n in names:
            if tok == n and i + 1 < len(torchrun):
                return torchrun[i + 1]
            if tok.startswith(n + "="):
                return tok.split("=", 1)[1]
    return None


def _signal_flags(cfg, torchrun: list[str]) -> list[str]:
    """torchrun forwards the save signals too, and gives the workers time to save (unless told)."""
    given = {t.split("=")[0].replace("_", "-") for t in torchrun}
    out = []
    if "--signals-to-handle" not in given:
        out += ["--signals-to-handle", ",".join(dict.fromkeys(["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT",
                                                                *cfg.train.save_on_signal]))]
    if "--shutdown-timeout" not in given and _torchrun_has("--shutdown-timeout"):     # torchrun >= 2.13
        out += ["--shutdown-timeout", str(int(2 * cfg.train.timeout_s + 30))]
    return out


def _torchrun_has(flag: str) -> bool:
    """Whether this torch's torchrun takes ``flag`` (an older torch's workers get its default grace period)."""
    return flag in elastic_run.get_args_parser()._option_string_actions


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        known, torchrun, overrides = split_argv(argv)
        if known.nproc is not None and known.nproc < 1:    # 0 read as "unset" started the config's count
            raise UsageError(f"python -m launch: --nproc {known.nproc}: give a positive number of processes per "
                             f"node, or leave --nproc out (the config's dp·cp·tp·pp divided by the nodes)")
    except UsageError as e:
        print(f"{e}", file=sys.stderr)
        return 2
    try:
        report: list = []
        cfg = load_config(known.config, overrides, deepspeed=known.deepspeed, report=report)
        if report:
            print(format_report(report, known.deepspeed or "deepspeed: (from the YAML)"), flush=True)
        nnodes = _flag_value(torchrun, "--nnodes")
        nnodes_n = int(str(nnodes).split(":")[-1]) if nnodes else 1
        nproc = known.nproc or max(cfg.world_size // nnodes_n, 1)
        cfg.validate(nproc * nnodes_n)
    except ConfigError as e:
        print(f"config error: {e}{deepspeed_hint(str(e), report)}", file=sys.stderr)
        return 2
    try:                            # a dry run changes nothing on disk: it skips the path checks
        preflight.check_config(cfg)
        preflight.check_imports(cfg)
        if not known.dry_run:
            preflight.check_paths(cfg)
            preflight.check_nvme(cfg, whole_job_here=nnodes_n == 1)
    except ConfigError as e:
        print(f"config error (pre-flight check; no worker was started): {e}{deepspeed_hint(str(e), report)}",
              file=sys.stderr)
        return 2
    if known.memory is not None and not known.dry_run:
        print("python -m launch: --memory goes with --dry-run (it answers whether the job fits)", file=sys.stderr)
        return 2
    if known.dry_run:
        try:
            memory = None if known.memory is None else parse_bytes(known.memory)
        except ValueError as e:
            print(f"python -m launch: {e}", file=sys.stderr)
            return 2
        print(describe(cfg, memory))
        return 0
    args = ["--nproc-per-node", str(nproc)]
    if not any(t.split("=")[0] in ("--nnodes", "--rdzv-endpoint", "--rdzv_endpoint", "--master-addr",
                                   "--master_addr", "--standalone") for t in torchrun):
        args.append("--standalone")
    args += _signal_flags(cfg, torchrun)
    ds = ["--deepspeed", known.deepspeed] if known.deepspeed else []
    args += torchrun + ["-m", "launch.train", "--config", known.config] + ds + overrides
    try:
        try:
            elastic_run.main(args)
        except Exception as e:      # a DeepSpeed prefetch bucket refused by a ZeRO-3 region: once more, unmerged
            why = retry_unmerged(getattr(e, "failures", None) or {}, report, overrides, nnodes_n)
            if why is None:
                raise
            print(why, file=sys.stderr, flush=True)
            release_refused_owner(cfg.train.checkpoint.dir)
            elastic_run.main(args + ["zero.unit_mb=0"])
    except SignalException as e:    # torchrun forwarded it to the workers and waited for them
        sig = int(e.sigval)
        ck = cfg.train.checkpoint.dir
        newest = latest(ck) if ck else None
        what = (f"newest checkpoint: {newest}; resume with train.resume=true" if newest else
                "no checkpoint (train.checkpoint.dir is not set)" if not ck else f"no checkpoint in {ck}")
        saving = e.sigval.name in cfg.train.save_on_signal
        print(f"launch: stopped by {e.sigval.name}: " + ("the workers saved at their next step boundary; "
              if saving else "") + what, file=sys.stderr, flush=True)
        return 128 + sig
    except Exception as e:          # ChildFailedError: name the first failing rank, last
        failures = getattr(e, "failures", None)
        if not failures:
            print(f"launch: job failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}",
                  file=sys.stderr, flush=True)
            return 1
        lines, code = summarize(failures, single_node=nnodes_n == 1)
        sys.stdout.flush()
        print("\n".join(lines), file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
