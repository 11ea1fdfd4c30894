"""Which pixels of a VGG trunk padded by FCN's 100 hold the same value, and can be left out and copied back.

FCN pads conv1_1's input by 100 zeros so that fc6's 7x7 window fits any input. Away from the image and from the
maps' own edges, every pixel of a map then sees only that padding through all the layers before it: they all hold
one value per channel, the "band". At 224x224 the band is most of the map in the first three blocks (conv1_2's 422
columns hold 228 that see the image and 2 that see a map edge). It is gone after block 4: there the image's pixels
and the edges' reach meet, which is what the padding of 100 was chosen for.

`band_cuts` follows one axis through the trunk and says, per block, how many band pixels to leave out on each side
while the block runs: its convolutions then compute a map that is the full one with part of the band cut from its
middle. Every pixel left keeps its value, because it sees what it saw before (the image, a map edge, or band only),
so the result is the same function of the weights, gradients included. After the block's last convolution the
trunk copies band pixels back in, as many as the next block may not leave out, before the pool; by block 4 the maps
are whole again. Cuts stay even across a pool, so pooling windows pair the same pixels.

fcn8s at 224x224 then convolves maps of 232, 127 and 78 pixels across in blocks 1-3 instead of 422, 211 and 106:
30% fewer multiply-adds for the whole network (18% at 512x512). docs/performance.md has what that does to its speed
(`python -m benchmarks.compare_torch --models fcn8s`, against `--no_cut_band`).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

# What a pixel's value depends on, as bits: the left (top) edge of some map, the image, the right (bottom) edge.
LEFT, IMAGE, RIGHT = 1, 2, 4


@dataclasses.dataclass(frozen=True)
class BlockCut:
  """One block's cut along one axis: band pixels left out on each side (`left`, `right`), and where the band is in
  the cut map after the block's last convolution (`left_band`, `right_band`: the index of a band pixel next to the
  left and right edges' reach), which is where copies go back in."""
  left: int
  right: int
  left_band: int
  right_band: int


def _convolve(labels: np.ndarray, edge_padding: bool) -> np.ndarray:
  """The labels after a 3x3, stride-1 convolution: each pixel sees its neighbours; zero padding (edge_padding) is
  not band (the band's value is not zero after the first layer) and makes the first and last pixel see an edge."""
  if edge_padding:
    labels = np.concatenate([[LEFT], labels, [RIGHT]]).astype(np.uint8)
  return labels[:-2] | labels[1:-1] | labels[2:]


def _pool(labels: np.ndarray, ceil_mode: bool) -> np.ndarray:
  """The labels after a 2x2, stride-2 max pool (ceil_mode: a last window of one pixel)."""
  if ceil_mode and len(labels) % 2:
    labels = np.concatenate([labels, labels[-1:]])
  pairs = len(labels) // 2
  return labels[0:2 * pairs:2] | labels[1:2 * pairs:2]


def _band_pixels(labels: np.ndarray) -> tuple[int, int, int, int]:
  """(left band width, right band width, first left band index, last right band index) of a map's labels: the band
  pixels between the left edge's reach and the image's, and between the image's and the right edge's."""
  image = np.flatnonzero(labels & IMAGE)
  if not len(image):
    return 0, 0, 0, 0
  first, last = image[0], image[-1]
  left_reach = np.flatnonzero(labels[:first] & LEFT)
  right_reach = np.flatnonzero(labels[last + 1:] & RIGHT)
  left_start = left_reach[-1] + 1 if len(left_reach) else 0
  right_end = last + 1 + right_reach[0] if len(right_reach) else len(labels)
  # Pixels between the reaches that see the image or an edge do not count: the band is what sees neither.
  if np.any(labels[left_start:first]) or np.any(labels[last + 1:right_end]):
    return 0, 0, 0, 0
  return int(first - left_start), int(right_end - last - 1), int(left_start), int(right_end - 1)


def band_cuts(size: int, padding: int, convs_per_block: Sequence[int], ceil_mode: bool) -> list[BlockCut]:
  """Per block of a VGG trunk (3x3 pad-1 convolutions, the first one padded by `padding` instead, a 2x2/2 pool
  after each block), the band pixels it leaves out along an axis of `size` input pixels. All zero when there is no
  band (torchvision's padding of 1)."""
  labels = np.zeros(size + 2 * padding, np.uint8)
  labels[padding:padding + size] = IMAGE
  widths = []  # per block: the narrowest band (left, right) after any of its convolutions, and the last one's place
  for block, num_convs in enumerate(convs_per_block):
    narrowest = [len(labels), len(labels)]
    for i in range(num_convs):
      # conv1_1 convolves the zero-padded input without padding of its own: its padding is band, not an edge.
      labels = _convolve(labels, edge_padding=(block, i) != (0, 0))
      left, right, left_band, right_band = _band_pixels(labels)
      narrowest = [min(narrowest[0], left), min(narrowest[1], right)]
    widths.append((narrowest, left_band, right_band))
    labels = _pool(labels, ceil_mode)
  cuts, previous = [], None
  for (left, right), left_band, right_band in widths:
    # Leave one band pixel in place to copy from; never cut more than half the previous block's cut (no cut grows).
    left, right = max(0, left - 1), max(0, right - 1)
    if previous is not None:
      left, right = min(left, previous.left // 2), min(right, previous.right // 2)
    previous = BlockCut(left, right, left_band, right_band - left - right)
    cuts.append(previous)
  return cuts
