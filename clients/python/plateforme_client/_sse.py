"""Server-sent events: an incremental decoder fed one line at a time. No I/O.

Both clients read lines from httpx (`iter_lines` / `aiter_lines`) and feed them here, so the
sync and async streams parse identically. Only the ``data`` field matters for chat streams;
comments (``: keep-alive``) and other fields are skipped; multi-line data is joined with "\\n".
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DONE", "SSEDecoder"]

DONE = "[DONE]"


@dataclass
class SSEDecoder:
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> str | None:
        """Feed one line (without its newline); returns an event's data when one completes."""
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        return None

    def flush(self) -> str | None:
        """The pending event's data, if any (also called at end of stream)."""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data.clear()
        return data
