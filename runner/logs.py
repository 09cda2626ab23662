"""Caffe-style logging for every verb that runs nets: glog lines (``I0210 13:39:22.381027 25210
solver.cpp:239] …``) to stderr and a log file, the CSV beside it (``iter,seconds,phase,name,value``), the
bridge that routes the data and weight loggers into the same log, and a progress line."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

import numpy as np

from converter.errors import CaffeError


class Log:
    """Caffe's log lines to stderr and a log file; a progress line kept at the bottom of a terminal.

    While ``held`` (the setup), lines are kept back: a setup that fails prints its one-line error and
    nothing else, and creates no log file. :meth:`release` opens the file and writes them out.
    """

    def __init__(self, path: str | None = None, append: bool = False, enabled: bool = True,
                 progress: bool | None = None, held: bool = False):
        self.enabled, self.path, self.append = enabled, path, append
        self.file: TextIO | None = None
        self.held: list[str] | None = [] if held else None
        if not held:
            self._open()
        self.tty = enabled and (sys.stderr.isatty() if progress is None else progress)
        self._progress_shown = False
        self.tid = threading.get_native_id() % 100000

    def _open(self) -> None:
        if self.enabled and self.path:
            try:
                self.file = open(self.path, "a" if self.append else "w", encoding="utf-8")  # noqa: SIM115
            except OSError as e:
                raise CaffeError(f"{self.path}: cannot write the log ({e.strerror})") from None

    def release(self) -> None:
        held, self.held = self.held or [], None
        self._open()
        for text in held:
            self._write(text)

    def line(self, where: str, msg: str, severity: str = "I") -> None:
        if not self.enabled:
            return
        now = time.time()
        lt = time.localtime(now)
        text = (f"{severity}{lt.tm_mon:02d}{lt.tm_mday:02d} {lt.tm_hour:02d}:{lt.tm_min:02d}:{lt.tm_sec:02d}."
                f"{int((now % 1) * 1e6):06d} {self.tid:5d} {where}] {msg}\n")
        if self.held is not None:
            self.held.append(text)
        else:
            self._write(text)

    def _write(self, text: str) -> None:
        if self._progress_shown:
            sys.stderr.write("\r\033[K")
            self._progress_shown = False
        sys.stderr.write(text)
        sys.stderr.flush()
        if self.file:
            try:
                self.file.write(text)
                self.file.flush()
            except OSError as e:  # disk full: one error line, and stop writing the file
                raise _write_error(self, "the log", e) from None

    def progress(self, text: str) -> None:
        if self.tty and self.held is None:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
            self._progress_shown = True

    def close(self) -> None:
        if self._progress_shown:
            sys.stderr.write("\n")
            self._progress_shown = False
        if self.file:
            try:
                self.file.close()
            except OSError as e:
                raise _write_error(self, "the log", e) from None
            self.file = None


def _write_error(owner: Log | Csv, what: str, e: OSError) -> CaffeError:
    """A failed write of the log or the CSV (e.g. a full disk) as one error line; the file is dropped
    (closed without raising again) so that closing the trainer does not fail a second time."""
    file, owner.file = owner.file, None
    with contextlib.suppress(OSError):
        file.close()
    return CaffeError(f"{getattr(owner, 'path', None) or file.name}: cannot write {what} ({e.strerror})")


class LogBridge(logging.Handler):
    """Python ``logging`` records of the data readers and weight loaders (e.g. Caffe's ``Restarting data
    prefetching from start.``, ``Ignoring source layer``) as glog lines of the training log."""

    LOGGERS = ("runner.data", "data_prep", "converter.weights")

    def __init__(self, log: Log):
        super().__init__(logging.INFO)
        self.log = log
        self.saved = []
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self.saved.append((logger, logger.level, logger.propagate))
            logger.addHandler(self)
            logger.setLevel(logging.INFO)
            logger.propagate = False

    def emit(self, record: logging.LogRecord) -> None:
        self.log.line(f"{record.module}.py:{record.lineno}", record.getMessage(), record.levelname[:1])

    def detach(self) -> None:
        for logger, level, propagate in self.saved:
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate
        self.saved = []


@contextlib.contextmanager
def glog_session(log: Log | None = None):
    """A Log (console only unless one is given) with the data and weight loggers bridged into it, for the
    verbs that run nets outside training (test, time); detached (and closed if ours) afterwards."""
    own = log is None
    log = log or Log(None, append=False)
    bridge = LogBridge(log)
    try:
        yield log
    finally:
        bridge.detach()
        if own:
            log.close()


class Csv:
    """One row per number the log prints: ``iter,seconds,phase,name,value``.

    phase ``train`` has ``smoothed_loss`` (the displayed loss), ``lr`` and the train net's outputs by blob
    name; phase ``test<k>`` has test net k's averaged outputs. Values are float32's shortest repr.
    """

    def __init__(self, path: str | None, append: bool, start: float):
        self.file = None
        self.start = start
        if path:
            fresh = not append or not Path(path).exists() or Path(path).stat().st_size == 0
            try:
                self.file = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
            except OSError as e:
                raise CaffeError(f"{path}: cannot write the CSV ({e.strerror})") from None
            if fresh:
                self._do(self.file.write, "iter,seconds,phase,name,value\n")

    def _do(self, fn, *args) -> None:
        try:
            fn(*args)
        except OSError as e:
            raise _write_error(self, "the CSV", e) from None

    def row(self, it: int, phase: str, name: str, value: float) -> None:
        if self.file:
            self._do(self.file.write, f"{it},{time.time() - self.start:.3f},{phase},{name},{np.float32(value)}\n")

    def flush(self) -> None:
        if self.file:
            self._do(self.file.flush)

    def close(self) -> None:
        if self.file:
            self._do(self.file.close)
            self.file = None
