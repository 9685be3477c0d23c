"""Structural check of a TFLite flatbuffer before a native interpreter sees it.

LiteRT verifies flatbuffers itself, but tflite-runtime 2.14 (the Raspberry Pi OS Bookworm
runtime) builds the model without verifying it and dereferences whatever offsets the bytes hold:
a truncated or damaged model crashes the process. This module walks the buffer the way the
FlatBuffers verifier does, for the parts of the TFLite schema the interpreter reads, and reports
the first offset, table or vector that leaves the buffer. It reads offsets only, never the
weights, so it costs a few milliseconds even for large models.

What it guarantees: every table, vtable, vector and string reachable through the schema fields
below lies inside the buffer, strings are NUL-terminated, operator codes, buffers and tensors are
referenced by in-range indices, and external buffers (``offset``/``size``) lie inside the data.
Builtin-option tables are checked as tables (vtable and inline fields in bounds); their vector
fields are checked for the options that have them.

What it does not guarantee: sound values. A structurally valid model with damaged shapes,
quantization parameters or operator options can still make tflite-runtime 2.14 kernels misbehave
(fuzzing with random bytes changed mid-file crashed it about once in a few thousand models). Such
bytes never reach a device's runtime: the supply chain checks the model's hash before loading.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["TfliteStructureError", "check_tflite_structure"]

_MAX_OBJECTS = 1_000_000

# (kind, argument) per field index. Kinds: "str" string, "vec" vector of scalars (argument:
# element size), "tab" table (argument: table name), "tabs" vector of tables, "union" union value
# (argument: index of its type field), "scalar" (argument: size).
_FieldSpec = tuple[str, object]

_SCHEMA: dict[str, dict[int, _FieldSpec]] = {
    "Model": {
        0: ("scalar", 4),
        1: ("tabs", "OperatorCode"),
        2: ("tabs", "SubGraph"),
        3: ("str", None),
        4: ("tabs", "Buffer"),
        5: ("vec", 4),
        6: ("tabs", "Metadata"),
        7: ("tabs", "SignatureDef"),
    },
    "OperatorCode": {0: ("scalar", 1), 1: ("str", None), 2: ("scalar", 4), 3: ("scalar", 4)},
    "SubGraph": {
        0: ("tabs", "Tensor"),
        1: ("vec", 4),
        2: ("vec", 4),
        3: ("tabs", "Operator"),
        4: ("str", None),
    },
    "Tensor": {
        0: ("vec", 4),
        1: ("scalar", 1),
        2: ("scalar", 4),
        3: ("str", None),
        4: ("tab", "QuantizationParameters"),
        5: ("scalar", 1),
        6: ("tab", "SparsityParameters"),
        7: ("vec", 4),
        8: ("scalar", 1),
        9: ("tabs", "VariantSubType"),
    },
    "QuantizationParameters": {
        0: ("vec", 4),
        1: ("vec", 4),
        2: ("vec", 4),
        3: ("vec", 8),
        4: ("scalar", 1),
        5: ("union", 4),
        6: ("scalar", 4),
    },
    "SparsityParameters": {0: ("vec", 4), 1: ("vec", 4), 2: ("tabs", "DimensionMetadata")},
    "DimensionMetadata": {
        0: ("scalar", 1),
        1: ("scalar", 4),
        2: ("scalar", 1),
        3: ("union", 2),
        4: ("scalar", 1),
        5: ("union", 4),
    },
    "Operator": {
        0: ("scalar", 4),
        1: ("vec", 4),
        2: ("vec", 4),
        3: ("scalar", 1),
        4: ("union", 3),
        5: ("vec", 1),
        6: ("scalar", 1),
        7: ("vec", 1),
        8: ("vec", 4),
        9: ("scalar", 8),
        10: ("scalar", 8),
        11: ("scalar", 1),
        12: ("union", 11),
    },
    "Buffer": {0: ("vec", 1), 1: ("scalar", 8), 2: ("scalar", 8)},
    "Metadata": {0: ("str", None), 1: ("scalar", 4)},
    "SignatureDef": {
        0: ("tabs", "TensorMap"),
        1: ("tabs", "TensorMap"),
        2: ("str", None),
        3: ("str", None),
        4: ("scalar", 4),
    },
    "TensorMap": {0: ("str", None), 1: ("scalar", 4)},
    "VariantSubType": {0: ("vec", 4), 1: ("scalar", 1), 2: ("scalar", 1)},
}

# Union members with vector fields, per (table, union field):
# type id -> {field index: element size}. Other members are checked as plain tables.
_UNION_VECTORS: dict[tuple[str, int], dict[int, dict[int, int]]] = {
    ("Operator", 4): {
        3: {1: 4, 2: 4},  # ConcatEmbeddingsOptions
        17: {0: 4},  # ReshapeOptions.new_shape
        30: {0: 4},  # SqueezeOptions.squeeze_dims
    },
    ("QuantizationParameters", 5): {1: {0: 1}},  # CustomQuantization.custom
    ("DimensionMetadata", 3): {1: {0: 4}, 2: {0: 2}, 3: {0: 1}},  # Int32/Uint16/Uint8Vector
    ("DimensionMetadata", 5): {1: {0: 4}, 2: {0: 2}, 3: {0: 1}},
}


class TfliteStructureError(Exception):
    """The flatbuffer is not a well-formed TFLite model; the message says where."""


@dataclass
class _Table:
    pos: int
    vtable: int
    vtable_size: int
    size: int


class _Walker:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.objects = 0

    def _need(self, pos: int, length: int, what: str) -> None:
        if pos < 0 or length < 0 or pos + length > self.size:
            raise TfliteStructureError(
                f"{what} at byte {pos} (+{length}) lies outside the {self.size}-byte model"
            )

    def u8(self, pos: int) -> int:
        self._need(pos, 1, "byte")
        return self.data[pos]

    def u16(self, pos: int) -> int:
        self._need(pos, 2, "vtable entry")
        value: int = struct.unpack_from("<H", self.data, pos)[0]
        return value

    def u32(self, pos: int) -> int:
        self._need(pos, 4, "reference")
        value: int = struct.unpack_from("<I", self.data, pos)[0]
        return value

    def i32(self, pos: int) -> int:
        self._need(pos, 4, "table header")
        value: int = struct.unpack_from("<i", self.data, pos)[0]
        return value

    def u64(self, pos: int) -> int:
        self._need(pos, 8, "value")
        value: int = struct.unpack_from("<Q", self.data, pos)[0]
        return value

    def table(self, pos: int, name: str) -> _Table:
        self.objects += 1
        if self.objects > _MAX_OBJECTS:
            raise TfliteStructureError(f"more than {_MAX_OBJECTS} tables and vectors")
        self._need(pos, 4, f"{name} table")
        vtable = pos - self.i32(pos)
        self._need(vtable, 4, f"{name} vtable")
        vtable_size = self.u16(vtable)
        size = self.u16(vtable + 2)
        if vtable_size < 4 or vtable_size % 2:
            raise TfliteStructureError(f"{name} vtable at {vtable}: bad size {vtable_size}")
        self._need(vtable, vtable_size, f"{name} vtable")
        if size < 4:
            raise TfliteStructureError(f"{name} table at {pos}: bad size {size}")
        self._need(pos, size, f"{name} table")
        for slot in range(4, vtable_size, 2):
            offset = self.u16(vtable + slot)
            if offset and not 4 <= offset < size:
                raise TfliteStructureError(
                    f"{name} table at {pos}: field {(slot - 4) // 2} at +{offset} is outside "
                    f"its {size} bytes"
                )
        return _Table(pos, vtable, vtable_size, size)

    def field_pos(self, table: _Table, index: int, width: int) -> int | None:
        slot = 4 + 2 * index
        if slot >= table.vtable_size:
            return None
        offset = self.u16(table.vtable + slot)
        if not offset:
            return None
        if offset + width > table.size:
            raise TfliteStructureError(
                f"table at {table.pos}: field {index} (+{offset}, {width} bytes) overruns it"
            )
        return table.pos + offset

    def target(self, table: _Table, index: int) -> int | None:
        pos = self.field_pos(table, index, 4)
        if pos is None:
            return None
        return pos + self.u32(pos)

    def vector(self, pos: int, element_size: int, what: str) -> tuple[int, int]:
        self.objects += 1
        length = self.u32(pos)
        self._need(pos + 4, length * element_size, what)
        return pos + 4, length

    def string(self, pos: int, what: str) -> None:
        start, length = self.vector(pos, 1, what)
        if self.u8(start + length) != 0:
            raise TfliteStructureError(f"{what} at {pos} is not NUL-terminated")

    def int_vector(self, table: _Table, index: int, what: str) -> list[int]:
        pos = self.target(table, index)
        if pos is None:
            return []
        start, length = self.vector(pos, 4, what)
        return [self.i32(start + 4 * i) for i in range(length)]

    def tables(self, table: _Table, index: int, name: str, *, deep: bool = True) -> list[_Table]:
        pos = self.target(table, index)
        if pos is None:
            return []
        start, length = self.vector(pos, 4, f"{name} vector")
        found = []
        for i in range(length):
            slot = start + 4 * i
            target = slot + self.u32(slot)
            found.append(self.walk(target, name) if deep else self.table(target, name))
        return found

    def walk(self, pos: int, name: str) -> _Table:
        table = self.table(pos, name)
        for index, (kind, arg) in _SCHEMA[name].items():
            if kind == "scalar":
                assert isinstance(arg, int)
                self.field_pos(table, index, arg)
            elif kind == "str":
                target = self.target(table, index)
                if target is not None:
                    self.string(target, f"{name} string field {index}")
            elif kind == "vec":
                assert isinstance(arg, int)
                target = self.target(table, index)
                if target is not None:
                    self.vector(target, arg, f"{name} vector field {index}")
            elif kind == "tab":
                assert isinstance(arg, str)
                target = self.target(table, index)
                if target is not None:
                    self.walk(target, arg)
            elif kind == "tabs":
                assert isinstance(arg, str)
                self.tables(table, index, arg)
            else:
                assert isinstance(arg, int)
                self._walk_union(table, index, arg, name)
        return table

    def _walk_union(self, table: _Table, index: int, type_index: int, name: str) -> None:
        type_pos = self.field_pos(table, type_index, 1)
        type_id = self.u8(type_pos) if type_pos is not None else 0
        target = self.target(table, index)
        if target is None or type_id == 0:
            return
        member = self.table(target, f"{name} union member")
        vectors = _UNION_VECTORS.get((name, index), {}).get(type_id, {})
        for field_index, element_size in vectors.items():
            vector_pos = self.target(member, field_index)
            if vector_pos is not None:
                self.vector(vector_pos, element_size, f"{name} union member vector")


def check_tflite_structure(data: bytes) -> None:
    """Raise :class:`TfliteStructureError` unless ``data`` is a structurally sound TFLite model."""
    walker = _Walker(data)
    if len(data) < 8:
        raise TfliteStructureError(f"expected at least 8 bytes, got {len(data)}")
    model = walker.walk(walker.u32(0), "Model")
    operator_codes = walker.tables(model, 1, "OperatorCode", deep=False)
    buffers = walker.tables(model, 4, "Buffer", deep=False)
    subgraphs = walker.tables(model, 2, "SubGraph", deep=False)
    if not subgraphs:
        raise TfliteStructureError("model has no subgraph")
    for buffer in buffers:
        offset_pos = walker.field_pos(buffer, 1, 8)
        size_pos = walker.field_pos(buffer, 2, 8)
        if offset_pos is not None and size_pos is not None:
            offset, size = walker.u64(offset_pos), walker.u64(size_pos)
            if offset > 1 and offset + size > len(data):
                raise TfliteStructureError(
                    f"external buffer at {offset} (+{size} bytes) lies outside the model"
                )
    for number, subgraph in enumerate(subgraphs):
        tensors = walker.tables(subgraph, 0, "Tensor", deep=False)
        for tensor in tensors:
            buffer_pos = walker.field_pos(tensor, 2, 4)
            buffer_index = walker.u32(buffer_pos) if buffer_pos is not None else 0
            if buffer_index >= max(len(buffers), 1):
                raise TfliteStructureError(
                    f"subgraph {number}: tensor refers to buffer {buffer_index}, "
                    f"the model has {len(buffers)}"
                )
        tensor_lists = [
            walker.int_vector(subgraph, 1, "subgraph inputs"),
            walker.int_vector(subgraph, 2, "subgraph outputs"),
        ]
        for operator in walker.tables(subgraph, 3, "Operator", deep=False):
            opcode_pos = walker.field_pos(operator, 0, 4)
            opcode = walker.u32(opcode_pos) if opcode_pos is not None else 0
            if opcode >= len(operator_codes):
                raise TfliteStructureError(
                    f"subgraph {number}: operator uses opcode {opcode}, "
                    f"the model has {len(operator_codes)}"
                )
            tensor_lists.append(walker.int_vector(operator, 1, "operator inputs"))
            tensor_lists.append(walker.int_vector(operator, 2, "operator outputs"))
        for indices in tensor_lists:
            for tensor_index in indices:
                if not -1 <= tensor_index < len(tensors):
                    raise TfliteStructureError(
                        f"subgraph {number}: tensor index {tensor_index} out of range "
                        f"(the subgraph has {len(tensors)} tensors)"
                    )
