"""Is tree verification exact here? The start-up check, run on exactly the shapes the decode loop uses.

A speculative step computes the logits of a token inside one pass over root + tree (a tree mask, a pass of
some width, after a prefix of some length); plain decoding computes the same logits one token per pass.
Speculation is lossless when the two agree. The check builds branching trees for each pass size the loop
will run (each fixed width, or a spread of sizes up to the largest budget), after several prefix lengths,
and compares every row on two root-to-leaf paths (the first and the deepest) with plain decoding of that
path through the same verifier (the plain loop's own passes, padded the same way).

Verdict: *exact* when every compared row has the same argmax and the largest logit difference is within
the mode's tolerance: 1e-3 in fp32 (measured rows differ by ~5e-5 on CPUs and GPUs), 0 (bitwise) for
half-precision modes, where any difference is a rounding that can flip a near-tie. A mode that is not exact
may serve plain decoding, never speculation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from aded_ray.draft.tree import DraftTree

TOLERANCE = {"fp32": 1e-3, "fp32-packed": 1e-3, "fp32-mkl": 1e-3, "bf16": 0.0, "bf16-packed": 0.0, "fp16": 0.0}


@dataclass
class ExactnessReport:
    mode: str
    tolerance: float
    max_diff: float = 0.0
    argmax_mismatches: int = 0
    rows_compared: int = 0
    shapes: list = field(default_factory=list)    # [pass tokens, prefix length, max diff, mismatches]

    @property
    def exact(self) -> bool:
        return self.argmax_mismatches == 0 and self.max_diff <= self.tolerance

    @property
    def bitwise(self) -> bool:
        """Every compared row equal to plain decoding's bit for bit (what the invariant attention gives)."""
        return self.argmax_mismatches == 0 and self.max_diff == 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "exact": self.exact, "bitwise": self.bitwise}

    def summary(self) -> str:
        return (f"mode {self.mode}: {self.rows_compared} rows over {len(self.shapes)} shapes, max logit diff "
                f"{self.max_diff:.3g} (tolerance {self.tolerance:g}), argmax mismatches {self.argmax_mismatches}"
                f"{', bit for bit' if self.bitwise else ''}")


def branching_tree(n_nodes: int) -> np.ndarray:
    """Parents of a branching breadth-first tree: three children of the root, then two per node.

    >>> branching_tree(7).tolist()
    [-1, -1, -1, 0, 0, 1, 1]
    """
    return np.array([-1 if i < 3 else (i - 3) // 2 for i in range(n_nodes)], np.int32)


def check_shapes(widths=(), max_nodes: int = 63, prefixes=(37, 133)) -> list[tuple[int, int]]:
    """(pass size = root + nodes, prefix length) pairs to check: each fixed width full and half full, else a
    small and the largest pass the budget allows; every size after the first prefix, the largest also after
    the others (the check costs ~3 passes of each size per compared path: it must stay quick on CPUs).

    >>> check_shapes((64,))
    [(33, 37), (64, 37), (64, 133)]
    >>> check_shapes((), 15)
    [(8, 37), (16, 37), (16, 133)]
    """
    sizes = sorted({s for w in widths for s in (w, w // 2 + 1)} if widths else {min(8, max_nodes + 1), max_nodes + 1})
    return [(s, prefixes[0]) for s in sizes] + [(sizes[-1], L) for L in prefixes[1:]]


def _path_to(parents: np.ndarray, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = int(parents[node])
    return path[::-1]


@torch.inference_mode()
def check_exactness(make_verifier, mode: str, shapes=((8, 37), (64, 37), (64, 133)), *, vocab: int = 30000,
                    tolerance: float | None = None) -> ExactnessReport:
    """Compare tree passes with plain decoding for every (pass size, prefix length); see the module doc."""
    rep = ExactnessReport(mode, TOLERANCE.get(mode, 0.0) if tolerance is None else tolerance)
    v = make_verifier()
    for size, L in shapes:
        prefix = [(1000 + 37 * i + 11 * size) % vocab for i in range(L)]
        parents = branching_tree(size - 1)
        tokens = np.array([(2000 + 91 * i + 7 * L) % vocab for i in range(size - 1)], np.int32)
        root = (3000 + L) % vocab
        v.prefill(prefix)
        tree_rows = v.forward_tree(root, DraftTree(tokens, parents)).float()
        diff, bad, rows = 0.0, 0, 0
        leaves = sorted({0, size - 2}) if size > 1 else []
        for leaf in leaves or [None]:
            path = [] if leaf is None else _path_to(parents, leaf)
            v.prefill(prefix)
            for row, tok in zip([0] + [i + 1 for i in path], [root] + [int(tokens[i]) for i in path]):
                plain = v.forward_tree(tok, DraftTree())[0].float()
                v.commit([0])
                d = (tree_rows[row] - plain).abs().max()
                same = tree_rows[row].argmax() == plain.argmax()
                diff, bad, rows = max(diff, float(d)), bad + int(not bool(same)), rows + 1
        rep.shapes.append([size, L, diff, bad])
        rep.max_diff, rep.argmax_mismatches = max(rep.max_diff, diff), rep.argmax_mismatches + bad
        rep.rows_compared += rows
    return rep
