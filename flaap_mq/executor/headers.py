"""The HPACK header blocks of unary gRPC calls (RFC 7541): ours made once, the server's read once.

Every call sends the same headers but its `grpc-timeout`, and the executor
answers every call with the same few. `hpack`'s pure-Python coder spent
about 26 µs of each call on them, on the silo worker's path between two
executor calls (docs/benchmarks.md, eleventh session).

- `RequestHeaders`: our fields go as literals that never enter the dynamic
  table (RFC 7541, 6.2.2), so a block means the same whatever the table
  holds; all but `grpc-timeout` is made once per method.
- `AnswerHeaders`: the server's blocks are decoded by `hpack.Decoder`,
  which must see each one for its dynamic table. A block made only of
  one-byte indexed fields (6.1) leaves the table as it was, so the same
  bytes decode to the same fields for as long as no other block changes it:
  such blocks are kept, and forgotten when any other block is decoded.
"""

from __future__ import annotations

import hpack

# Static table indices (RFC 7541, Appendix A).
_AUTHORITY, _METHOD_POST, _PATH, _SCHEME_HTTP, _CONTENT_TYPE = 1, 3, 4, 6, 31


def _integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """An HPACK integer (5.1) in a `prefix_bits` prefix, the first byte's other bits `flags`."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([flags | value])
    out = bytearray([flags | limit])
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _string(text: str) -> bytes:
    """A string literal (5.2), not Huffman-coded."""
    data = text.encode("ascii")
    return _integer(len(data), 7, 0) + data


def _literal(name: int | str, value: str) -> bytes:
    """A literal field without indexing (6.2.2): by the static table's name, or named."""
    if isinstance(name, int):
        return _integer(name, 4, 0) + _string(value)
    return b"\x00" + _string(name) + _string(value)


class RequestHeaders:
    """The header block of a unary call to `method`, with its timeout (gRPC's form)."""

    def __init__(self, authority: str = "localhost") -> None:
        self._authority = authority
        self._fixed: dict[str, bytes] = {}

    def block(self, method: str, timeout: str | None) -> bytes:
        fixed = self._fixed.get(method)
        if fixed is None:
            fixed = self._fixed[method] = b"".join(
                [
                    _integer(_METHOD_POST, 7, 0x80),  # indexed: ":method: POST"
                    _integer(_SCHEME_HTTP, 7, 0x80),  # indexed: ":scheme: http"
                    _literal(_PATH, method),
                    _literal(_AUTHORITY, self._authority),
                    _literal("te", "trailers"),
                    _literal(_CONTENT_TYPE, "application/grpc"),
                ]
            )
        return fixed if timeout is None else fixed + _literal("grpc-timeout", timeout)


class AnswerHeaders:
    """Decodes the server's header blocks of one connection, in the order they came."""

    def __init__(self) -> None:
        self._decoder = hpack.Decoder()
        self._indexed: dict[bytes, list[tuple[str, str]]] = {}

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        """The block's fields; `hpack.HPACKError` if it cannot be decoded."""
        fields = self._indexed.get(block)
        if fields is not None:
            return fields
        fields = [(str(name), str(value)) for name, value in self._decoder.decode(block)]
        # 0x80 | index, for an index below 127: an indexed field in one byte.
        if block and all(0x80 < byte < 0xFF for byte in block):
            self._indexed[block] = fields
        else:
            self._indexed.clear()  # the table may have changed
        return fields
