"""The SIF format, in Python: normalise a header to the SIF library's deterministic bytes, and
read an image's labels from its metadata object (no apptainer needed).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from parsl_aurora.errors import ImageError


def labels_from_inspect(json_text: str) -> dict[str, str]:
    """Labels out of `apptainer inspect --json --labels IMAGE`."""
    data = json.loads(json_text)
    return dict(data.get("data", {}).get("attributes", {}).get("labels") or {})



# Layout of SIF 1 (github.com/sylabs/sif, pkg/sif): the header, then DescriptorsTotal
# descriptors of 585 bytes at DescriptorsOffset, little-endian.
SIF_MAGIC = b"SIF_MAGIC\0"
SIF_MAGIC_AT = 32
SIF_ID = slice(48, 64)
SIF_HEADER_TIMES = (64, 72)  # CreatedAt, ModifiedAt (int64 Unix seconds)
SIF_DESCRIPTORS_TOTAL_AT = 88
SIF_DESCRIPTORS_OFFSET_AT = 96
SIF_DESCRIPTOR_SIZE = 585
SIF_DESCRIPTOR_USED_AT = 4
SIF_DESCRIPTOR_TIMES = (41, 49)
SIF_DATATYPE_SIGNATURE = 0x4005
# Apptainer's metadata object: the JSON `apptainer inspect --json` prints (labels included),
# written at build time as a JSON.Generic object named inspect-metadata.json.
SIF_DATATYPE_GENERIC_JSON = 0x4006
SIF_METADATA_NAME = "inspect-metadata.json"
# A descriptor's DataType, Used, ID, GroupID, LinkedID, Offset, Size (Go's rawDescriptor);
# its Name, 128 bytes NUL-padded, is at 73.
SIF_DESCRIPTOR_HEAD = struct.Struct("<i?IIIqq")
SIF_DESCRIPTOR_NAME = slice(73, 201)
# What the SIF library's deterministic mode writes (Apptainer >= 1.5 with SOURCE_DATE_EPOCH):
# uuid.Nil and Go's time.Time{}, whose Unix() is this (0001-01-01T00:00:00Z).
SIF_ZERO_TIME = -62135596800


def sif_header_size(head: bytes) -> int:
    """How many leading bytes of a SIF the header and all its descriptors take."""
    if len(head) < 128 or head[SIF_MAGIC_AT:SIF_MAGIC_AT + len(SIF_MAGIC)] != SIF_MAGIC:
        raise ImageError("not a SIF image (no SIF_MAGIC at byte 32); build it with "
                         "`python -m parsl_aurora.image build`")
    total, offset = (struct.unpack_from("<q", head, at)[0]
                     for at in (SIF_DESCRIPTORS_TOTAL_AT, SIF_DESCRIPTORS_OFFSET_AT))
    return offset + total * SIF_DESCRIPTOR_SIZE


def normalise_sif_header(head: bytes) -> bytes:
    """The header and descriptors with the image ID and every time set as the SIF library's
    deterministic mode sets them, so that the same content gives the same bytes.

    Apptainer 1.4 writes a random ID and the build's clock there. Signatures cover the ID and
    the times: this must run before signing, and refuses an image that is already signed.
    """
    out = bytearray(head[:sif_header_size(head)])
    if len(out) < sif_header_size(head):
        raise ImageError(f"SIF header cut short: {len(out)} of {sif_header_size(head)} bytes")
    out[SIF_ID] = bytes(SIF_ID.stop - SIF_ID.start)
    for at in SIF_HEADER_TIMES:
        struct.pack_into("<q", out, at, SIF_ZERO_TIME)
    total, offset = (struct.unpack_from("<q", out, at)[0]
                     for at in (SIF_DESCRIPTORS_TOTAL_AT, SIF_DESCRIPTORS_OFFSET_AT))
    for i in range(total):
        d = offset + i * SIF_DESCRIPTOR_SIZE
        if not out[d + SIF_DESCRIPTOR_USED_AT]:
            continue
        if struct.unpack_from("<i", out, d)[0] == SIF_DATATYPE_SIGNATURE:
            raise ImageError("the image is signed: normalise it before signing (signatures "
                             "cover the header); rebuild it, then sign")
        for at in SIF_DESCRIPTOR_TIMES:
            struct.pack_into("<q", out, d + at, SIF_ZERO_TIME)
    return bytes(out)


def sif_objects(head: bytes) -> list[tuple[int, str, int, int]]:
    """(data type, name, offset, size) of every object a SIF's header lists as in use."""
    size = sif_header_size(head)
    if len(head) < size:
        raise ImageError(f"SIF header cut short: {len(head)} of {size} bytes")
    total, offset = (struct.unpack_from("<q", head, at)[0]
                     for at in (SIF_DESCRIPTORS_TOTAL_AT, SIF_DESCRIPTORS_OFFSET_AT))
    objects = []
    for i in range(total):
        d = offset + i * SIF_DESCRIPTOR_SIZE
        datatype, used, _, _, _, at, length = SIF_DESCRIPTOR_HEAD.unpack_from(head, d)
        if used:
            name = head[d + SIF_DESCRIPTOR_NAME.start:d + SIF_DESCRIPTOR_NAME.stop]
            objects.append((datatype, name.rstrip(b"\0").decode(errors="replace"), at, length))
    return objects


def metadata_span(head: bytes) -> tuple[int, int] | None:
    """(offset, size) of apptainer's inspect metadata in a SIF, or None when it has none."""
    for datatype, name, at, length in sif_objects(head):
        if datatype == SIF_DATATYPE_GENERIC_JSON and name == SIF_METADATA_NAME:
            return at, length
    return None


# ---------------------------------------------------------------- reading and rewriting files
def sif_labels(path: Path) -> dict[str, str] | None:
    """PATH's labels as `apptainer inspect --labels` shows them, read from the SIF file itself:
    no apptainer needed (a login node has none). None when the image carries no metadata."""
    with open(path, "rb") as f:
        head = f.read(128)
        size = sif_header_size(head)
        head += f.read(size - len(head))
        span = metadata_span(head)
        if span is None:
            return None
        f.seek(span[0])
        data = f.read(span[1])
    try:
        return labels_from_inspect(data.decode())  # the same JSON
    except (UnicodeDecodeError, ValueError, AttributeError) as e:
        raise ImageError(f"{path}: its metadata object ({SIF_METADATA_NAME}) is not the JSON "
                         f"apptainer writes ({e}). Fix: rebuild it with `make image`") from None


def normalise_sif(path: Path) -> None:
    """Rewrite PATH's header in place with normalise_sif_header."""
    with open(path, "r+b") as f:
        size = sif_header_size(f.read(128))
        f.seek(0)
        head = f.read(size)
        f.seek(0)
        f.write(normalise_sif_header(head))


