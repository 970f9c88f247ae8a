"""engine/fast/cpu_kernels.py's check of the C boundary: the library reports its structs' layout and constants, and
the loader refuses a ctypes mirror that differs, naming each difference."""

import ctypes

import pytest

from engine.fast import cpu_kernels


@pytest.fixture(scope="module")
def kernels() -> ctypes.CDLL:
    library = cpu_kernels.library()
    if library is None:
        pytest.skip(f"the C kernels cannot run here: {cpu_kernels.unsupported()}")
    return library


def test_the_library_loads_because_its_structs_and_constants_match_their_ctypes_mirror(kernels):
    cpu_kernels.check_layout(kernels)  # library() ran it too; here it must pass on its own
    structs = cpu_kernels.STRUCTS.values()
    assert kernels.layout_entries() == len(structs) + sum(len(s._fields_) for s in structs) + len(cpu_kernels.CONSTANTS)


class _SwappedShape(ctypes.Structure):  # struct decode_shape with eps and format in each other's place
    _fields_ = [
        *((name, ctypes.c_int64) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate")),
        ("capacity", ctypes.c_int64),
        ("format", ctypes.c_int),
        ("eps", ctypes.c_float),
    ]


class _LayerWithoutKv(ctypes.Structure):  # struct decode_layer missing its last field
    _fields_ = cpu_kernels.DecodeLayer._fields_[:-1]


def test_a_field_moved_or_missing_on_one_side_is_refused_with_each_difference_named(kernels):
    structs = {"decode_layer": _LayerWithoutKv, "decode_shape": _SwappedShape}
    with pytest.raises(cpu_kernels.BoundaryMismatch) as refused:
        cpu_kernels.check_layout(kernels, structs)
    message = str(refused.value)
    assert "decode_shape.eps: offset 56, 4 bytes in cpu_kernels.c, offset 60, 4 bytes in cpu_kernels.py" in message
    assert "decode_shape.format: offset 60, 4 bytes in cpu_kernels.c, offset 56, 4 bytes in cpu_kernels.py" in message
    assert "decode_layer.kv: offset 80, 8 bytes in cpu_kernels.c, absent in cpu_kernels.py" in message
    assert "decode_layer: 88 bytes in cpu_kernels.c, 80 bytes in cpu_kernels.py" in message


def test_a_constant_the_packing_follows_is_checked_too(kernels):
    with pytest.raises(cpu_kernels.BoundaryMismatch, match="WIDTH: 16 in cpu_kernels.c, 8 in cpu_kernels.py"):
        cpu_kernels.check_layout(kernels, constants={**cpu_kernels.CONSTANTS, "WIDTH": 8})


def test_the_loader_refuses_a_mismatch_instead_of_falling_back_to_torch(monkeypatch, kernels):
    """A mismatch is a source tree edited on one side only: library() raises it, never answers None (which would
    run torch's kernels and skip the kernels' tests)."""
    monkeypatch.setitem(cpu_kernels.STRUCTS, "decode_shape", _SwappedShape)  # check_layout's default
    cpu_kernels.library.cache_clear()
    try:
        with pytest.raises(cpu_kernels.BoundaryMismatch, match="decode_shape.eps"):
            cpu_kernels.library()
    finally:
        monkeypatch.undo()
        cpu_kernels.library.cache_clear()
