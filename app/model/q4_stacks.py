"""The 4-bit weights the CPU path reads together (q/k/v, gate/up), stacked before they are first read.

The one-token step reads q, k and v (and gate and up) with one gemv each (`host_exec.stack_q4`), so their
4-bit codes, scales and biases must lie in one array each. Stacked after loading, that was a copy of ~70 MB
for the embedded model: fresh memory, whose page faults cost ~0.1 s of CPU at every start on the 2-core
VMs, with the per-projection arrays kept beside it. `stack_lazily` instead concatenates the projections'
*lazily loaded* arrays and makes each projection's parameters row slices (views) of the stack; when the
model is evaluated, the weights file is read into the stacks (the projections' loaded parts are freed as
each concatenation is done, and MLX hands their buffers to the next layer's, of the same sizes), so a start
touches about the model's size of fresh memory once and keeps one copy of each weight. The values are the loaded arrays'
exactly, so every result is bitwise what copying gave (tests/test_q4_stacks.py).

On a model that is already evaluated, stacking is a copy, as before (the projections' old buffers are
freed once nothing refers to them).
"""

from __future__ import annotations

import mlx.core as mx

PARTS = ("weight", "scales", "biases")


class Stack:
    """The stacked codes, scales and biases of `n` projections, in their order (rows concatenated)."""

    def __init__(self, weight: mx.array, scales: mx.array, biases: mx.array, n: int):
        self.weight, self.scales, self.biases, self.n = weight, scales, biases, n


def stackable(parts: list) -> bool:
    """Can `parts` (quantized linears) be stacked: same input width, bits and group size, no bias?"""
    first = parts[0]
    return all(
        all(name in p for name in PARTS) and "bias" not in p
        and p.bits == first.bits and p.group_size == first.group_size
        and getattr(p, "mode", "affine") == "affine"
        and all(p[name].shape[1:] == first[name].shape[1:] and p[name].dtype == first[name].dtype for name in PARTS)
        for p in parts
    )


def stack_lazily(parts: list) -> Stack:
    """Stack `parts`' weight/scales/biases (see the module docstring) and make each part's parameters views of it.

    Nothing is evaluated here: on a lazily loaded model the stack is what the file is read into."""
    stacked = {name: mx.concatenate([p[name] for p in parts]) for name in PARTS}
    stack = Stack(stacked["weight"], stacked["scales"], stacked["biases"], len(parts))
    row = 0
    for i, p in enumerate(parts):
        rows = p.weight.shape[0]
        for name in PARTS:
            setattr(p, name, stacked[name][row:row + rows])
        object.__setattr__(p, "_stack", (stack, i))
        row += rows
    return stack


def stack_of(parts: list) -> Stack | None:
    """The stack `parts` were made into, when they are all of it in its order (else None)."""
    marks = [p.__dict__.get("_stack") for p in parts]
    if marks[0] is None:
        return None
    stack = marks[0][0]
    if stack.n != len(parts) or any(m is None or m[0] is not stack or m[1] != i for i, m in enumerate(marks)):
        return None
    return stack
