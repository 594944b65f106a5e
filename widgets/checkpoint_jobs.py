"""The dashboard's checkpoint jobs: take, restore and fork, on the worker thread.

Each entry remembers the prompt and steering rule of the generation it was taken from,
so the list can label it, a slider move can continue from the latest checkpoint of the
same prompt, and a fork is compared with a baseline of its own prompt.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Optional

import djinn_nb as dj

from .jobs import SessionDriver
from .state import CheckpointEntry, Settings


class CheckpointJobs:
    """Checkpoints of the main session of a ``SessionDriver``."""

    def __init__(self, driver: SessionDriver):
        self.driver, self.state = driver, driver.state

    def take(self) -> None:
        """Checkpoint the main session now (paused, finished or restored)."""
        t0 = time.perf_counter()
        ck = self.driver.session.checkpoint().wait()
        entry = CheckpointEntry(ck, key=self.driver.session_key, rule=self.driver.session_rule,
                                dispatch_ms=ck.dispatch_ms,
                                ready_ms=(time.perf_counter() - t0) * 1e3)
        self.state.add_checkpoint(entry)
        self.state.say(f"checkpoint {entry.label}: step {ck.step}, {ck.nbytes / 2**20:.2f} MiB, "
                       f"dispatch {ck.dispatch_ms:.2f} ms")

    def restore(self, checkpoint_id: Optional[str]) -> None:
        """Rewind the main session to a checkpoint; Resume / Step continue from it."""
        e = self._entry(checkpoint_id)
        t0 = time.perf_counter()
        self.driver.session.restore(e.checkpoint)
        e.restore_ms = (time.perf_counter() - t0) * 1e3
        self.driver.session_key, self.driver.session_rule = e.key, e.rule
        self.state.end_pause(ready=True, restored=e)
        self.state.emit("latency")
        self.state.say(f"restored {e.label} in {e.restore_ms:.1f} ms")

    def fork(self, checkpoint_id: Optional[str], st: Settings) -> None:
        """A new session from a checkpoint, with the panel's rule, run to the end; compared
        with a baseline of the checkpoint's own prompt."""
        e = self._entry(checkpoint_id)
        if e.key is not None:
            st = replace(st, prompt=e.key[0], max_new_tokens=e.key[1])
        self.driver.ensure_baseline(st)
        f = self.driver.session.fork(e.checkpoint)
        self.driver.forks.append(f)
        self.driver.apply_steering(f, st)
        self.driver.progress_breakpoint(f)
        self.state.start_run(st.max_new_tokens, start=e.checkpoint.step)
        self.state.say(f"fork {f.id} of {e.label} ({st.rule_text()}): generating")
        ev = self.driver.drive(f, f.resume(), interactive=False)
        self.driver.show_steered(ev.result, f"fork of {e.label}", st.prompt)

    def _entry(self, cid: Optional[str]) -> CheckpointEntry:
        if cid is None:
            raise dj.InvalidArgumentError("no checkpoint selected: take one first")
        for e in self.state.checkpoints:
            if e.checkpoint.id == cid:
                return e
        for info in self.driver.client.checkpoints():   # taken outside the dashboard
            if info["id"] == cid:
                e = CheckpointEntry(dj.Checkpoint(self.driver.client, info),
                                    dispatch_ms=info.get("dispatch_ms"))
                self.state.add_checkpoint(e, select=False)
                return e
        raise dj.InvalidArgumentError(f"checkpoint {cid} is not on the server any more")
