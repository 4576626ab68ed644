"""What a person reads while DermML runs, and where the rest goes.

``dermml demo``, ``dermml pipeline run --local`` and ``dermml train`` print one line per stage
and one per epoch (``training_hooks.epoch_line``), and a progress bar only on a terminal.
Everything else a stage prints (KFP's executor input, Ray's worker and controller logs, MLflow's
messages, tracebacks) goes to ``$DERMML_HOME/logs/<run>/<stage>.log``; the file is also logged
to the stage's MLflow runs as ``logs/<stage>.log`` (``tracking.log_stage_log``), and a stage
that fails prints its path.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
import traceback
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TextIO

from dermml.config import dermml_home

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_EPOCH = re.compile(r"epoch \d+/\d+  train_loss \S+.*$")
"""An epoch line (``training_hooks.epoch_line``), wherever it comes from: a component's output,
or a Ray worker's, behind Ray's ``(RayTrainWorker pid=...)`` prefix."""


def plain(text: str) -> str:
    """``text`` without terminal colour codes."""
    return _ANSI.sub("", text)


def console_line(line: str) -> str | None:
    """The part of a log line a person should see on the console (an epoch line), or None."""
    match = _EPOCH.search(plain(line))
    return match.group(0).rstrip() if match else None


def new_log_dir(name: str) -> Path:
    """A fresh ``$DERMML_HOME/logs/<name>-<time>`` folder for the logs of one run."""
    stamp = datetime.now().strftime("%Y-%m-%d-%H-%M-%S-%f")
    folder = dermml_home() / "logs" / f"{name}-{stamp}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def stage_line(stage: str, ok: bool, seconds: float, width: int = 20) -> str:
    """``  train-model          ok       41.2 s``"""
    return f"  {stage:<{width}} {'ok' if ok else 'FAILED':<6} {seconds:6.1f} s"


class StageLog:
    """One stage's log file; the lines a person should see also go to the console."""

    def __init__(self, path: Path, console: TextIO, indent: str = ""):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self.console, self.indent = console, indent
        self.last_line = ""
        """The last non-blank line: a failed Python stage's exception."""

    def line(self, text: str) -> None:
        text = plain(text).rstrip("\r\n")
        if self.file.closed:  # a stream kept past its capture (colorama's): the console's
            self.console.write(text + "\n")
            return
        self.file.write(text + "\n")
        self.file.flush()
        if text.strip():
            self.last_line = text.strip()
        shown = console_line(text)
        if shown is not None:
            self.console.write(f"{self.indent}{shown}\n")
            self.console.flush()

    def stream(self) -> _Tee:
        """A writable text stream into this log (``print(file=...)``, ``redirect_stdout``)."""
        return _Tee(self)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> StageLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Tee(io.TextIOBase):
    """A text stream over a ``StageLog``: whole lines go to the log (and epoch lines to the
    console); a write with a carriage return is a progress bar, shown on a terminal only."""

    def __init__(self, log: StageLog):
        self.log = log
        self.buffer_ = ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:  # tqdm(disable=None) draws its bar only on a terminal
        try:
            return self.log.console.isatty()
        except (ValueError, OSError):  # the console is closed (interpreter exit)
            return False

    @property
    def encoding(self) -> str:
        return "utf-8"

    def fileno(self) -> int:  # writes to the descriptor still land in the log
        if self.log.file.closed:
            return self.log.console.fileno()
        return self.log.file.fileno()

    def write(self, text: str) -> int:
        if "\r" in text:
            if self.isatty():
                self.log.console.write(text)
                self.log.console.flush()
            return len(text)
        self.buffer_ += text
        while "\n" in self.buffer_:
            line, self.buffer_ = self.buffer_.split("\n", 1)
            self.log.line(line)
        return len(text)

    def flush(self) -> None:
        if not self.log.file.closed:
            self.log.file.flush()

    def close_buffer(self) -> None:
        if self.buffer_:
            self.log.line(self.buffer_)
            self.buffer_ = ""


@contextlib.contextmanager
def captured(stage: str, log_file: Path, console: TextIO | None = None) -> Iterator[StageLog]:
    """Send what this process prints (print, logging, warnings, Ray's forwarded worker logs)
    to ``log_file`` for the duration, the epoch lines still to ``console`` (default: stderr)
    and progress bars too when it is a terminal. Afterwards the console gets one line, with
    the log's path; on failure the log also gets the traceback. The MLflow runs started
    inside (``tracking.stage_run``) get the log as an artifact."""
    from dermml.orchestration import tracking

    console = console or sys.stderr
    log = StageLog(log_file, console)
    tee = log.stream()
    swapped = _swap_handler_streams({sys.stdout, sys.stderr}, tee)
    previous = os.environ.get(tracking.STAGE_LOG_ENV)
    os.environ[tracking.STAGE_LOG_ENV] = str(log.path)
    start = time.monotonic()
    ok = False
    try:
        with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(tee):
            try:
                yield log
                ok = True
            except BaseException:
                tee.close_buffer()
                log.file.write(traceback.format_exc())
                raise
            finally:
                tee.close_buffer()
    finally:
        for handler, stream in swapped.items():
            handler.setStream(stream)
        if previous is None:
            os.environ.pop(tracking.STAGE_LOG_ENV, None)
        else:
            os.environ[tracking.STAGE_LOG_ENV] = previous
        log.close()
        seconds = time.monotonic() - start
        verb = "done in" if ok else "failed after"
        console.write(f"{stage} {verb} {seconds:.1f} s; full log: {log.path}\n")
        console.flush()
        tracking.log_stage_log(str(log.path))


def _swap_handler_streams(streams: set, replacement) -> dict:
    """Point the logging handlers that write to one of ``streams`` (bound to the console
    before this capture began: Ray's, for one) at ``replacement``; returns their old
    streams."""
    import logging

    swapped = {}
    loggers = [logging.getLogger(), *[logger for logger in
                                      logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger)]]
    for logger in loggers:
        for handler in logger.handlers:
            if (type(handler) is logging.StreamHandler and handler not in swapped
                    and any(handler.stream is stream for stream in streams)):
                swapped[handler] = handler.setStream(replacement)
    return swapped
