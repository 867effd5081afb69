"""How log lines look on a terminal (conf/hydra/default.yaml's console formatter)."""

from __future__ import annotations

import logging


class ConsoleFormatter(logging.Formatter):
    """``[20:21:16] message``: the time of day and the message, and ``warning:`` / ``error:``
    before a message at those levels (the run's log file keeps the date, module and level)."""

    def __init__(self) -> None:
        super().__init__("[%(asctime)s] %(message)s", datefmt="%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        text = super().formatMessage(record)
        if record.levelno >= logging.WARNING:
            stamp, _, message = text.partition("] ")
            text = f"{stamp}] {record.levelname.lower()}: {message}"
        return text
