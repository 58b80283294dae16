"""The offline optimizer: quantize a checkpoint, prove the variant against its source, publish it.

Numerics (recipes, writer, gate) are plain PyTorch; only ``actor`` knows Ray.
"""
