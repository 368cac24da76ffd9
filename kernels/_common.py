"""Checks and the launcher shared by the kernel wrappers."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import cache, partial
from operator import itemgetter
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Triton decides at decoration time (for its own library: when Triton is first imported; for ours: when
# this package is) whether jit functions are compiled or run by its CPU interpreter (TRITON_INTERPRET=1).
_INTERPRETED = bool(triton.knobs.runtime.interpret)


def triton_available(device: torch.device | str) -> bool:
    """Whether the kernels of this package can run on `device`: CUDA, or the CPU under the interpreter
    (tests and smoke runs only: it is far slower than the torch reference there)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _INTERPRETED


def cdiv(a: int, b: int) -> int:
    """ceil(a / b), as `triton.cdiv`, without its constexpr wrapping (microseconds a call on the launch path)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n >= 1 (0 for 0), as `triton.next_power_of_2`, without its constexpr wrapping."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@triton.jit
def round_to_bf16(x):
    """float32 -> the nearest bfloat16 value (ties to even), as float32 (a cast to bfloat16 is then exact; Triton's
    interpreter would truncate)."""
    u = x.to(tl.uint32, bitcast=True)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return ((u >> 16) << 16).to(tl.float32, bitcast=True)


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand dtype for `tl.dot` on inputs of `dtype`: the input dtype, except bfloat16 under the
    interpreter, whose `tl.dot` multiplies bfloat16 bit patterns (triton-lang/triton#11584): fp32 there."""
    if _INTERPRETED and dtype == torch.bfloat16:
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


@cache
def _one_gpu() -> bool:
    """Whether this process sees one CUDA device at most (then it is always the current one)."""
    return torch.cuda.device_count() <= 1


def on_device(device: torch.device) -> AbstractContextManager:
    """Where a launch must run: Triton launches on the current CUDA device, which need not be the inputs' (a
    model split across GPUs). Switches only when it differs (a switch, even the check, costs microseconds a launch)."""
    if device.type != "cuda" or device.index is None or _one_gpu() or device.index == torch.cuda.current_device():
        return _STAY
    return torch.cuda.device(device)


_STAY = nullcontext()  # reusable: one object for every launch that stays on the current device


def check_device(tensors: list[Tensor]) -> torch.device:
    """The one device all `tensors` live on; ValueError if they differ or Triton cannot run there."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if not triton_available(device):
        raise ValueError(
            f"Triton cannot run on {device}: use a CUDA device, or set TRITON_INTERPRET=1 before Triton is "
            "first imported to run on the CPU (slow), or use the qllm_runtime reference"
        )
    return device


class Scratch:
    """Temporaries that a caller's launches reuse: one tensor per name and device, kept while its shape and dtype stay
    the same (a lookup group's temporaries keep their shapes from group to group, so they allocate nothing) and
    replaced when they change. For one caller on one stream at a time: a launch may overwrite what the previous launch
    of that name left there."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, torch.device], Tensor] = {}

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        return self._get(name, shape, dtype, device, torch.empty)

    def zeros(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """As `empty`, zero when made: for state the launches leave zero for the next (a counter they reset)."""
        return self._get(name, shape, dtype, device, torch.zeros)

    def _get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
             make: Callable[..., Tensor]) -> Tensor:
        held = self._held.get((name, device))
        if held is None or held.shape != shape or held.dtype != dtype:
            held = self._held[(name, device)] = make(shape, dtype=dtype, device=device)
        return held


def empty(scratch: Scratch | None, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
          ) -> Tensor:
    """`scratch.empty(...)`, or a new tensor without a scratch."""
    if scratch is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return scratch.empty(name, shape, dtype, device)


class Launcher:
    """A Triton kernel launched as `kernel[grid](*args, **kwargs)`, with a third of the JIT's host work per launch.

    Through the JIT a launch of a kernel with thirty arguments takes ~40 µs of host time on the GPU box, two thirds of
    it spent working out the specialization (the binder); the compiled kernel's own launch takes ~12 µs. The block
    memory launches its kernels a few times per lookup group, so the JIT's bookkeeping alone came to about a second of
    a 100K-token reading. Here the first launch of each specialization goes through the JIT (which compiles or finds
    the kernel) and is remembered under a key that holds everything Triton specialises on and more: each tensor's
    dtype and 16-byte alignment, each specialised int's value, each unspecialised int's width, a float's type only
    (never specialised on), every other argument and option as given. Later launches with the same key call the
    compiled kernel directly, so the kernel that runs is the one the JIT would run.

    Plain `kernel[grid]` is used under the interpreter, while launch hooks are set (profilers), for a Triton outside
    the versions whose launch path this was checked against (3.6 to 3.9), and with QUICKLLAMA_FAST_LAUNCH=0.
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._compiled: dict[tuple, Any] = {}
        params = getattr(kernel, "params", [])
        self._names = [p.name for p in params]
        self._defaults = {p.name: p.default for p in params}
        self._by_value = [p.is_constexpr or not p.do_not_specialize for p in params]  # else ints keyed by width
        self._plans: dict[tuple[type, ...], tuple[Callable, Callable, Callable]] = {}  # see _entries

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        return partial(self._launch, grid)

    def _launch(self, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> Any:
        if not _FAST_LAUNCH or _launch_hooked():
            return self.kernel[grid](*args, **kwargs)
        device = 0 if _one_gpu() else torch.cuda.current_device()
        # what of each argument can change the JIT's specialization (a superset): `_entries`
        key = (device, *kwargs.items(), *self._entries(args))
        entry = self._compiled.get(key)
        if entry is None:  # the JIT's launch: compiles or finds the kernel of this specialization
            compiled = self.kernel[grid](*args, **kwargs)
            # the arguments after the positional ones, as the compiled kernel takes them (fixed for this key)
            self._compiled[key] = compiled, [kwargs.get(name, self._defaults[name]) for name in self._names[len(args):]]
            return compiled
        compiled, rest = entry
        grid = (*grid, 1, 1)
        compiled.run(grid[0], grid[1], grid[2], _stream_getter()(device), compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *rest)
        return compiled

    def _entries(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The key's entries for `args`: their types, then each tensor's dtype and alignment, each unspecialised int's
        width class, and every other argument but a float as itself. Which argument is which follows from the types,
        so the split is made once per type signature (a launch's host time is mostly this key)."""
        types = tuple(map(type, args))
        plan = self._plans.get(types)
        if plan is None:
            plan = self._plans[types] = self._plan(types)
        tensors, widths, values = plan
        held = tensors(args)
        return (types, *[t.dtype for t in held], *[not t.data_ptr() & 15 for t in held],
                *[(-0x80000000 <= a <= 0x7FFFFFFF) + 2 * (a >= 1 << 63) for a in widths(args)], *values(args))

    def _plan(self, types: tuple[type, ...]) -> tuple[Callable, Callable, Callable]:
        """Getters of the tensors, the unspecialised ints and the arguments keyed by value, for args of `types`."""
        by_value = self._by_value + [True] * (len(types) - len(self._by_value))
        tensors = [i for i, t in enumerate(types) if issubclass(t, Tensor)]
        widths = [i for i, t in enumerate(types) if t is int and not by_value[i]]
        values = [i for i, t in enumerate(types) if i not in tensors and i not in widths and t is not float]
        return _getter(tensors), _getter(widths), _getter(values)


def _getter(indices: list[int]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """args -> the tuple of args[i] for i in `indices` (operator.itemgetter, which returns a bare item for one)."""
    if len(indices) > 1:
        return itemgetter(*indices)
    return (lambda args: (args[indices[0]],)) if indices else (lambda args: ())


def _launch_hooked() -> bool:
    """Whether a launch hook is set (a profiler's): then every launch goes through the JIT, which feeds it."""
    hook = triton.knobs.runtime.launch_enter_hook  # a chain of hooks (empty unless one was added), or None
    return hook is not None and bool(getattr(hook, "calls", True))


@cache
def _stream_getter() -> Callable[[int], int]:
    """The JIT's own way to the current stream's handle (torch's current stream; the capturing one in a CUDA graph)."""
    return triton.runtime.driver.active.get_current_stream


def _fast_launch_supported() -> bool:
    """Whether `Launcher` may skip the JIT: compiled kernels, and a Triton whose launch path it was checked against."""
    if _INTERPRETED or os.environ.get("QUICKLLAMA_FAST_LAUNCH", "1") == "0":
        return False
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return (3, 6) <= (major, minor) <= (3, 9)


_FAST_LAUNCH = _fast_launch_supported()
