"""The PyTorch baseline that `python -m context_keras.benchmark` measures our training step against: the same networks
written the way a PyTorch user would, trained for a few steps on random input of the benchmark's shapes, on the CPU.

  --tower alexnet_bn     context_keras's default network (docs/method.md §3): CaffeNet without groups on 96-px
                         patches, BN without scale or shift on conv3-5, fc6 and fc7, the fc7-fc9 pair head.
                         --mode grid: the tower runs once per patch of --grids 3x3 grids and every ordered pair of
                         8-neighbours gathers its two fc6 rows (as the original and context_keras do); --mode pair:
                         the tower runs on both patches of --pairs pairs (the common reimplementation).
  --tower resnet50_rpl   `--backbone=resnet50 --geometry=revisiting --head=revisiting` (docs/method.md §8): ResNet-50
                         v1 with the stride on the 3x3 convolutions, stem stride 1, stage strides 1,2,2,1, widths times
                         --width/4 (4 = the standard ResNet-50, 8 = the 2x model), on 64-px patches, 9 per image
                         (--grids counts images); each patch's pooled features to a 1000-d embedding, the 8
                         (neighbour, centre) pairs of every image concatenated, fc 4096, BN, ReLU,
                         dropout 0.5, 8 logits.

A step is the forward pass, the summed cross-entropy's backward pass and an SGD update. The last line printed is one
JSON object: impl, version, tower, mode, precision, pairs_per_step, patches_per_step, step_s, pairs_per_s,
patches_per_s. --precision bf16 runs the step under torch.autocast(bfloat16) on the CPU. Needs `pip install
'.[bench]'` (torch).
"""
import argparse
import json
import time

import torch
from torch import nn
import torch.nn.functional as F

# Where the second patch lies relative to the first, (dx, dy) with y down, label = index (patches.NEIGHBOUR_OFFSETS).
NEIGHBOUR_OFFSETS = ((-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1))


class AlexNetBN(nn.Module):
  """The alexnet_bn tower: conv1 11x11/4 pad 5, pool, LRN, conv2 5x5, pool, LRN, conv3-5 3x3 with BN, pool, fc6 BN."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 96, 11, stride=4, padding=5)
    self.conv2 = nn.Conv2d(96, 256, 5, padding=2)
    self.convs = nn.ModuleList([nn.Conv2d(256, 384, 3, padding=1), nn.Conv2d(384, 384, 3, padding=1),
                                nn.Conv2d(384, 256, 3, padding=1)])
    self.norms = nn.ModuleList([nn.BatchNorm2d(c, eps=1e-5, affine=False) for c in (384, 384, 256)])
    self.lrn = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
    self.fc6 = nn.Linear(3 * 3 * 256, 4096)
    self.bn6 = nn.BatchNorm1d(4096, eps=1e-5, affine=False)

  def forward(self, x):
    for conv in (self.conv1, self.conv2):
      x = self.lrn(F.max_pool2d(F.relu(conv(x)), 3, 2, ceil_mode=True))
    for conv, norm in zip(self.convs, self.norms):
      x = F.relu(norm(conv(x)))
    x = F.max_pool2d(x, 3, 2, ceil_mode=True)
    return F.relu(self.bn6(self.fc6(torch.flatten(x, 1))))


class DoerschHead(nn.Module):
  """fc7 (BN) -> fc8 -> fc9 on the concatenated fc6 rows of a pair."""

  def __init__(self, features=4096):
    super().__init__()
    self.fc7 = nn.Linear(2 * features, 4096)
    self.bn7 = nn.BatchNorm1d(4096, eps=1e-5, affine=False)
    self.fc8 = nn.Linear(4096, 4096)
    self.fc9 = nn.Linear(4096, 8)

  def forward(self, first, second):
    x = F.relu(self.bn7(self.fc7(torch.cat([first, second], 1))))
    return self.fc9(F.relu(self.fc8(x)))


class Bottleneck(nn.Module):
  """A ResNet v1 bottleneck unit with the stride on the 3x3 convolution and a projection shortcut when the stride or
  the width changes; BN eps 1e-3 as TF1's defaults."""

  def __init__(self, inputs, outputs, stride):
    super().__init__()
    inner = outputs // 4
    self.convs = nn.ModuleList([nn.Conv2d(inputs, inner, 1, bias=False),
                                nn.Conv2d(inner, inner, 3, stride=stride, padding=1, bias=False),
                                nn.Conv2d(inner, outputs, 1, bias=False)])
    self.norms = nn.ModuleList([nn.BatchNorm2d(c, eps=1e-3) for c in (inner, inner, outputs)])
    self.shortcut = None
    if stride > 1 or inputs != outputs:
      self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False),
                                    nn.BatchNorm2d(outputs, eps=1e-3))

  def forward(self, x):
    y = x
    for k, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      y = norm(conv(y))
      if k < 2:
        y = F.relu(y)
    return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet50RPL(nn.Module):
  """ResNet-50 v1 for patches (stem 7x7 stride 1, 3x3/2 max-pool, stages of 3, 4, 6, 3 units striding 1, 2, 2, 1),
  global average pool, and the revisiting head's per-patch embedding."""

  def __init__(self, width=4, embedding=1000):
    super().__init__()
    base = 16 * width
    self.stem = nn.Conv2d(3, base, 7, padding=3, bias=False)
    self.stem_norm = nn.BatchNorm2d(base, eps=1e-3)
    units, channels = [], base
    for stage, (count, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 1))):
      outputs = 4 * base * 2 ** stage
      for k in range(count):
        units.append(Bottleneck(channels, outputs, stride if k == 0 else 1))
        channels = outputs
    self.units = nn.Sequential(*units)
    self.embed = nn.Linear(channels, embedding)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.stem_norm(self.stem(x))), 3, 2, padding=1)
    return self.embed(self.units(x).mean((2, 3)))


class RevisitingHead(nn.Module):
  """fc 4096 -> BN (eps 1e-5) -> ReLU -> dropout 0.5 -> 8 logits on the concatenated embeddings of a pair."""

  def __init__(self, embedding=1000):
    super().__init__()
    self.fc = nn.Linear(2 * embedding, 4096)
    self.norm = nn.BatchNorm1d(4096, eps=1e-5)
    self.logits = nn.Linear(4096, 8)

  def forward(self, first, second):
    x = F.relu(self.norm(self.fc(torch.cat([first, second], 1))))
    return self.logits(F.dropout(x, 0.5, self.training))


def grid_pairs(grids, side=3):
  """(first, second, label) of every ordered pair of 8-neighbours in `grids` side x side grids."""
  first, second, label = [], [], []
  for g in range(grids):
    for y in range(side):
      for x in range(side):
        for lbl, (dx, dy) in enumerate(NEIGHBOUR_OFFSETS):
          if 0 <= x + dx < side and 0 <= y + dy < side:
            first.append(g * side * side + y * side + x)
            second.append(g * side * side + (y + dy) * side + x + dx)
            label.append(lbl)
  return torch.tensor(first), torch.tensor(second), torch.tensor(label)


def centre_pairs(images):
  """(first, second, label) of the 8 (neighbour, centre) pairs of each image's 3x3 patches; the label says where the
  centre lies seen from the neighbour (context_keras's patches.revisiting_pairs)."""
  first, second, label = [], [], []
  for g in range(images):
    for cell in range(9):
      if cell != 4:
        row, col = divmod(cell, 3)
        first.append(g * 9 + cell)
        second.append(g * 9 + 4)
        label.append(NEIGHBOUR_OFFSETS.index((1 - col, 1 - row)))
  return torch.tensor(first), torch.tensor(second), torch.tensor(label)


def workload(args):
  """(tower, head, patches, first, second, labels) of the chosen network and mode."""
  if args.tower == "resnet50_rpl":
    tower = ResNet50RPL(args.width).to(memory_format=torch.channels_last)
    patches = torch.randn(9 * args.grids, 3, 64, 64).to(memory_format=torch.channels_last)
    return (tower, RevisitingHead(), patches, *centre_pairs(args.grids))
  if args.mode == "grid":
    return (AlexNetBN(), DoerschHead(), torch.randn(9 * args.grids, 3, 96, 96), *grid_pairs(args.grids))
  first = torch.arange(args.pairs)
  return (AlexNetBN(), DoerschHead(), torch.randn(2 * args.pairs, 3, 96, 96), first, first + args.pairs,
          torch.randint(0, 8, (args.pairs,)))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tower", choices=["alexnet_bn", "resnet50_rpl"], default="alexnet_bn")
  parser.add_argument("--width", type=int, default=4, help="resnet50_rpl: filters factor (4 = ResNet-50, 8 = 2x)")
  parser.add_argument("--mode", choices=["grid", "pair"], default="grid", help="alexnet_bn: how pairs are formed")
  parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
  parser.add_argument("--grids", type=int, default=56, help="3x3 grids (resnet50_rpl: images) per step")
  parser.add_argument("--pairs", type=int, default=256, help="pairs per step in pair mode")
  parser.add_argument("--steps", type=int, default=3, help="timed steps, after one untimed step")
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  tower, head, patches, first, second, labels = workload(args)
  optimizer = torch.optim.SGD(list(tower.parameters()) + list(head.parameters()), lr=1e-5)

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
      features = tower(patches)
      logits = head(features[first], features[second])
    F.cross_entropy(logits.float(), labels, reduction="sum").backward()
    optimizer.step()

  step()
  start = time.perf_counter()
  for _ in range(args.steps):
    step()
  seconds = (time.perf_counter() - start) / args.steps
  print(json.dumps({"impl": "torch", "version": torch.__version__, "tower": args.tower, "mode": args.mode,
                    "precision": args.precision, "pairs_per_step": len(labels), "patches_per_step": len(patches),
                    "step_s": round(seconds, 4), "pairs_per_s": round(len(labels) / seconds, 1),
                    "patches_per_s": round(len(patches) / seconds, 1)}))


if __name__ == "__main__":
  main()
