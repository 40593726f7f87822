"""Run-directory persistence: the settings check, the decision log, the checkpoint, the task.

A run directory holds checkpoint.json (settings, status, decisions so far, cost so far),
decisions.jsonl (one line per scored candidate, appended as it is decided) and task.json
(the exact prompts). Every decision is flushed as it is written and the checkpoint is
replaced atomically, so a killed run started again with the same directory replays its
decisions and ends in the same circuit. Only this module reads or writes those three files.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import __version__
from ..io import atomic_write_text

CHECKPOINT_SCHEMA = "circuitsearch.checkpoint/1"
CHECKPOINT_EVERY = 25


class RunDirError(ValueError):
    """The run directory cannot be used as asked (another run's settings, damaged files)."""


LOCK_FILE = ".lock"


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), to tell it from a later
    process that reuses its pid; None where /proc is not there or the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the process a lock file names still runs (on this host; another host's cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = holder.get("started")
    return started is None or _process_start(pid) in (None, started)


class RunLock:
    """The run directory's lock, held by the live process from start to end.

    An exclusive flock on `DIR/.lock` (the kernel releases it when the process dies, also on
    kill -9), and in the file who holds it: pid, host, process start time, since when. A second
    run on the directory gets a RunDirError naming that pid. Where flock is not honoured, a
    holder still alive by pid and host also refuses the directory; a dead holder's lock is stale.
    """

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self._fd: int | None = None

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def _busy(self, holder: dict) -> RunDirError:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
        return RunDirError(f"{self.path.parent} is in use by pid {holder.get('pid', '?')} on "
                           f"{holder.get('host', '?')} (running since {since}): wait for that run to finish, "
                           "stop it, or choose another --out")

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise self._busy(self.holder()) from None
            raise
        holder = self.holder()
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid()),
              "since": time.time()}
        if holder and holder.get("pid") != me["pid"] and holder.get("released") is None and _alive(holder):
            os.close(fd)  # flock not honoured here (some network file systems) and its holder still runs
            raise self._busy(holder)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Release the lock; the file stays (unlinking a lock file races with a process opening it)."""
        if self._fd is None:
            return
        try:
            holder = self.holder()
            holder["released"] = time.time()
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(holder).encode(), 0)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


DECISION_KEYS = ("phase", "pass", "candidate", "before", "score", "faithfulness", "removed")


def read_log(path: Path) -> tuple[list[dict], str | None]:
    """The decisions of a log up to its first line that is not one, and a note saying what was
    dropped after it (None when the log is whole). A last line cut short by a kill is expected."""
    path = Path(path)
    if not path.exists():
        return [], None
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    out = []
    for i, line in enumerate(lines):
        try:
            d = json.loads(line)
            ok = isinstance(d, dict) and all(k in d for k in DECISION_KEYS)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            rest = len(lines) - i - 1
            if rest == 0:
                return out, "decisions.jsonl: its last line was cut short (a kill while writing it); dropped"
            return out, (f"decisions.jsonl is damaged at line {i + 1} ({line[:40]!r} is not a decision): "
                         f"that line and the {rest} after it were dropped and are recomputed")
        out.append(d)
    return out, None


def read_decisions(path: Path) -> list[dict]:
    """The complete decisions of a log (see read_log)."""
    return read_log(path)[0]


def read_checkpoint(out: Path) -> dict | None:
    """checkpoint.json of `out`, or None where there is none; RunDirError if it is damaged."""
    ck = Path(out) / "checkpoint.json"
    if not ck.exists():
        return None
    try:
        data = json.loads(ck.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{ck} is damaged ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise RunDirError(f"{ck} is damaged (it holds no settings)")
    return data


def saved_config(out: Path) -> dict | None:
    """The settings in `out`'s checkpoint, or None where there are none (no checkpoint, or a damaged one,
    which prepare reports)."""
    try:
        ck = read_checkpoint(out)
    except RunDirError:
        return None
    return ck["config"] if ck is not None else None


def check_settings(out: Path, config: dict, checkpoint: dict | None) -> None:
    """RunDirError naming every setting that differs when `out` holds a run of other settings."""
    if checkpoint is None:
        return
    old = checkpoint.get("config") or {}
    if old == config:
        return
    diff = [f"{k}: {old.get(k)!r} there, {config.get(k)!r} now" for k in dict.fromkeys([*config, *old])
            if old.get(k) != config.get(k)]
    raise RunDirError(f"{out} holds a run with other settings ({'; '.join(diff)}); "
                      "choose another --out, or remove the directory to start again")


@dataclass
class Prepared:
    """What a run directory holds for the run about to start in it."""

    decisions: list            # logged decisions to replay
    earlier: dict              # what earlier sessions spent (from the checkpoint)
    notes: list                # what was damaged and recovered, for the output and the report
    trusted: bool = True       # False: the checkpoint was lost, so the log's settings are unverified


def open_dir(out: Path) -> RunLock:
    """Create `out` if needed and lock it for this process; RunDirError for a path that cannot be one."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory: give a directory for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
        return RunLock(out).acquire()
    except OSError as e:
        raise RunDirError(f"cannot create or write the run directory {out}: {e.strerror}; "
                          "choose another --out") from None


def prepare(out: Path, config: dict, holds: tuple[str, ...] = ("circuit.json",)) -> Prepared:
    """Make the (locked) directory `out` ready for a run of `config`, settings first.

    A directory without decisions (and none of `holds`) holds nothing of value: whatever a failed
    start left there is cleared, so it never blocks the next start. Otherwise the settings must
    match the checkpoint's; a damaged checkpoint is rebuilt from the log, whose decisions are then
    checked one by one as they replay. The log keeps its complete prefix only.
    """
    out = Path(out)
    decisions, log_note = read_log(out / "decisions.jsonl")
    notes = [log_note] if log_note else []
    try:
        old, damage = read_checkpoint(out), None
    except RunDirError as e:
        old, damage = None, str(e)
    if not decisions and not any((out / f).exists() for f in holds):
        if old is None or old.get("config") != config:
            (out / "task.json").unlink(missing_ok=True)  # another start's prompts
        (out / "decisions.jsonl").unlink(missing_ok=True)
        write_checkpoint(out, "starting", config)
        return Prepared([], {}, notes)
    if old is None:
        if not decisions:
            raise RunDirError(f"{out} holds {', '.join(f for f in holds if (out / f).exists())} but no checkpoint or "
                              "decision log, so it cannot be resumed: choose another --out or empty it")
        notes.append(f"{damage or f'{out}/checkpoint.json is missing'}: the settings of the {len(decisions)} logged "
                     "decisions are unknown, so they are replayed under the settings given now and checked one by "
                     "one; checkpoint.json is rewritten")
        trusted = False
    else:
        check_settings(out, config, old)
        trusted = True
    # keep only the complete prefix on disk, so the appended log stays one line per decision
    atomic_write_text(out / "decisions.jsonl", "".join(json.dumps(d) + "\n" for d in decisions))
    return Prepared(decisions, dict(old.get("spent", {})) if (old and decisions) else {}, notes, trusted)


def write_checkpoint(out: Path, status: str, config: dict, **extra) -> None:
    atomic_write_text(Path(out) / "checkpoint.json", json.dumps(
        {"schema": CHECKPOINT_SCHEMA, "status": status, "config": config, "version": __version__, **extra}, indent=1))


def save_task(out: Path, task) -> str:
    """task.json of the run (unless it is there already); returns its text."""
    path = Path(out) / "task.json"
    if path.exists():
        return path.read_text()
    text = json.dumps(task.to_json())
    atomic_write_text(path, text)
    return text


def saved_task(out: Path) -> Path | None:
    """The run's task.json if it has one (a resumed run scores the exact prompts it started with)."""
    path = Path(out) / "task.json"
    return path if path.exists() else None


@dataclass
class DecisionLog:
    """Appends decisions to decisions.jsonl and refreshes checkpoint.json every few decisions.

    Used as a context manager it is closed on every path, and a run that stops by an exception
    leaves a checkpoint saying so ("interrupted" for a kill or Ctrl-C, "failed" otherwise).
    """

    out: Path
    config: dict
    n: int = 0
    phase: str = ""
    started: float = field(default_factory=time.time)
    meter: Callable[[], dict] | None = None  # this session's cost so far (forward passes, seconds)
    earlier: dict = field(default_factory=dict)  # cost of earlier sessions of this run, from the checkpoint

    def __post_init__(self):
        self.out = Path(self.out)
        self._f = open(self.out / "decisions.jsonl", "a")

    def __enter__(self) -> "DecisionLog":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None and not self._f.closed:
            self.close()
            self.checkpoint("interrupted" if issubclass(kind, KeyboardInterrupt) else "failed")
        elif not self._f.closed:
            self.close()

    def record(self, decision) -> None:
        """Append one decision (a search.Decision or its JSON form)."""
        data = decision if isinstance(decision, dict) else decision.to_json()
        self._f.write(json.dumps(data) + "\n")
        self._f.flush()
        self.n += 1
        self.phase = data.get("phase", self.phase)
        if self.n % CHECKPOINT_EVERY == 0:
            os.fsync(self._f.fileno())
            self.checkpoint("running")

    def spent(self) -> dict:
        """Cost of the run over all its sessions: earlier ones (as last checkpointed) plus this one."""
        now = self.meter() if self.meter is not None else {}
        return {k: round(self.earlier.get(k, 0) + now.get(k, 0), 3) for k in {**self.earlier, **now}}

    def checkpoint(self, status: str, extra: dict | None = None) -> None:
        write_checkpoint(self.out, status, self.config, decisions=self.n, phase=self.phase, spent=self.spent(),
                         **(extra or {}))

    def truncate(self, n: int) -> None:
        """Keep the first n decisions of the log (the rest was found damaged); later ones append."""
        self.close()
        lines = (self.out / "decisions.jsonl").read_text().splitlines(keepends=True)[:n]
        atomic_write_text(self.out / "decisions.jsonl", "".join(lines))
        self._f = open(self.out / "decisions.jsonl", "a")
        self.n = n

    def close(self) -> None:
        if not self._f.closed:
            os.fsync(self._f.fileno())
            self._f.close()


class MaskFile:
    """DIR/masks.pt: the optimiser state of a learned-mask search, by phase (algorithms.masks.MaskState),
    written atomically at every checkpoint. A damaged file is said once and ignored: the optimisation is
    deterministic, so it is recomputed and reaches the same circuit."""

    NAME = "masks.pt"

    def __init__(self, out: Path, log=print):
        self.path, self.log = Path(out) / self.NAME, log
        self._states: dict | None = None

    def _read(self) -> dict:
        if self._states is None:
            self._states = {}
            if self.path.exists():
                import torch

                try:
                    data = torch.load(self.path, map_location="cpu", weights_only=True)
                    if not isinstance(data, dict) or not all(isinstance(v, dict) and "theta" in v for v in data.values()):
                        raise ValueError("not a mask state by phase")
                    self._states = data
                except Exception as e:  # any damage: recompute (same result), never trust half a file
                    self.log(f"warning: {self.path} is damaged ({type(e).__name__}: {e}); the mask optimisation "
                             "is recomputed from the start (it is deterministic: same circuit)")
        return self._states

    def load(self, phase: str) -> dict | None:
        return self._read().get(phase)

    def save(self, phase: str, state: dict) -> None:
        import io

        import torch

        from ..io import atomic_write_bytes

        states = self._read()
        states[phase] = state
        buf = io.BytesIO()
        torch.save(states, buf)
        atomic_write_bytes(self.path, buf.getvalue())
