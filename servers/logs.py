"""Structured logs: one JSON object per line, card numbers masked.

Loggers pass their fields as `extra={"fields": {...}}`; the formatter writes
them beside the time, level, logger and message. Anything that looks like a
card number (a run of 8 or more digits) is masked to its last four digits
wherever it appears, as a second line of defence behind code that never logs
one on purpose. (Loyalty card numbers are often 11 to 13 digits, EAN-13
barcodes among them: the first-six-last-four of payment cards would leave
only a digit or three, one of them a check digit, hidden.)
"""

import json
import logging
import re
import sys
import time

_DIGITS = re.compile(r"\d{8,}")


def mask(text):
    """`4000001234567899` -> `************7899`: enough to tell cards apart
    in a log, as the hwd masks them too."""
    return _DIGITS.sub(lambda m: "*" * (len(m[0]) - 4) + m[0][-4:], text)


class JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return mask(json.dumps(entry, default=str, ensure_ascii=False))


def configure(level="INFO", stream=None):
    """Kopilka's loggers, and gRPC's (which logs a servicer's exception with
    its traceback), write masked JSON lines to `stream` (stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("kopilka")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    grpc_logger = logging.getLogger("grpc")
    grpc_logger.handlers[:] = [handler]
    number = logging.getLevelName(level) if isinstance(level, str) else level
    grpc_logger.setLevel(max(number, logging.WARNING))   # its INFO is chatter
    grpc_logger.propagate = False
    return handler
