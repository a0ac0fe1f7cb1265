"""The executor client's HPACK header blocks (`flaap_mq/executor/headers.py`), against `hpack`.

Ours must decode, with any decoder in any state, to exactly the fields a
gRPC call sends; the server's must decode, cache or not, to what a fresh
decoder that sees the same blocks says, while the server's dynamic table
fills, evicts and changes size.
"""

from __future__ import annotations

import random

import hpack
import pytest

from flaap_mq.executor.headers import AnswerHeaders, RequestHeaders

METHOD = "/tensorflow_federated.v0.ExecutorGroup/CreateValue"


def _fields(method: str, timeout: str | None) -> list[tuple[str, str]]:
    fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", method),
        (":authority", "localhost"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
    ]
    return [*fields, ("grpc-timeout", timeout)] if timeout else fields


@pytest.mark.parametrize("timeout", [None, "59999m", "1S"])
@pytest.mark.parametrize("method", [METHOD, "/" + "x" * 300])  # 300: a length past one byte
def test_a_request_block_decodes_to_the_calls_fields(method: str, timeout: str | None) -> None:
    headers = RequestHeaders()
    decoder = hpack.Decoder()
    for _ in range(3):  # the same block each time, and it leaves the table empty
        assert decoder.decode(headers.block(method, timeout)) == _fields(method, timeout)
        assert len(decoder.header_table.dynamic_entries) == 0


def test_answer_blocks_decode_as_a_fresh_decoder_says_while_the_table_changes() -> None:
    server = hpack.Encoder()
    server.header_table_size = 256  # small: entries are evicted as new ones come
    ours, reference = AnswerHeaders(), hpack.Decoder()
    chance = random.Random(7)
    cached = 0
    for n in range(2000):
        if chance.random() < 0.9:  # mostly the same answer, as the executor's
            fields = [(":status", "200"), ("content-type", "application/grpc")]
            if chance.random() < 0.5:
                fields.append(("grpc-status", "0"))
        else:  # now and then something new, which enters the table
            fields = [("grpc-status", str(chance.randrange(17))), ("grpc-message", f"m{n}")]
        if n == 1000:
            server.header_table_size = 64  # a size update, sent in the next block
        block = server.encode(fields)
        cached += all(0x80 < b < 0xFF for b in block)
        expected = [(str(k), str(v)) for k, v in reference.decode(block)]
        assert ours.decode(block) == expected == fields
    assert cached > 1000  # the cache was used, not only filled


def test_the_same_indexed_bytes_after_a_new_entry_name_the_new_entry() -> None:
    """b"\\xbe" is the table's newest entry: a block that adds one changes what it names."""
    server, ours = hpack.Encoder(), AnswerHeaders()
    ours.decode(server.encode([("a", "1")]))  # enters the table
    assert server.encode([("a", "1")]) == b"\xbe"
    assert ours.decode(b"\xbe") == [("a", "1")]
    ours.decode(server.encode([("b", "2")]))  # enters the table: now the newest
    assert server.encode([("b", "2")]) == b"\xbe"
    assert ours.decode(b"\xbe") == [("b", "2")]


def test_an_undecodable_answer_block_raises_hpacks_error() -> None:
    with pytest.raises(hpack.HPACKError):
        AnswerHeaders().decode(b"\xfe")  # index 126: nothing there
