"""PyTorch twins of fcnjax's models (fcn.py, unet.py), the references of the parity tests and benchmarks."""
from __future__ import annotations

import torch


def randomize_batch_norm(model: torch.nn.Module, shift_std: float, var_range: tuple[float, float],
                         generator: torch.Generator | None = None) -> torch.nn.Module:
  """Random BatchNorm scales U(0.5, 1.5), shifts and running means N(0, shift_std), running variances U(var_range),
  drawn from `generator` (torch's global generator when None) in module order.

  With the 1/0 defaults eval-mode BatchNorm is nearly the identity, and a mis-assigned statistic would go unnoticed.
  """
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5, generator=generator)
        module.bias.normal_(0, shift_std, generator=generator)
        module.running_mean.normal_(0, shift_std, generator=generator)
        module.running_var.uniform_(*var_range, generator=generator)
  return model
