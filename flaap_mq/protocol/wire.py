"""Protobuf wire format, read and written around one large bytes field.

A model travels as a bytes field of a few hundred megabytes (a Task's
`request`, a TaskResult's `response`, TFF's serialized executor messages).
Every protobuf operation on such a message copies it: building the envelope
copies the payload in, serializing copies it out, parsing copies it in, and
reading the field copies it out again, at about 0.1 s per 64 MiB here. These
helpers keep the payload out of protobuf's hands: `field_head` is what to
write between an already serialized message and the payload (concatenated
protobuf messages merge, so the result parses as one message), and `split_off`
returns a message's other fields and a zero-copy view of the payload.
"""

from __future__ import annotations

from collections.abc import Iterator

Buffer = bytes | memoryview


class WireError(ValueError):
    """Bytes that are not a protobuf message; says why."""


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it; `WireError` if it is cut off."""
    result = shift = 0
    while True:
        if pos >= len(view):
            raise WireError("message ends inside a varint")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


# The envelopes and the TFF requests read here have a dozen top-level fields
# at most. A body of a million tiny fields is no message of ours, and reading
# it field by field would hold the reading thread for seconds: refused early.
MAX_FIELDS = 64


def fields(data: Buffer, max_fields: int = MAX_FIELDS) -> Iterator[tuple[int, int, int, int]]:
    """(field number, field start, value start, field end) of each top-level field.

    Raises `WireError` after `max_fields` fields.
    """
    view = memoryview(data)
    pos = 0
    count = 0
    while pos < len(view):
        count += 1
        if count > max_fields:
            raise WireError(f"more than {max_fields} top-level fields: not a message of ours")
        start = pos
        key, pos = read_varint(view, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == 2:  # length-delimited
            length, pos = read_varint(view, pos)
            value_start, pos = pos, pos + length
        elif wire_type == 0:
            value_start = pos
            _, pos = read_varint(view, pos)
        elif wire_type in (1, 5):
            value_start, pos = pos, pos + (8 if wire_type == 1 else 4)
        else:
            raise WireError(f"field {number} has wire type {wire_type}")
        if pos > len(view):
            raise WireError(f"message ends inside field {number}")
        yield number, start, value_start, pos


def split_off(data: bytes, number: int) -> tuple[bytes, memoryview | None]:
    """The message without field `number` (serialized), and a view of that field's bytes.

    As protobuf does, the last occurrence of the field wins. The view shares
    `data`'s memory; it is None if the field is absent.
    """
    view = memoryview(data)
    kept: list[memoryview] = []
    payload = None
    for field, start, value_start, end in fields(view):
        if field == number:
            payload = view[value_start:end]
        else:
            kept.append(view[start:end])
    return b"".join(kept), payload


def field_head(number: int, size: int) -> bytes:
    """The key and length that come before a `size`-byte bytes (or message) field.

    Written after a serialized message and followed by the payload, they set
    that field (concatenated protobuf messages merge into one).
    """
    return varint(number << 3 | 2) + varint(size)
