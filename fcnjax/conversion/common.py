"""Shared pieces of the torchvision converters: loading a .pth and checking its keys and shapes by name."""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping

import numpy as np


class ConversionError(ValueError):
  """A state_dict does not fit the architecture: lists missing, unexpected and mis-shaped keys by name."""


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a .pth saved by torch.save(model.state_dict()) (or a checkpoint dict holding 'model'/'state_dict')."""
  try:
    import torch  # Only the converter needs torch: `pip install -e .[convert]`.
  except ImportError as e:
    raise ImportError("reading .pth files needs PyTorch: pip install -e '.[convert]'") from e
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file")
  if not _starts_like_torch_save(path):
    raise ConversionError(f"{path}: not a file written by torch.save (neither its zip format nor a legacy pickle)")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for corrupt files; name the file.
    raise ConversionError(f"{path}: not a readable PyTorch state_dict ({type(e).__name__}: {e})") from e
  for wrapper in ("model", "state_dict"):
    if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path}: expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}")
  return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def _starts_like_torch_save(path: str) -> bool:
  """torch.save writes a zip archive (starting "PK\\x03\\x04") or, in its legacy format, a pickle (starting with the
  PROTO opcode 0x80). A damaged file of either kind goes on to torch.load, whose error is reported."""
  with open(path, "rb") as f:
    head = f.read(4)
  return head == b"PK\x03\x04" or head[:1] == b"\x80"


def check_keys(state_dict: Mapping[str, Any], expected_shapes: Mapping[str, tuple[int, ...]], *,
               source: str = "state_dict", ignore: Callable[[str], bool] = lambda key: False) -> None:
  """Raises ConversionError naming every missing, unexpected and mis-shaped key.

  `expected_shapes` maps each torch key the converter reads to its torch shape. Keys for which `ignore(key)` is true
  (e.g. BatchNorm's num_batches_tracked) are allowed to be present or absent.
  """
  present = {k for k in state_dict if not ignore(k)}
  expected = set(expected_shapes)
  missing = sorted(expected - present)
  unexpected = sorted(present - expected)
  misshaped = sorted(f"{k}: got {tuple(np.shape(state_dict[k]))}, expected {tuple(expected_shapes[k])}"
                     for k in expected & present if tuple(np.shape(state_dict[k])) != tuple(expected_shapes[k]))
  if missing or unexpected or misshaped:
    lines = [f"{source} does not fit this architecture:"]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
      if keys:
        lines.append(f"  {title} ({len(keys)}): " + ", ".join(_truncate(keys)))
    raise ConversionError("\n".join(lines))


def _truncate(keys: list[str], limit: int = 20) -> Iterable[str]:
  return keys if len(keys) <= limit else keys[:limit] + [f"... and {len(keys) - limit} more"]


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Conv2d weight (out, in, kh, kw) -> flax Conv kernel (kh, kw, in, out)."""
  return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def is_num_batches_tracked(key: str) -> bool:
  return key.endswith("num_batches_tracked")


def conv_transpose_kernel(weight: np.ndarray) -> np.ndarray:
  """torch ConvTranspose2d weight (in, out/groups, kh, kw) -> our kernel layout (kh, kw, in, out/groups)."""
  return np.transpose(np.asarray(weight), (2, 3, 0, 1))
