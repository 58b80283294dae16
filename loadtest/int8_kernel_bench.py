"""The int8 and int4 projection kernels against float32, with the weights streamed from memory.

``python -m loadtest.int8_kernel_bench [--rows 1 2 16 ...] [--layers 30] [--threads 1]``

One pass runs every projection of ``--layers`` decoder layers shaped like SmolLM2-135M's
(fused q/k/v 576->960, o 576->576, fused gate/up 576->3072, down 1536->576), each layer with
weights of its own, so that (as in a decode step) every weight comes from DRAM rather than
a cache; the vocabulary head (49152 x 576) is timed alone. Contenders: the float32 weight
packed for oneDNN (what the float32 engine runs), ``aten._weight_int8pack_mm`` on bfloat16
activations and our int8 kernel (``services/engine/narrow_int8.c``); then the same weights as
group-wise int4 (groups of 32): ``aten._weight_int4pack_mm_for_cpu`` and our int4 kernel. Best
of ``--repeats``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from services.engine.models.narrow_native import (
    int4_matmul,
    int8_matmul,
    native_kernels_available,
    pack_int4_codes,
)

LAYER_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (out, in)
HEAD_SHAPE = (49152, 576)
KERNELS = ("float32", "int8pack", "ours", "int4pack", "ours_int4")
INT4_GROUP = 32


class Projection:
    def __init__(self, out_features: int, in_features: int, generator: torch.Generator) -> None:
        weight = torch.randn(out_features, in_features, generator=generator) * 0.05
        self.scale = weight.abs().amax(dim=1) / 127
        self.codes = torch.round(weight / self.scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
        self.scale_bf16 = self.scale.to(torch.bfloat16)
        groups = weight.reshape(out_features, in_features // INT4_GROUP, INT4_GROUP)
        self.group_scale = (groups.abs().amax(dim=-1) / 7).contiguous()  # [out, groups]
        codes4 = (
            torch.round(groups / self.group_scale[..., None]).clamp(-8, 7).reshape(out_features, in_features)
        )
        self.nibbles = pack_int4_codes(codes4.to(torch.int8))
        self.int4_tiles = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes4 + 8).to(torch.int32), 1)
        scale_t = self.group_scale.t().to(torch.bfloat16)
        self.scale_and_zero = torch.stack([scale_t, torch.zeros_like(scale_t)], dim=-1).contiguous()

    def float32(self, x: torch.Tensor) -> None:
        torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def int8pack(self, x: torch.Tensor) -> None:
        torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.codes, self.scale_bf16)

    def ours(self, x: torch.Tensor) -> None:
        int8_matmul(x, self.codes, self.scale)

    def int4pack(self, x: torch.Tensor) -> None:
        torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), self.int4_tiles, INT4_GROUP, self.scale_and_zero
        )

    def ours_int4(self, x: torch.Tensor) -> None:
        int4_matmul(x, self.nibbles, self.group_scale, INT4_GROUP)


def best_ms(modules: list[Projection], kernel: str, inputs: dict[int, torch.Tensor], repeats: int) -> float:
    """The fastest of ``repeats`` passes of ``kernel`` over ``modules`` (after one warm pass)."""

    def one_pass() -> None:
        for module in modules:
            getattr(module, kernel)(inputs[module.codes.shape[1]])

    one_pass()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.int8_kernel_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 16, 64, 256])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not native_kernels_available():
        print("the native kernels could not be built here (no C compiler?)")
        return 1
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    layers = [[Projection(o, i, generator) for o, i in LAYER_SHAPES] for _ in range(args.layers)]
    head = Projection(*HEAD_SHAPE, generator)
    weights_m = sum(o * i for o, i in LAYER_SHAPES) * args.layers / 1e6
    print(
        f"{args.layers} layers of projections ({weights_m:.0f} M weights), "
        f"{args.threads} thread(s), ms per pass"
    )
    print(
        f"{'rows':>5} {'part':>12} "
        + " ".join(f"{name:>9}" for name in KERNELS)
        + "  ours/f32 ours/i8pk i4/i4pk"
    )
    for rows in args.rows:
        inputs = {i: torch.randn(rows, i, generator=generator) for _, i in (*LAYER_SHAPES, HEAD_SHAPE)}
        for part, modules in (("projections", [p for layer in layers for p in layer]), ("head", [head])):
            ms = {kernel: best_ms(modules, kernel, inputs, args.repeats) for kernel in KERNELS}
            print(
                f"{rows:>5} {part:>12} "
                + " ".join(f"{ms[kernel]:9.2f}" for kernel in KERNELS)
                + f"  {ms['float32'] / ms['ours']:9.2f}x {ms['int8pack'] / ms['ours']:9.2f}x"
                + f" {ms['int4pack'] / ms['ours_int4']:9.2f}x"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
