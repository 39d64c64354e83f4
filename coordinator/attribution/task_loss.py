"""Validation loss and gradient of a task model as functions of one flat float32 parameter vector.

This is the bridge between the engine-independent valuation (which sees flat vectors) and the torch models of
protocol.tasks. It imports torch, so only code that evaluates imports it (coordinator.attribution itself does not).
The flat layout is the model's state_dict order, each array raveled in C order: the same order
`protocol.tasks.models.model_arrays` returns, so Flower's list of arrays maps onto it one to one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from protocol.errors import MalformedError
from protocol.tasks.models import loss_fn, to_tensors
from protocol.tasks.spec import TaskSpec

FloatVector = npt.NDArray[np.float32]

WINDOWS_PER_BLOCK = 128
"""Validation windows per forward pass of `TaskValidationLoss.__call__`: the activations of one pass stay about 4 MB
for the PLAID model (one pass over all 537 windows: 18 MB), whatever the size of the buyer's validation set."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_KEPT_FREE_BYTES, _HEAP_ALLOCATION_BYTES = 64 << 20, 32 << 20


def keep_freed_memory_for_reuse() -> None:
    """Tell glibc to keep up to 64 MB of freed memory and to serve allocations up to 32 MB from its heap.

    Measured on the PLAID model (537 windows, one thread): by default every evaluation's activations (1-4 MB tensors)
    were mapped fresh from the OS and given back after it, so each evaluation faulted its pages back in (4,000-5,400
    minor page faults), about half its time (16.4-25 ms against 9.4-12 ms under the same load, in a fresh process).
    Whether this happened depended on what the process had freed before (glibc raises its thresholds after freeing
    a large mapped block, so a process that had trained or screened first was fast): set here explicitly instead.
    Process-wide: the process keeps up to 64 MB of freed heap instead of returning it at once. No-op off glibc.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt(_M_TRIM_THRESHOLD, _KEPT_FREE_BYTES)
    libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_ALLOCATION_BYTES)


class TaskValidationLoss:
    """L(theta) on the buyer's validation windows, for the task's model with parameters theta (flat)."""

    def __init__(
        self, spec: TaskSpec, model: nn.Module, x: npt.NDArray[np.generic], y: npt.NDArray[np.generic] | None
    ) -> None:
        keep_freed_memory_for_reuse()
        self._spec = spec
        self._model = model
        self._model.eval()
        self._x, self._y = to_tensors(spec, x, y)
        if len(self._x) == 0:
            raise MalformedError("no validation windows")
        state = model.state_dict()
        self.names = list(state)
        self.shapes = [tuple(t.shape) for t in state.values()]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.size = sum(self.sizes)
        # Parameters are set in place on these tensors (state_dict shares storage with the module).
        self._targets = list(state.values())

    def flatten(self, arrays: Mapping[str, npt.NDArray[np.generic]]) -> FloatVector:
        """Named arrays as one flat float32 vector in the model's state_dict order; names and shapes must match."""
        if set(arrays) != set(self.names):
            raise MalformedError(
                "arrays do not name the model's parameters",
                missing=sorted(set(self.names) - set(arrays))[:4],
                unexpected=sorted(set(arrays) - set(self.names))[:4],
            )
        for name, shape in zip(self.names, self.shapes, strict=True):
            if tuple(np.shape(arrays[name])) != shape:
                raise MalformedError("array shape mismatch", name=name, expected=shape, found=np.shape(arrays[name]))
        return np.concatenate([np.asarray(arrays[n], dtype=np.float32).ravel() for n in self.names])

    def unflatten(self, flat: FloatVector) -> dict[str, npt.NDArray[np.float32]]:
        """The inverse of `flatten`."""
        self._check(flat)
        out: dict[str, npt.NDArray[np.float32]] = {}
        start = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes, strict=True):
            out[name] = flat[start : start + size].reshape(shape).copy()
            start += size
        return out

    def _check(self, flat: FloatVector) -> None:
        if flat.ndim != 1 or flat.shape[0] != self.size:
            raise MalformedError("flat parameter vector of the wrong size", expected=self.size, found=flat.shape)

    def _load(self, flat: FloatVector) -> None:
        self._check(flat)
        tensor = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
        start = 0
        with torch.no_grad():
            for target, size in zip(self._targets, self.sizes, strict=True):
                target.copy_(tensor[start : start + size].view_as(target))
                start += size

    def __call__(self, flat: FloatVector) -> float:
        """The mean loss over all windows, as the mean of each block's mean loss weighted by its share of the
        windows (every window has as many targets as any other, so this is the mean over all of them; equal to one
        pass over all windows up to float32 rounding)."""
        self._load(flat)
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(self._x), WINDOWS_PER_BLOCK):
                x, y = self._x[start : start + WINDOWS_PER_BLOCK], self._y[start : start + WINDOWS_PER_BLOCK]
                total += float(loss_fn(self._spec, self._model(x), y)) * len(x)
        return total / len(self._x)

    def gradient(self, flat: FloatVector) -> FloatVector:
        """dL/dtheta at theta = flat, flat; one forward and one backward pass over the validation windows."""
        self._load(flat)
        self._model.zero_grad(set_to_none=True)
        loss_fn(self._spec, self._model(self._x), self._y).backward()  # type: ignore[no-untyped-call]
        parameters = list(self._model.parameters())
        # state_dict also lists buffers, which have no gradient; the task models have none, and a model with
        # buffers would misalign the flat layout, so it is refused rather than silently padded.
        if len(parameters) != len(self.names):
            raise MalformedError("models with buffers are not supported by the first-order method", names=self.names)
        grads = [torch.zeros_like(p).ravel() if p.grad is None else p.grad.detach().ravel() for p in parameters]
        return torch.cat(grads).numpy().astype(np.float32)
