"""`portable_forms()`: trace the ops as plain lax operations that every platform and exporter knows.

Inside the block, convolutions are lax.conv_general_dilated itself (no C++ CPU kernels, no lax.platform_dependent,
no choice that reads a shape) and max pooling is lax.reduce_window (ONNX's MaxPool) rather than the maximum over
taps that fcnjax differentiates faster. Values are the same; exported graphs (fcnjax.exporting) are traced this way.
"""
from __future__ import annotations

import contextlib
import contextvars

_PORTABLE = contextvars.ContextVar("fcnjax_portable_forms", default=False)


@contextlib.contextmanager
def portable_forms():
  """Traces the ops inside the block in their portable forms."""
  token = _PORTABLE.set(True)
  try:
    yield
  finally:
    _PORTABLE.reset(token)


def enabled() -> bool:
  return _PORTABLE.get()
