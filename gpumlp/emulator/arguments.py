"""Checks kernel arguments against the parameter types g++ saw, and packs them into the 8-byte
slots the runtime hands to the kernel's entry point.

A bare Python int or float is refused like on the GPU path (CuPy would send it as a 64-bit value,
silently wrong for an `int` or `float` parameter); a numpy scalar must be exactly the parameter's
C type, and an array must be C-contiguous and of the pointee's dtype (any dtype for `void*` and
structs such as `float4*`).
"""
from __future__ import annotations

import ctypes
import struct
import weakref

import numpy as np

from gpumlp.device import KernelArgumentError

# Type code (launch_glue.h) -> (numpy type, C name, struct format of its 8-byte slot).
SCALARS = {
    "f": (np.float32, "float", "f4x"),
    "d": (np.float64, "double", "d"),
    "i": (np.int32, "int", "i4x"),
    "I": (np.uint32, "unsigned int", "I4x"),
    "q": (np.int64, "long long", "q"),
    "Q": (np.uint64, "unsigned long long", "Q"),
    "h": (np.int16, "short", "h6x"),
    "H": (np.uint16, "unsigned short", "H6x"),
    "b": (np.int8, "signed char", "b7x"),
    "B": (np.uint8, "unsigned char", "B7x"),
    "?": (np.bool_, "bool", "?7x"),
}


# The size in bytes that marks a scalar argument in the extents handed to memcheck (scheduler.c).
NOT_A_BUFFER = 2**64 - 1

# Reading an array's data pointer costs microseconds (numpy builds a ctypes or dict object), about
# as much as a whole launch of a small kernel; training relaunches with the same arrays, so the
# pointers are remembered by id, with a weak reference that tells a reused id from the same array.
# (An array's data never moves, short of ndarray.resize(refcheck=False).)
_POINTER_CACHE_SIZE = 1024
_pointer_cache: dict[int, tuple[weakref.ref, int]] = {}


def data_pointer(array: np.ndarray) -> int:
    entry = _pointer_cache.get(id(array))
    if entry is not None and entry[0]() is array:
        return entry[1]
    if len(_pointer_cache) >= _POINTER_CACHE_SIZE:
        _pointer_cache.clear()
    pointer = array.ctypes.data
    _pointer_cache[id(array)] = (weakref.ref(array), pointer)
    return pointer


class Parameter:
    def __init__(self, name: str, kind: str, pointee: str):
        self.name = name
        self.is_pointer = kind == "P"
        if self.is_pointer:
            scalar = SCALARS.get(pointee)
            self.dtype = np.dtype(scalar[0]) if scalar else None
            self.c_type = (scalar[1] if scalar else "void" if pointee == "v" else "struct") + "*"
            self.slot_format = "Q"
        else:
            scalar_type, self.c_type, self.slot_format = SCALARS.get(kind, (None, "struct", None))
            self.scalar_type = scalar_type


class ArgumentPacker:
    def __init__(self, kernel_name: str, signature: str, parameter_names: tuple[str, ...]):
        kinds = [signature[i:i + 2] for i in range(0, len(signature), 2)]
        if len(parameter_names) != len(kinds):
            parameter_names = tuple(f"#{i}" for i in range(len(kinds)))
        self.kernel_name = kernel_name
        self.parameters = [Parameter(name, kind[0], kind[1]) for name, kind in zip(parameter_names, kinds)]
        self._unsupported = next((p for p in self.parameters if p.slot_format is None), None)
        self._slots = struct.Struct("<" + "".join(p.slot_format or "" for p in self.parameters))
        # How memcheck names each argument in a report; the buffers live as long as the packer.
        self._descriptions = [ctypes.create_string_buffer(f"'{p.name}' ({p.c_type})".encode())
                              for p in self.parameters]
        self._description_addresses = [ctypes.addressof(d) for d in self._descriptions]
        self._extents = struct.Struct("<" + "QQQQ" * len(self.parameters))

    def _refuse(self, parameter: Parameter, problem: str):
        raise KernelArgumentError(f"{self.kernel_name}: parameter '{parameter.name}' ({parameter.c_type}) {problem}")

    def pack(self, args) -> bytes:
        if self._unsupported is not None:
            self._refuse(self._unsupported, "is a struct passed by value, which the emulator cannot pass")
        if len(args) != len(self.parameters):
            raise KernelArgumentError(f"{self.kernel_name}: takes {len(self.parameters)} arguments "
                                      f"({', '.join(p.name for p in self.parameters)}), got {len(args)}")
        values = []
        for parameter, value in zip(self.parameters, args):
            if parameter.is_pointer:
                if type(value) is np.ndarray and value.flags.c_contiguous and value.dtype is parameter.dtype:
                    values.append(data_pointer(value))
                else:
                    values.append(self._pointer(parameter, value))
            elif type(value) is parameter.scalar_type:
                values.append(value)
            elif isinstance(value, (bool, int, float, complex)) and not isinstance(value, np.generic):
                self._refuse(parameter, f"got a bare Python {type(value).__name__} ({value!r}); "
                                        f"wrap it as numpy.{parameter.scalar_type.__name__}")
            else:
                self._refuse(parameter, f"needs numpy.{parameter.scalar_type.__name__}, "
                                        f"got {type(value).__module__}.{type(value).__name__}")
        return self._slots.pack(*values)

    def _pointer(self, parameter: Parameter, value) -> int:
        if not isinstance(value, np.ndarray):
            self._refuse(parameter, f"needs a numpy array, got {type(value).__module__}.{type(value).__name__}")
        if not value.flags.c_contiguous:
            self._refuse(parameter, "needs a C-contiguous array (use numpy.ascontiguousarray)")
        if parameter.dtype is not None and value.dtype != parameter.dtype:
            self._refuse(parameter, f"needs a {parameter.dtype} array, got {value.dtype}")
        return data_pointer(value)

    def extents(self, args) -> bytes:
        """For memcheck, per argument (already checked by `pack`): its size in bytes (NOT_A_BUFFER
        for a scalar), its element size, whether it may be written, and the address of its
        description."""
        values = []
        for parameter, value, description in zip(self.parameters, args, self._description_addresses):
            if parameter.is_pointer:
                values += (value.nbytes, value.itemsize, value.flags.writeable, description)
            else:
                values += (NOT_A_BUFFER, 0, 0, description)
        return self._extents.pack(*values)
