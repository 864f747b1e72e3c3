"""The fused quantizer's arithmetic as one native call per direction, for float32 weights on the CPU.

On a CPU every torch call costs several microseconds whatever its size, more inside a training step than in a
tight loop; the fused quantizer's torch path makes about fifty of them per step (stacking, five elementwise passes
forward, a dozen backward, slicing), which on a small model is most of what the callback adds to a step.
``_kernel.c`` does the same arithmetic in one loop over every layer's weights per direction: the quantized weights
and weight gradients are bit-identical to the torch path (same float32 operations in the same order), the
per-channel ``b``/``e`` gradient sums may differ in their last bits (another summation order).

The C file is compiled at first use with the system's C compiler (``$CC``, else ``cc``; plain C, no Python or torch
headers, well under a second) into a cache folder (``$LIGHTNING_SGSC_CACHE``, else ``$XDG_CACHE_HOME`` or
``~/.cache``, then ``lightning_sgsc/``), named by a hash of the source, the flags, the compiler's version and the
machine, and loaded with :mod:`ctypes`. Where that fails (no compiler, not Linux or macOS, a read-only cache) or
``LIGHTNING_SGSC_NATIVE=0`` is set, the torch path runs, and :func:`status` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lightning_sgsc.quant.functional import _constants  # the torch path's float32 constants

ENV_SWITCH = "LIGHTNING_SGSC_NATIVE"
"""Set to ``0`` to use the torch path only."""
ENV_CACHE = "LIGHTNING_SGSC_CACHE"
"""Folder for the compiled kernel (default ``$XDG_CACHE_HOME/lightning_sgsc`` or ``~/.cache/lightning_sgsc``)."""

SOURCE = Path(__file__).with_name("_kernel.c")
FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-shared", "-fPIC")
"""``-ffp-contract=off``: no fused multiply-add, so each step rounds as the torch op it mirrors does."""
COMPILE_TIMEOUT_S = 120

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_status: str | None = None  # None: not tried yet
_SWITCH_ON = ("1", "on", "yes", "true", "")
_SWITCH_OFF = ("0", "off", "no", "false")
enabled = True
"""Process-wide switch (``False``: the torch path), e.g. to time both paths in one process."""


def _cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE)
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lightning_sgsc"


def _compiler() -> str | None:
    """``$CC`` where it is set (``None`` if it names nothing on the PATH), else ``cc``, else ``gcc``."""
    chosen = os.environ.get("CC")
    if chosen:
        return shutil.which(chosen)
    return shutil.which("cc") or shutil.which("gcc")


def _build() -> ctypes.CDLL:
    """Compiles (once per source, flags, compiler and machine) and loads the kernel; raises ``OSError`` or
    ``RuntimeError`` with the reason when it cannot."""
    if sys.platform not in ("linux", "darwin"):
        raise RuntimeError(f"no native build on {sys.platform}")
    cc = _compiler()
    if cc is None:
        chosen = os.environ.get("CC")
        raise RuntimeError(
            f"$CC={chosen!r} is not a program on the PATH" if chosen else "no C compiler found (set $CC)"
        )
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), platform.machine().encode()])
    ).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"kernel-{key}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)  # then renamed: processes building at once are safe
        os.close(fd)
        try:
            done = subprocess.run(
                [cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S
            )
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    lib.sgsc_forward.restype = None
    lib.sgsc_forward.argtypes = [_I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _P]
    lib.sgsc_backward.restype = None
    lib.sgsc_backward.argtypes = [_I64, _P, _P, _P, _P, _P, _P, _I64, _P, ctypes.c_float, _P, _P]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or ``None`` (the torch path; :func:`status` says why). Built at the first call."""
    global _library, _status
    if not enabled:
        return None
    if _status is None:
        with _lock:
            if _status is None:
                switch = os.environ.get(ENV_SWITCH, "1")
                if switch.strip().lower() not in _SWITCH_ON + _SWITCH_OFF:
                    from lightning_sgsc.errors import SGSCValueError, describe_rule

                    raise SGSCValueError(
                        describe_rule(f"${ENV_SWITCH}", "one of 1/0, on/off, yes/no, true/false", switch)
                    )
                if switch.strip().lower() in _SWITCH_OFF:
                    _status = f"off ({ENV_SWITCH}={switch})"
                else:
                    try:
                        _library = _build()
                        _status = "native"
                    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                        _status = f"unavailable ({err})"
    return _library


def status() -> str:
    """``"native"``, or why the torch path is used (``"off (...)"``, ``"unavailable (...)"``); builds the kernel
    if that was not tried yet."""
    library()
    if not enabled:
        return "off (lightning_sgsc.quant.native.enabled is False)"
    assert _status is not None
    return _status


def usable(tensors: Sequence[Tensor]) -> bool:
    """Whether the kernel can take these tensors as they are: contiguous float32 on the CPU."""
    f32 = torch.float32
    return all(t.is_cpu and t.dtype is f32 and t.is_contiguous() for t in tensors)


TABLE_ROWS = 7
"""Rows of the per-channel table :func:`forward` returns: ``2^e``, ``2^-e``, the clamp bounds ``-2^(b-1)`` and
``2^(b-1) - 1``, ``ln2 2^e``, ``ln2 2^e 2^(b-1)`` (the rows of :class:`~.functional._Steps`) and the effective
bits ``max(b, 0)`` (0 for pruned channels)."""


class Layout:
    """The rows and columns of each layer, as the kernel takes them (built once per plan)."""

    def __init__(self, rows: Sequence[int], cols: Sequence[int]) -> None:
        self.n = len(rows)
        self.channels = sum(rows)
        self.rows = (ctypes.c_int64 * self.n)(*rows)
        self.cols = (ctypes.c_int64 * self.n)(*cols)
        self.numel = tuple(r * c for r, c in zip(rows, cols, strict=True))
        self._pointers = _P * self.n
        self.consts = torch.cat([c.reshape(-1) for c in _constants(torch.device("cpu"))]).contiguous()

    def __reduce__(self) -> tuple[type[Layout], tuple[list[int], list[int]]]:
        # ctypes array types made at run time do not pickle; the sizes do (a pickled callback or quantizer)
        return (Layout, (list(self.rows), list(self.cols)))

    def pointers(self, tensors: Sequence[Tensor | None]) -> ctypes.Array[ctypes.c_void_p]:
        return self._pointers(*[None if t is None else t.data_ptr() for t in tensors])

    def check(self, tensors: Sequence[Tensor], per_channel: bool = False) -> None:
        """Every tensor holds exactly its layer's weights (or, ``per_channel``, one value per channel): what the
        kernel will read or write."""
        sizes = self.rows if per_channel else self.numel
        for t, numel in zip(tensors, sizes, strict=True):
            if t.numel() != numel:
                raise RuntimeError(f"native quantizer: a tensor of {t.numel()} elements where {numel} were planned")


def forward(
    lib: ctypes.CDLL,
    layout: Layout,
    bits: Sequence[Tensor],
    exponents: Sequence[Tensor],
    keep: Tensor,
    share: Tensor,
    weights: Sequence[Tensor],
) -> tuple[list[Tensor], Tensor, Tensor]:
    """``(each layer's quantized weight, the per-channel table, the bits-per-weight term)`` in one call: the
    quantized weights are new tensors shaped like the weights, the table is ``(TABLE_ROWS, C)`` (see
    :data:`TABLE_ROWS`; :func:`backward` takes it), the term ``sum(max(b, 0) * keep * share)`` a 0-dim tensor.
    Every tensor must be :func:`usable`; ``keep`` and ``share`` are ``(C,)``. One thread: splitting large layers
    over two threads measured no faster on a 2-core machine (the arithmetic is one pass over memory)."""
    layout.check(weights)
    layout.check(bits, per_channel=True)
    layout.check(exponents, per_channel=True)
    if keep.numel() != layout.channels or share.numel() != layout.channels:
        raise RuntimeError(f"native quantizer: keep/share of {keep.numel()}/{share.numel()} for {layout.channels}")
    out = [torch.empty_like(w) for w in weights]
    table = torch.empty((TABLE_ROWS, layout.channels))
    bpw = torch.empty(())
    lib.sgsc_forward(
        layout.n,
        layout.rows,
        layout.cols,
        layout.pointers(bits),
        layout.pointers(exponents),
        keep.data_ptr(),
        share.data_ptr(),
        layout.consts.data_ptr(),
        layout.pointers(weights),
        layout.pointers(out),
        table.data_ptr(),
        layout.channels,
        bpw.data_ptr(),
    )
    return out, table, bpw


def backward(
    lib: ctypes.CDLL,
    layout: Layout,
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    needs_w: Sequence[bool],
    table: Tensor,
    share: Tensor,
    grad_bpw: float,
) -> tuple[list[Tensor | None], Tensor, Tensor]:
    """``(weight gradients or None where not needed, b gradients, e gradients)``, the last two flat ``(C,)``.
    ``grads`` must be :func:`usable`; ``table``: the forward's."""
    layout.check(weights)
    layout.check(grads)
    if tuple(table.shape) != (TABLE_ROWS, layout.channels) or share.numel() != layout.channels:
        raise RuntimeError(f"native quantizer: a table of shape {tuple(table.shape)} for {layout.channels} channels")
    grad_w = [torch.empty_like(w) if need else None for w, need in zip(weights, needs_w, strict=True)]
    flat = torch.empty((2, layout.channels))
    lib.sgsc_backward(
        layout.n,
        layout.rows,
        layout.cols,
        layout.pointers(weights),
        layout.pointers(grads),
        layout.pointers(grad_w),
        table.data_ptr(),
        layout.channels,
        share.data_ptr(),
        grad_bpw,
        flat[0].data_ptr(),
        flat[1].data_ptr(),
    )
    return grad_w, flat[0], flat[1]
