#!/usr/bin/env python3
"""Build the golden fixture that `coordinator/tests/dualpipe_reference.rs` checks flotilla's
DualPipe and DualPipeV schedule compiler (`coordinator/src/schedule/generate.rs`) against:
the order of compute ops on every rank, as DeepSeek's reference (deepseek-ai/DualPipe,
`dualpipe/dualpipe.py` and `dualpipe/dualpipev.py`) runs them. Not run by CI; the fixture it
writes is committed.

Nothing of the reference is copied into this repository: the script imports the
reference's own modules from a checkout given on the command line, and runs the REAL
`DualPipe.step()` / `DualPipeV.step()` once per rank, in one CPU process, without GPUs,
models or `torch.distributed`:

- an instance is made with `object.__new__(cls)` (plus `nn.Module.__init__`, so attributes
  can be set), and given the attributes `step()` and its chunk helpers read (rank,
  num_ranks, is_first_rank, is_last_rank, is_in_second_half, is_middle_rank,
  first/prev/next/last rank, group, batch_dim, ...), with the values the reference's
  `__init__` derives for the identity rank mapping;
- the compute primitives (`_forward_compute_chunk`, `_backward_compute_chunk`,
  `_forward_backward_compute_chunk`) are replaced by recorders that advance the reference's
  own chunk counters (`current_f_chunk_id` / `current_b_chunk_id`, indexed by
  `phase ^ is_in_second_half` for DualPipe, by `phase` for DualPipeV) exactly as the
  originals do, and record which chunk they would compute;
- the communication primitives (`_recv_forward`, `_send_forward`, `_recv_backward`,
  `_send_backward`, `_commit_and_wait_comm`) are replaced by no-ops;
- the reference's own `WeightGradStore` is kept: a zero-bubble backward (`enable_zb=True`)
  `put`s one function that records "W of this chunk" while `WeightGradStore.enabled`, then
  `flush`es, and the unmodified `_weight_chunk` `pop`s the store's FIFO queue, which runs it;
  so each W names the chunk whose deferred weight gradient the reference computes there;
- `comm.TENSOR_SHAPES` / `comm.TENSOR_DTYPE` are set through the reference's setters (only
  `step()`'s assertion reads them); the reference's `scatter` runs on empty inputs.

Each recorded op is translated into flotilla's numbering (`coordinator/src/schedule`):
- DualPipe, N ranks, C micro-batches: direction d = phase ^ is_in_second_half; chunk k of
  direction d is micro-batch k + d·C/2; direction 0 runs stage `rank`, direction 1 stage
  N−1−rank (flotilla's `pp` = N stages);
- DualPipeV, N ranks, C micro-batches: phase p on rank r runs stage r (p = 0) or 2N−1−r
  (p = 1); chunk k is micro-batch k (flotilla's `pp` = 2N stages).

Ops: `{"op": "F", "mb", "stage"}` a forward; `{"op": "B", ...}` an input-gradient backward
whose W is deferred (`enable_zb=True`); `{"op": "BW", ...}` a full backward
(`enable_zb=False`); `{"op": "W", ...}` the deferred weight gradient popped from the queue;
`{"op": "F&B", "forward": {"mb", "stage"}, "backward": {"mb", "stage"}}` a
`_forward_backward_compute_chunk` (whose backward is a full one). The middle ranks' first
main-loop pair, which the reference does not overlap, records as F then BW.

The fixture is a JSON list of cases, `{"kind": "dualpipe" | "dualpipev", "ranks": N,
"micro_batches": C, "streams": [[ops of rank 0], [ops of rank 1], ...]}`, for DualPipe
N ∈ {2, 4, 6, 8} × C ∈ {2N, 2N+4} and DualPipeV N ∈ {1, 2, 3, 4} × C ∈ {2N, 2N+3}.

Needs torch (CPU is enough) only because the reference imports it; the venv of
`hf_reference.py` has it. Run from the repository root:

    # a checkout (a directory holding dualpipe/*.py):
    tools/.venv-hf/bin/python tools/dualpipe_reference.py \\
        --reference PATH/TO/DualPipe --out coordinator/tests/fixtures/dualpipe_reference.json
    # or a (bare) git repository of deepseek-ai/DualPipe, read with `git show REV:dualpipe/…`:
    tools/.venv-hf/bin/python tools/dualpipe_reference.py \\
        --git-dir PATH/TO/DualPipe.git [--rev HEAD] --out coordinator/tests/fixtures/dualpipe_reference.json

`--check` builds everything and compares it with the file at `--out` instead of writing it.
The fixture committed was built from deepseek-ai/DualPipe at commit
3da1bbea53606543d7f5f232338fc58096db30e3.
"""

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile

DUALPIPE_CASES = [(n, c) for n in (2, 4, 6, 8) for c in (2 * n, 2 * n + 4)]
DUALPIPEV_CASES = [(n, c) for n in (1, 2, 3, 4) for c in (2 * n, 2 * n + 3)]
REFERENCE_FILES = ("__init__.py", "comm.py", "utils.py", "dualpipe.py", "dualpipev.py")


def extract_from_git(git_dir, rev, dest):
    """Writes `dualpipe/*.py` of `rev` in `git_dir` under `dest`; returns the commit id."""
    commit = subprocess.run(
        ["git", "--git-dir", git_dir, "rev-parse", f"{rev}^{{commit}}"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    os.makedirs(os.path.join(dest, "dualpipe"))
    for name in REFERENCE_FILES:
        text = subprocess.run(
            ["git", "--git-dir", git_dir, "show", f"{commit}:dualpipe/{name}"],
            check=True, capture_output=True,
        ).stdout
        with open(os.path.join(dest, "dualpipe", name), "wb") as f:
            f.write(text)
    return commit


def import_reference(path):
    """Imports the reference package `dualpipe` from the directory `path`."""
    if not os.path.isfile(os.path.join(path, "dualpipe", "dualpipe.py")):
        sys.exit(f"{path}: no dualpipe/dualpipe.py (pass a checkout of deepseek-ai/DualPipe, or --git-dir)")
    sys.path.insert(0, os.path.abspath(path))
    pkg = importlib.import_module("dualpipe")
    where = os.path.dirname(os.path.abspath(pkg.__file__))
    if where != os.path.join(os.path.abspath(path), "dualpipe"):
        sys.exit(f"imported dualpipe from {where}, not from {path}")
    return pkg


class Recorder:
    """Translates the reference's (phase, chunk id) into flotilla's (micro-batch, stage) and
    collects one rank's compute ops."""

    def __init__(self, kind, num_ranks, num_chunks, rank):
        self.kind, self.n, self.c, self.rank = kind, num_ranks, num_chunks, rank
        self.ops = []

    def chunk(self, index, chunk_id):
        """`index` is the reference's counter index: the direction for DualPipe
        (phase ^ is_in_second_half), the phase for DualPipeV."""
        n, c, r = self.n, self.c, self.rank
        if self.kind == "dualpipe":
            assert 0 <= chunk_id < c // 2, (self.kind, n, c, r, index, chunk_id)
            return {"mb": chunk_id + index * (c // 2), "stage": r if index == 0 else n - 1 - r}
        assert 0 <= chunk_id < c, (self.kind, n, c, r, index, chunk_id)
        return {"mb": chunk_id, "stage": r if index == 0 else 2 * n - 1 - r}


def recording_class(ref, cls, kind):
    """A subclass of the reference's `cls` whose compute and communication primitives are
    replaced; `step()` and every other method are the reference's own."""
    import torch

    WeightGradStore = ref.WeightGradStore

    def counter_index(self, phase):
        return phase ^ self.is_in_second_half if kind == "dualpipe" else phase

    def record_loss(self, d):
        """The last stage's forward appends its loss (`step()` stacks them at the end)."""
        if kind == "dualpipe":
            is_last_stage = (self.is_first_rank and d == 1) or (self.is_last_rank and d == 0)
        else:
            is_last_stage = self.is_first_rank and d == 1
        if is_last_stage and self.criterion is not None:
            self.loss_chunks.append(torch.zeros(()))

    def _forward_compute_chunk(self, phase):
        d = counter_index(self, phase)
        chunk_id = self.current_f_chunk_id[d]
        self.current_f_chunk_id[d] += 1
        self.recorder.ops.append({"op": "F", **self.recorder.chunk(d, chunk_id)})
        record_loss(self, d)

    def _backward_compute_chunk(self, phase, enable_zb=False):
        if self.forward_only:
            return
        d = counter_index(self, phase)
        chunk_id = self.current_b_chunk_id[d]
        self.current_b_chunk_id[d] += 1
        chunk = self.recorder.chunk(d, chunk_id)
        self.recorder.ops.append({"op": "B" if enable_zb else "BW", **chunk})
        # What the real backward does to the store: weight-gradient functions are queued
        # only while `enabled`, and a zero-bubble backward flushes them as one queue entry.
        WeightGradStore.enabled = enable_zb
        if WeightGradStore.enabled:
            ops = self.recorder.ops
            WeightGradStore.put(lambda: ops.append({"op": "W", **chunk}))
        WeightGradStore.enabled = False
        if enable_zb:
            WeightGradStore.flush()

    def _forward_backward_compute_chunk(self, phase0, phase1):
        assert not self.forward_only
        d0 = counter_index(self, phase0)
        chunk_id0 = self.current_f_chunk_id[d0]
        self.current_f_chunk_id[d0] += 1
        d1 = counter_index(self, phase1)
        chunk_id1 = self.current_b_chunk_id[d1]
        self.current_b_chunk_id[d1] += 1
        self.recorder.ops.append({
            "op": "F&B",
            "forward": self.recorder.chunk(d0, chunk_id0),
            "backward": self.recorder.chunk(d1, chunk_id1),
        })
        record_loss(self, d0)

    def no_comm(self, *args, **kwargs):
        pass

    return type(f"Recording{cls.__name__}", (cls,), {
        "_forward_compute_chunk": _forward_compute_chunk,
        "_backward_compute_chunk": _backward_compute_chunk,
        "_forward_backward_compute_chunk": _forward_backward_compute_chunk,
        "_recv_forward": no_comm,
        "_send_forward": no_comm,
        "_recv_backward": no_comm,
        "_send_backward": no_comm,
        "_commit_and_wait_comm": no_comm,
    })


def run_rank(ref, kind, num_ranks, num_chunks, rank):
    """Runs the reference's `step()` for `rank` and returns its compute ops."""
    import torch

    cls = recording_class(ref, ref.DualPipe if kind == "dualpipe" else ref.DualPipeV, kind)
    self = object.__new__(cls)
    torch.nn.Module.__init__(self)
    # The attributes the reference's __init__ derives, for the identity rank mapping.
    self.module = None
    self.overlapped_forward_backward = True
    self.batch_dim = 0
    self.group = None
    self.num_ranks = num_ranks
    self.rank = rank
    inverse = list(range(num_ranks)) + [None]
    self.prev_rank = inverse[rank - 1]
    self.next_rank = inverse[rank + 1]
    self.is_first_rank = rank == 0
    self.is_last_rank = rank == num_ranks - 1
    if kind == "dualpipe":
        self.first_rank = inverse[0]
        self.last_rank = inverse[num_ranks - 1]
        self.is_in_second_half = rank >= num_ranks // 2
        self.is_middle_rank = rank in (num_ranks // 2 - 1, num_ranks // 2)
    self.recorder = Recorder(kind, num_ranks, num_chunks, rank)

    def criterion(*args):
        raise AssertionError("the compute primitives are replaced; the criterion is never called")

    with torch.enable_grad():
        loss, outputs = self.step(num_chunks=num_chunks, criterion=criterion)
    assert outputs is None
    # The losses of the micro-batches that end on this rank, as `step()` returns them.
    if kind == "dualpipe":
        losses = num_chunks // 2 if rank in (0, num_ranks - 1) else 0
    else:
        losses = num_chunks if rank == 0 else 0
    assert (0 if loss is None else len(loss)) == losses, (kind, num_ranks, num_chunks, rank, loss)
    assert ref.WeightGradStore.funcs_queue.empty() and not ref.WeightGradStore.cache
    return self.recorder.ops


def check_case(kind, n, c, streams):
    """Every chunk a rank hosts is run forward once and backward once (B then W, or BW),
    and no rank runs a chunk it does not host."""
    for rank, ops in enumerate(streams):
        if kind == "dualpipe":
            hosted = {(m, rank if m < c // 2 else n - 1 - rank) for m in range(c)}
        else:
            hosted = {(m, s) for m in range(c) for s in (rank, 2 * n - 1 - rank)}
        fwd, bwd, b_only, w = [], [], [], []
        for op in ops:
            if op["op"] == "F&B":
                fwd.append(op["forward"])
                bwd.append(op["backward"])
                continue
            key = {"F": fwd, "BW": bwd, "B": bwd, "W": w}[op["op"]]
            key.append(op)
            if op["op"] == "B":
                b_only.append(op)
        as_set = lambda xs: [(x["mb"], x["stage"]) for x in xs]
        for name, xs in (("forward", fwd), ("backward", bwd)):
            got = as_set(xs)
            assert sorted(got) == sorted(hosted), f"{kind} N={n} C={c} rank {rank}: {name} chunks {got}"
        assert as_set(w) == as_set(b_only), f"{kind} N={n} C={c} rank {rank}: W order vs B order"


def build(ref):
    ref.set_p2p_tensor_shapes([(1,)])
    import torch
    ref.set_p2p_tensor_dtype(torch.float32)
    cases = []
    for kind, grid in (("dualpipe", DUALPIPE_CASES), ("dualpipev", DUALPIPEV_CASES)):
        for n, c in grid:
            streams = [run_rank(ref, kind, n, c, r) for r in range(n)]
            check_case(kind, n, c, streams)
            cases.append({"kind": kind, "ranks": n, "micro_batches": c, "streams": streams})
    return cases


def dump(cases):
    """Compact JSON with one rank's stream per line."""
    dumps = lambda v: json.dumps(v, separators=(",", ":"))
    lines = ["["]
    for i, case in enumerate(cases):
        head = dumps({k: v for k, v in case.items() if k != "streams"})[:-1]
        lines.append(f"{head},\"streams\":[")
        for r, ops in enumerate(case["streams"]):
            lines.append(dumps(ops) + ("," if r + 1 < len(case["streams"]) else ""))
        lines.append("]}" + ("," if i + 1 < len(cases) else ""))
    lines.append("]")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--reference", help="a directory holding the reference's dualpipe/*.py")
    source.add_argument("--git-dir", help="a git repository of deepseek-ai/DualPipe (bare is fine)")
    parser.add_argument("--rev", default="HEAD", help="with --git-dir: the revision to read (default HEAD)")
    parser.add_argument("--out", default="coordinator/tests/fixtures/dualpipe_reference.json")
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.git_dir:
            commit = extract_from_git(args.git_dir, args.rev, tmp)
            print(f"reference: {args.git_dir} at {commit}", file=sys.stderr)
            ref = import_reference(tmp)
        else:
            print(f"reference: {args.reference}", file=sys.stderr)
            ref = import_reference(args.reference)
        text = dump(build(ref))

    if args.check:
        with open(args.out) as f:
            same = f.read() == text
        print(f"{args.out}: {'up to date' if same else 'DIFFERS'}", file=sys.stderr)
        sys.exit(0 if same else 1)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out} ({len(text)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
