"""Record batches no well-behaved client writes, sent with Kafka's own protocol (Produce v3,
record batch v2): a batch whose compression attribute covers bytes that do not decompress,
one whose record is cut short. The broker takes them as they come; the Kafka client cannot
hand over any of their messages."""

from __future__ import annotations

import socket
import struct
import time

GZIP = 1


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def undecodable_batch(records: int) -> bytes:
    """A batch of `records` offsets, said to be gzip-compressed, whose payload is not gzip."""
    return _batch(GZIP, records, b"\x1f\x8bnot gzip at all, whatever the header says")


def cut_short_batch() -> bytes:
    """A batch of one record whose last three bytes are missing: the Kafka client takes it
    for a message it has not received whole, and asks for more, silently, for ever."""
    return _batch(0, 1, _record(b"k", b"x" * 20)[:-3])


def unknown_format_batch(key: bytes, value: bytes) -> bytes:
    """A batch of one record under a format (magic byte) no Kafka client knows yet."""
    return _batch(0, 1, _record(key, value), magic=3)


def batch_with_header(key: bytes, value: bytes, name: bytes, header: bytes) -> bytes:
    """A batch of one record with one header whose name is any bytes: Kafka's protocol has
    them as bytes, the Kafka client as text."""
    return _batch(0, 1, _record(key, value, ((name, header),)))


def out_of_order_batch(records: list[tuple[bytes, bytes]]) -> bytes:
    """A batch whose records list their offsets backwards (the last first): its header
    counts them and ends at the largest, as a well-formed one does. Apache Kafka refuses
    it; a broker that does not check what producers write keeps it as it comes."""
    payload = b"".join(_record(key, value, delta=len(records) - 1 - at)
                       for at, (key, value) in enumerate(records))
    return _batch(0, len(records), payload)


def _record(key: bytes, value: bytes, headers: tuple[tuple[bytes, bytes], ...] = (), *,
            delta: int = 0) -> bytes:
    body = b"\x00" + _varint(0) + _varint(delta)  # attributes, timestamp and offset deltas
    body += _varint(len(key)) + key + _varint(len(value)) + value + _varint(len(headers))
    for name, header in headers:
        body += _varint(len(name)) + name + _varint(len(header)) + header
    return _varint(len(body)) + body


def _batch(attributes: int, records: int, payload: bytes, magic: int = 2) -> bytes:
    now = int(time.time() * 1000)
    after_crc = struct.pack(">hiqqqhii", attributes, records - 1, now, now, -1, -1, -1,
                            records) + payload
    after_length = struct.pack(">ibI", 0, magic, crc32c(after_crc)) + after_crc
    return struct.pack(">qi", 0, len(after_length)) + after_length


def _varint(number: int) -> bytes:
    zigzag = (number << 1) ^ (number >> 63)
    out = bytearray()
    while zigzag > 0x7F:
        out.append((zigzag & 0x7F) | 0x80)
        zigzag >>= 7
    out.append(zigzag)
    return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">h", len(raw)) + raw


def produce_batch(bootstrap: str, topic: str, partition: int, batch: bytes) -> int:
    """Append `batch` to the partition; its first offset."""
    host, port = bootstrap.rsplit(":", 1)
    request = struct.pack(">hhi", 0, 3, 1) + _string("raw-kafka")  # Produce v3, header v1
    request += struct.pack(">h", -1)  # no transactional id
    request += struct.pack(">hi", -1, 10_000)  # acks from all, timeout
    request += struct.pack(">i", 1) + _string(topic)
    request += struct.pack(">ii", 1, partition) + struct.pack(">i", len(batch)) + batch
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(struct.pack(">i", len(request)) + request)
        size = struct.unpack(">i", _read(connection, 4))[0]
        response = _read(connection, size)
    at = 4 + 4  # correlation id, one topic
    at += 2 + struct.unpack_from(">h", response, at)[0] + 4  # its name, one partition
    _index, error, offset = struct.unpack_from(">ihq", response, at)
    if error:
        raise AssertionError(f"the broker refused the batch: error {error}")
    return int(offset)


def _read(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return data
