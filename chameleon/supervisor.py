"""Keeping the processes of a local appliance running: what ``chameleon serve`` and ``chameleon
cluster up`` start is restarted when it exits or stops answering, the way an orchestrator's
restart policy does it for a deployment (docs/deployment.md).

A :class:`Supervisor` watches its children from one thread. A child that exits, does not say it is
ready in time, or goes unheard by the tier for ``silent_limit_s`` (missed heartbeats: hung, not
dead) is restarted after a delay that doubles from ``first_delay_s`` up to ``max_delay_s`` and
comes back to ``first_delay_s`` once the child has run ``healthy_after_s``. One that fails
``max_failures`` times within ``window_s`` (a corrupt shard that fails at every start) is marked
failed and left alone: the rest keeps serving and readiness says why.

Why not supervisord or circus: they restart on exit only (no readiness file, no "the tier does not
hear it"), supervisord's retries count only failures at start with a fixed backoff and it runs as a
daemon of its own with its own configuration and RPC; the children here are already
``subprocess.Popen`` objects of this process, so one thread polling them and the coordinator's view
is all it takes.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("chameleon.supervisor")

TICK_S = 0.2
HEARD_EVERY_S = 1.0  # how often the tier is asked whom it hears


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    healthy_after_s: float = 30.0
    max_failures: int = 5
    window_s: float = 120.0
    start_timeout_s: float = 180.0
    silent_limit_s: float = 15.0


@dataclass
class Child:
    """One supervised process: ``command`` writes ``ready_file`` (JSON) once it serves."""

    name: str
    tier: str  # "retrieval" or "coordinator"
    shard: int | None
    command: list[str]
    log: Path
    ready_file: Path
    process: subprocess.Popen | None = None
    state: str = "starting"  # starting, running, waiting (to restart), failed
    restarts: int = 0
    cause: str | None = None  # why it was last restarted, or why it failed
    ready: dict = field(default_factory=dict)  # what its ready file said
    _since: float = field(default_factory=time.monotonic)  # when it entered its state
    _next_start: float = 0.0
    _delay: float = 0.0
    _failures: deque = field(default_factory=deque)
    _unheard_since: float | None = None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "tier": self.tier,
            "shard": self.shard,
            "state": self.state,
            "restarts": self.restarts,
            "cause": self.cause,
        }


class Supervisor:
    """Keeps ``children`` running (see the module's docstring).

    ``spawn(child)`` starts a child's process (its ready file already removed) and returns it;
    ``changed(child)`` is called after every start, readiness, restart decision and failure (to
    record pids and endpoints); ``unheard()`` names the running children the tier does not hear
    from now (None when that cannot be told)."""

    def __init__(
        self,
        children: list[Child],
        spawn: Callable[[Child], subprocess.Popen],
        changed: Callable[[Child], None] = lambda child: None,
        unheard: Callable[[], set[str] | None] = lambda: None,
        policy: RestartPolicy = RestartPolicy(),
    ):
        self.children = {child.name: child for child in children}
        self.policy = policy
        self._spawn, self._changed, self._unheard = spawn, changed, unheard
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._next_heard = 0.0
        for child in children:
            child._delay = policy.first_delay_s

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Restart nothing from now on (the children keep running: their owner stops them)."""
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def add(self, child: Child) -> None:
        child._delay = self.policy.first_delay_s
        with self._lock:
            self.children[child.name] = child

    def remove(self, name: str) -> None:
        with self._lock:
            self.children.pop(name, None)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [child.describe() for child in self.children.values()]

    def failed(self) -> list[str]:
        """Why each failed child failed, one line each."""
        with self._lock:
            return [f"{c.name} failed: {c.cause}" for c in self.children.values() if c.state == "failed"]

    def _run(self) -> None:
        while not self._stopping.wait(TICK_S):
            try:
                self._tick(time.monotonic())
            except Exception:  # a bug here must not end supervision (nor, through PR_SET_PDEATHSIG, the children)
                log.exception("supervisor: tick failed")

    def _tick(self, now: float) -> None:
        unheard = None
        if now >= self._next_heard:
            unheard = self._unheard()
            self._next_heard = now + HEARD_EVERY_S
        with self._lock:
            children = list(self.children.values())
        for child in children:
            if self._stopping.is_set():
                return
            if child.state == "waiting" and now >= child._next_start:
                self._start(child, now)
            elif child.state in ("starting", "running"):
                self._check(child, now, unheard)

    def _check(self, child: Child, now: float, unheard: set[str] | None) -> None:
        code = child.process.poll()
        if code is not None:
            self._fail(child, now, f"{_exit(code)} {'while starting' if child.state == 'starting' else ''}".strip())
        elif child.state == "starting":
            if child.ready_file.is_file():
                child.ready = json.loads(child.ready_file.read_text())
                child.state, child._since, child._unheard_since = "running", now, None
                self._changed(child)
            elif now - child._since > self.policy.start_timeout_s:
                self._kill(child)
                self._fail(child, now, f"not ready within {self.policy.start_timeout_s:g} s")
        else:
            if unheard is not None:
                child._unheard_since = (child._unheard_since or now) if child.name in unheard else None
            if child._unheard_since is not None and now - child._unheard_since >= self.policy.silent_limit_s:
                self._kill(child)
                self._fail(child, now, f"missed heartbeats for {now - child._unheard_since:.0f} s")
            elif now - child._since >= self.policy.healthy_after_s:
                child._delay = self.policy.first_delay_s

    def _fail(self, child: Child, now: float, cause: str) -> None:
        policy = self.policy
        child._failures.append(now)
        while child._failures and now - child._failures[0] > policy.window_s:
            child._failures.popleft()
        tail = _last_line(child.log)
        if len(child._failures) >= policy.max_failures:
            child.state, child.cause = "failed", f"{cause}, {len(child._failures)} times in {policy.window_s:g} s; last words: {tail}"
            log.error("supervisor: %s (%s) %s; not restarted again (log: %s)", child.name, child.tier, child.cause, child.log)
        else:
            child.state, child.cause, child._next_start = "waiting", cause, now + child._delay
            log.warning(
                "supervisor: %s (%s) %s; restarting it in %g s (log: %s: %s)", child.name, child.tier, cause, child._delay, child.log, tail
            )
            child._delay = min(policy.max_delay_s, child._delay * 2)
        self._changed(child)

    def _start(self, child: Child, now: float) -> None:
        child.ready_file.unlink(missing_ok=True)
        try:
            child.process = self._spawn(child)
        except OSError as e:
            self._fail(child, now, f"could not start: {e}")
            return
        child.restarts += 1
        child.state, child._since, child.ready = "starting", now, {}
        self._changed(child)

    @staticmethod
    def _kill(child: Child) -> None:
        child.process.kill()
        child.process.wait()


def _exit(code: int | str) -> str:
    """How a process ended, from its exit status (or what its handle says in its place)."""
    if isinstance(code, str):
        return code
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _last_line(log_file: Path) -> str:
    """The last non-empty line of a child's log, for the restart message."""
    try:
        with open(log_file, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(empty log)"
