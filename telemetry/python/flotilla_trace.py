#!/usr/bin/env python3
"""Reader for Flotilla fault traces (`*.ftrace`, `*.ftrace.gz`).

A standalone implementation of docs/trace-format.md using only the standard library
(pandas is optional, for `to_dataframe`). It validates everything the Rust reader
(`telemetry/src/trace.rs`) validates and raises `TraceError` (a `ValueError`) naming what
is wrong. I/O errors are raised as the usual `OSError`.

    meta, events = read("run.ftrace")      # dict, list of dicts (raw field values)
    df = to_dataframe("run.ftrace.gz")     # the columns of `flotilla trace export`

Run as a script to print a trace's metadata and its event counts per kind:

    python3 flotilla_trace.py run.ftrace
"""

from __future__ import annotations

import struct
import sys
import zlib
from collections import Counter

__all__ = [
    "read",
    "read_bytes",
    "to_dataframe",
    "kind_name",
    "access_name",
    "decision_name",
    "TraceError",
    "NotATraceError",
    "VersionError",
    "TruncatedError",
    "CorruptError",
    "TooLargeError",
    "COLUMNS",
]

MAGIC = b"FLOTRACE"
VERSION = 3  # the version writers produce
OLDEST_VERSION = 1  # the oldest version readers accept
HEADER_BYTES = 16
BLOCK_HEADER_BYTES = 16
MAX_BLOCK_BYTES = 16 << 20
MAX_TRACE_BYTES = 2 << 30
BLOCK_EVENTS = 16384  # events per block the writers emit (not a reader limit)

BLOCK_META = 1
BLOCK_EVENTS_KIND = 2
BLOCK_END = 3
BLOCK_RUN = 4  # version 2: initial placement, measured costs, outcome
BLOCK_LAYOUT = 5  # version 3: where the image and the stacks are

NONE16 = 0xFFFF

KIND_NAMES = {
    1: "remote_fault",
    2: "page_in",
    3: "page_out",
    4: "vcpu_out",
    5: "vcpu_in",
    6: "invalidate",
    7: "access_sample",
}
ACCESS_NAMES = ("read", "write", "execute")
DECISION_NAMES = ("none", "move_page", "move_vcpu")
FLAG_FORCED = 1
FLAG_HAD_REPLICA = 2
FLAG_DECODED = 4
FLAGS_ALL = 7

# The columns of `flotilla trace export` (telemetry/src/export.rs).
COLUMNS = (
    "t_ns",
    "kind",
    "node",
    "vcpu",
    "page",
    "access",
    "rip",
    "peer",
    "replicas",
    "decision",
    "service_ns",
    "forced",
    "had_replica",
    "decoded",
)

_FILE_HEADER = struct.Struct("<8sHHI")
_BLOCK_HEADER = struct.Struct("<IIII")  # kind, payload_len, crc32, count
# ArchivedEvent: 40 bytes, align 8.
_EVENT = struct.Struct("<QQQIHHHHBBBB")
_EVENT_FIELDS = (
    "t_ns",
    "page",
    "rip",
    "service_ns",
    "vcpu",
    "node",
    "peer",
    "replicas",
    "kind",
    "access",
    "decision",
    "flags",
)
_EVENT_ALIGN = 8
# ArchivedEventBlock: one ArchivedVec (i32 relative offset, u32 length), align 4.
_VEC = struct.Struct("<iI")
_EVENT_BLOCK_ALIGN = 4
# ArchivedMetaRecord: 96 bytes, align 8.
_META = struct.Struct("<QQQIIH2x" + "iI" * 7 + "4x")
_META_ALIGN = 8
_META_TEXT = ("workload", "args", "image", "policy", "transport", "engine_version", "host")
_META_TEXT_AT = 36  # offset of the first ArchivedVec<u8> in the record

# ArchivedRunRecord (version 2): 136 bytes, align 8.
_RUN = struct.Struct("<10QiB3x" + "iI" * 6)
_RUN_ALIGN = 8
_RUN_NUMBERS = (
    "stack_bytes",
    "link_delay_ns",
    "touch_epoch_ns",
    "wall_ns",
    "rtt_4k_ns",
    "install_ns",
    "capture_ns",
    "restore_ns",
    "fault_service_ns",
    "vcpu_move_ns",
    "exit_code",
    "outcome",
)
_RUN_COSTS = _RUN_NUMBERS[4:10]
_RUN_VECS_AT = 88  # offset of the first ArchivedVec in the record
# (name, element size): ram and error are UTF-8 bytes, the rest u16 lists.
_RUN_VECS = (("ram", 1), ("error", 1), ("vcpu_nodes", 2), ("missing_nodes", 2),
             ("cpu_counts", 2), ("cpus", 2))
OUTCOMES = ("completed", "failed")

assert _EVENT.size == 40 and _VEC.size == 8 and _META.size == 96 and _RUN.size == 136


class TraceError(ValueError):
    """A trace could not be read. Subclasses name the class of error."""


class NotATraceError(TraceError):
    pass


class VersionError(TraceError):
    pass


class TruncatedError(TraceError):
    pass


class CorruptError(TraceError):
    pass


class TooLargeError(TraceError):
    pass


def _truncated(what: str) -> TruncatedError:
    return TruncatedError(f"truncated trace: {what}")


def _corrupt(what: str) -> CorruptError:
    return CorruptError(f"corrupt trace: {what}")


def _too_large() -> TooLargeError:
    return TooLargeError(f"trace larger than {MAX_TRACE_BYTES} bytes")


def kind_name(kind: int) -> str:
    return KIND_NAMES.get(kind, "?")


def access_name(access: int) -> str:
    return ACCESS_NAMES[access] if access < len(ACCESS_NAMES) else "?"


def decision_name(decision: int) -> str:
    return DECISION_NAMES[decision] if decision < len(DECISION_NAMES) else "?"


def _gunzip(data: bytes) -> bytes:
    """Decodes every gzip member in turn (like flate2's MultiGzDecoder)."""
    out = b""
    rest = data
    while True:
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            part = d.decompress(rest, MAX_TRACE_BYTES + 1 - len(out))
            if len(out) + len(part) <= MAX_TRACE_BYTES and not d.eof:
                part += d.flush()
        except zlib.error as e:
            raise _corrupt(f"gzip stream: {e}") from None
        out += part
        if len(out) > MAX_TRACE_BYTES:
            raise _too_large()
        if not d.eof:
            raise _corrupt("gzip stream: unexpected end of file")
        rest = d.unused_data
        if not rest:
            return out


def _check_event(e: dict, nodes: int, vcpus: int) -> str | None:
    """Checks an event's enumerated fields against the run's shape (trace.rs check_event)."""
    kind = KIND_NAMES.get(e["kind"])
    if kind is None:
        return f"unknown event kind {e['kind']}"
    if e["node"] >= nodes:
        return f"{kind} event on node {e['node']}, but the run has {nodes} nodes"
    if e["vcpu"] != NONE16 and e["vcpu"] >= vcpus:
        return f"{kind} event of vCPU {e['vcpu']}, but the run has {vcpus} vCPUs"
    if e["peer"] != NONE16 and e["peer"] >= nodes:
        return f"{kind} event names node {e['peer']} as peer, but the run has {nodes} nodes"
    if e["replicas"] != NONE16 and e["replicas"] > nodes:
        return (
            f"{kind} event counts {e['replicas']} copies of a page, "
            f"but the run has {nodes} nodes"
        )
    if e["access"] >= len(ACCESS_NAMES):
        return f"{kind} event has access kind {e['access']}"
    if e["decision"] >= len(DECISION_NAMES):
        return f"{kind} event has decision {e['decision']}"
    if e["flags"] & ~FLAGS_ALL & 0xFF:
        return f"{kind} event has unknown flags {e['flags']:#x}"
    return None


def _claim(payload, field_pos: int, lo: int, hi: int, elem_size: int, align: int, what: str):
    """Follows the ArchivedVec at `field_pos` and checks its target like rkyv's validator:
    the elements must lie in [lo, hi) and be aligned. Returns (start, length, end)."""
    rel, length = _VEC.unpack_from(payload, field_pos)
    start = field_pos + rel
    end = start + length * elem_size
    if start < lo or end > hi:
        raise ValueError(
            f"{what}: {length} elements at offset {start} lie outside bytes {lo}..{hi}"
        )
    if start % align:
        raise ValueError(f"{what}: offset {start} is not aligned to {align}")
    return start, length, end


def _meta_record(payload: bytes) -> dict:
    size = len(payload)
    if size < _META.size:
        raise ValueError(f"{size} bytes, smaller than the {_META.size}-byte root")
    root = size - _META.size
    if root % _META_ALIGN:
        raise ValueError(f"root at offset {root} is not aligned to {_META_ALIGN}")
    v = _META.unpack_from(payload, root)
    meta = {
        "mem_bytes": v[0],
        "seed": v[1],
        "started_unix_ms": v[2],
        "vcpus": v[3],
        "sample_rate": v[4],
        "nodes": v[5],
    }
    texts = {}
    cursor = 0  # rkyv: each vector's bytes lie after the previous one's, before the root
    for i, name in enumerate(_META_TEXT):
        start, _, end = _claim(
            payload, root + _META_TEXT_AT + 8 * i, cursor, root, 1, 1, f"metadata field {name}"
        )
        texts[name] = payload[start:end]
        cursor = end
    return meta, texts


def _run_record(payload: bytes, nodes: int, vcpus: int) -> dict:
    """The run block's record, checked as the Rust reader checks it (`run_meta`)."""
    size = len(payload)
    if size < _RUN.size:
        raise ValueError(f"{size} bytes, smaller than the {_RUN.size}-byte root")
    root = size - _RUN.size
    if root % _RUN_ALIGN:
        raise ValueError(f"root at offset {root} is not aligned to {_RUN_ALIGN}")
    v = _RUN.unpack_from(payload, root)
    raw = dict(zip(_RUN_NUMBERS, v))
    lists = {}
    cursor = 0
    for i, (name, elem) in enumerate(_RUN_VECS):
        start, length, end = _claim(
            payload, root + _RUN_VECS_AT + 8 * i, cursor, root, elem, elem, f"run field {name}"
        )
        chunk = payload[start:end]
        lists[name] = chunk if elem == 1 else list(struct.unpack(f"<{length}H", chunk))
        cursor = end
    return raw, lists


def _run_meta(raw: dict, lists: dict, nodes: int, vcpus: int) -> dict:
    """Raises ValueError with the Rust reader's words for a run record it would reject."""
    if raw["outcome"] >= len(OUTCOMES):
        raise ValueError(f"unknown outcome {raw['outcome']}")
    outcome = OUTCOMES[raw["outcome"]]
    try:
        ram = lists["ram"].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("ram is not UTF-8") from None
    if ram not in ("contiguous", "interleave"):
        raise ValueError(f"RAM layout {ram!r} is neither contiguous nor interleave")
    try:
        error = lists["error"].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("error is not UTF-8") from None
    if (outcome == "failed") == (error == ""):
        raise ValueError("an error text goes with a failed run, and only with one")
    vcpu_nodes = lists["vcpu_nodes"]
    if len(vcpu_nodes) != vcpus:
        raise ValueError(f"{len(vcpu_nodes)} starting nodes for {vcpus} vCPUs")
    for n in vcpu_nodes:
        if n >= nodes:
            raise ValueError(f"a vCPU starts on node {n}, but the run has {nodes} nodes")
    missing = lists["missing_nodes"]
    if any(a >= b for a, b in zip(missing, missing[1:])) or (missing and missing[-1] >= nodes):
        raise ValueError(f"missing nodes {missing} are not distinct nodes of {nodes} in order")
    counts, cpus = lists["cpu_counts"], lists["cpus"]
    if counts and len(counts) != nodes:
        raise ValueError(f"CPU sets for {len(counts)} nodes of {nodes}")
    if sum(counts) != len(cpus):
        raise ValueError(f"CPU sets count {sum(counts)} CPUs but list {len(cpus)}")
    cpu_sets, at = [], 0
    for c in counts:
        cpu_sets.append(cpus[at : at + c])
        at += c
    return {
        "ram": ram,
        "vcpu_nodes": vcpu_nodes,
        "stack_bytes": raw["stack_bytes"],
        "cpu_sets": cpu_sets,
        "link_delay_ns": raw["link_delay_ns"],
        "touch_epoch_ns": raw["touch_epoch_ns"],
        "costs": {k: raw[k] for k in _RUN_COSTS},
        "outcome": outcome,
        "exit_code": raw["exit_code"],
        "error": error,
        "missing_nodes": missing,
        "wall_ns": raw["wall_ns"],
        "layout": None,
    }


def _event_block(payload: bytes):
    size = len(payload)
    if size < _VEC.size:
        raise ValueError(f"{size} bytes, smaller than the {_VEC.size}-byte root")
    root = size - _VEC.size
    if root % _EVENT_BLOCK_ALIGN:
        raise ValueError(f"root at offset {root} is not aligned to {_EVENT_BLOCK_ALIGN}")
    start, n, end = _claim(payload, root, 0, root, _EVENT.size, _EVENT_ALIGN, "events")
    return start, n, end


def read_bytes(data: bytes) -> tuple[dict, list[dict]]:
    """Reads and validates a trace held in memory (gzip-compressed or not)."""
    if bytes(data[:2]) == b"\x1f\x8b":
        data = _gunzip(data)
    return _parse(bytes(data))


def read(path) -> tuple[dict, list[dict]]:
    """Reads and validates a whole trace file (gzip-compressed or not).

    Returns (meta, events): `meta` has the keys workload, args, image, policy, transport,
    engine_version, host (str) and nodes, vcpus, mem_bytes, seed, started_unix_ms,
    sample_rate (int), and run: None for a version 1 file, else a dict with ram,
    vcpu_nodes, stack_bytes, cpu_sets, link_delay_ns, touch_epoch_ns, costs (a dict of
    medians in ns), outcome ("completed" or "failed"), exit_code, error, missing_nodes,
    wall_ns; each event is a dict of the raw fields t_ns, page, rip, service_ns,
    vcpu, node, peer, replicas, kind, access, decision, flags (int; 0xFFFF = none).
    """
    with open(path, "rb") as f:
        data = f.read(MAX_TRACE_BYTES + 1)
    if len(data) > MAX_TRACE_BYTES:
        raise _too_large()
    return read_bytes(data)


def _parse(data: bytes) -> tuple[dict, list[dict]]:
    n = len(data)
    if n < 8 or data[:8] != MAGIC:
        if n < 8 and MAGIC.startswith(data):
            raise _truncated(f"{n} bytes, shorter than the file header")
        raise NotATraceError('not a Flotilla trace (the file does not start with "FLOTRACE")')
    if n < HEADER_BYTES:
        raise _truncated(f"{n} bytes, shorter than the file header")
    _, version, header_len, reserved = _FILE_HEADER.unpack_from(data, 0)
    if not OLDEST_VERSION <= version <= VERSION:
        raise VersionError(
            f"trace format version {version}; this build reads versions {OLDEST_VERSION} to {VERSION}"
        )
    if header_len != HEADER_BYTES or reserved != 0:
        raise _corrupt("file header: bad header length or reserved bytes")

    at = HEADER_BYTES
    meta: dict | None = None
    events: list[dict] = []
    index = 0
    while True:
        if at == n:
            raise _truncated(
                f"no end block after {index} blocks ({len(events)} events): "
                "the recording was cut short"
            )
        if n - at < BLOCK_HEADER_BYTES:
            raise _truncated(f"block {index} at byte {at}: header cut off")
        kind, length, crc, count = _BLOCK_HEADER.unpack_from(data, at)

        def corrupt(what: str, index=index, at=at) -> CorruptError:
            return _corrupt(f"block {index} at byte {at}: {what}")

        if (
            not BLOCK_META <= kind <= BLOCK_LAYOUT
            or (kind == BLOCK_RUN and version < 2)
            or (kind == BLOCK_LAYOUT and version < 3)
        ):
            raise corrupt(f"unknown block kind {kind}")
        if length > MAX_BLOCK_BYTES:
            raise corrupt(f"payload of {length} bytes exceeds {MAX_BLOCK_BYTES}")
        start = at + BLOCK_HEADER_BYTES
        padded = (length + 15) // 16 * 16
        if n - start < padded:
            raise _truncated(
                f"block {index} at byte {at}: payload of {length} bytes cut off after "
                f"{n - start}"
            )
        payload = data[start : start + length]
        if zlib.crc32(payload) != crc:
            raise corrupt("checksum mismatch")
        if any(data[start + length : start + padded]):
            raise corrupt("non-zero padding")

        if kind == BLOCK_META:
            if meta is not None:
                raise corrupt("a second metadata block")
            try:
                m, texts = _meta_record(payload)
            except ValueError as e:
                raise corrupt(f"metadata archive: {e}") from None
            for name in _META_TEXT:
                try:
                    m[name] = texts[name].decode("utf-8")
                except UnicodeDecodeError:
                    raise _corrupt(f"metadata field {name} is not UTF-8") from None
            if m["nodes"] == 0 or m["vcpus"] == 0:
                raise corrupt(f"metadata says {m['nodes']} nodes and {m['vcpus']} vCPUs")
            meta = {k: m[k] for k in (*_META_TEXT, "nodes", "vcpus", "mem_bytes", "seed",
                                      "started_unix_ms", "sample_rate")}
            meta["run"] = None
        elif meta is None:
            raise corrupt("the first block is not the metadata")
        elif kind == BLOCK_RUN:
            if index != 1:
                raise corrupt("the run block is not the second block")
            try:
                raw, lists = _run_record(payload, meta["nodes"], meta["vcpus"])
            except ValueError as e:
                raise corrupt(f"run archive: {e}") from None
            try:
                meta["run"] = _run_meta(raw, lists, meta["nodes"], meta["vcpus"])
            except ValueError as e:
                raise corrupt(f"run metadata: {e}") from None
        elif version >= 2 and index == 1:
            raise corrupt("the second block is not the run block")
        elif kind == BLOCK_LAYOUT:
            if index != 2:
                raise corrupt("the layout block is not the third block")
            if len(payload) < 24:
                raise corrupt(f"layout archive: {len(payload)} bytes, smaller than its 24-byte root")
            first, end, stacks = struct.unpack_from("<QQQ", payload, len(payload) - 24)
            pages = meta["mem_bytes"] // 4096
            if first > end or end > pages or stacks > pages or (stacks != 0 and stacks < end):
                raise corrupt(
                    f"layout: image pages {first:#x}..{end:#x} and stacks from {stacks:#x} "
                    f"do not fit {pages:#x} pages in order"
                )
            if meta["run"] is not None:
                meta["run"]["layout"] = (
                    None if (first, end, stacks) == (0, 0, 0)
                    else {"image_pages": (first, end), "stacks_first_page": stacks}
                )
        elif version >= 3 and index == 2:
            raise corrupt("the third block is not the layout block")
        elif kind == BLOCK_EVENTS_KIND:
            try:
                first, held, end = _event_block(payload)
            except ValueError as e:
                raise corrupt(f"event archive: {e}") from None
            if held != count:
                raise corrupt(f"header counts {count} events, the archive holds {held}")
            nodes, vcpus = meta["nodes"], meta["vcpus"]
            for i, values in enumerate(_EVENT.iter_unpack(payload[first:end])):
                e = dict(zip(_EVENT_FIELDS, values))
                bad = _check_event(e, nodes, vcpus)
                if bad is not None:
                    raise corrupt(f"event {i}: {bad}")
                events.append(e)
        else:  # the end block
            if length != 0:
                raise corrupt("the end block has a payload")
            if count != len(events):
                raise corrupt(
                    f"the end block counts {count} events; the blocks before it hold "
                    f"{len(events)}"
                )
            if start + padded != n:
                raise corrupt(f"{n - start - padded} bytes after the end block")
            return meta, events
        at = start + padded
        index += 1


def _opt(v: int) -> int:
    return -1 if v == NONE16 else v


def to_dataframe(path):
    """The trace at `path` as a pandas DataFrame with the columns of `flotilla trace export`
    (COLUMNS): kind/access/decision as names, vcpu/peer/replicas -1 where not applicable,
    forced/had_replica/decoded 0 or 1. The metadata is in `df.attrs["meta"]`."""
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError("to_dataframe needs pandas (pip install pandas)") from e
    meta, events = read(path)
    cols = {
        "t_ns": [e["t_ns"] for e in events],
        "kind": [KIND_NAMES[e["kind"]] for e in events],
        "node": [e["node"] for e in events],
        "vcpu": [_opt(e["vcpu"]) for e in events],
        "page": [e["page"] for e in events],
        "access": [ACCESS_NAMES[e["access"]] for e in events],
        "rip": [e["rip"] for e in events],
        "peer": [_opt(e["peer"]) for e in events],
        "replicas": [_opt(e["replicas"]) for e in events],
        "decision": [DECISION_NAMES[e["decision"]] for e in events],
        "service_ns": [e["service_ns"] for e in events],
        "forced": [int(bool(e["flags"] & FLAG_FORCED)) for e in events],
        "had_replica": [int(bool(e["flags"] & FLAG_HAD_REPLICA)) for e in events],
        "decoded": [int(bool(e["flags"] & FLAG_DECODED)) for e in events],
    }
    dtypes = {
        "t_ns": "uint64",
        "kind": "object",
        "node": "int32",
        "vcpu": "int32",
        "page": "uint64",
        "access": "object",
        "rip": "uint64",
        "peer": "int32",
        "replicas": "int32",
        "decision": "object",
        "service_ns": "int64",
        "forced": "int32",
        "had_replica": "int32",
        "decoded": "int32",
    }
    df = pd.DataFrame({c: pd.Series(cols[c], dtype=dtypes[c]) for c in COLUMNS})
    df.attrs["meta"] = meta
    return df


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} TRACE[.gz]", file=sys.stderr)
        return 2
    try:
        meta, events = read(argv[1])
    except (TraceError, OSError) as e:
        print(f"{argv[1]}: {e}", file=sys.stderr)
        return 1
    width = max(len(k) for k in meta)
    for k, v in meta.items():
        print(f"{k:<{width}}  {v}")
    print(f"{'events':<{width}}  {len(events)}")
    counts = Counter(KIND_NAMES[e["kind"]] for e in events)
    for name in sorted(counts):
        print(f"  {name:<{width - 2}}  {counts[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
