"""The commit row rule, written once: which slot a commit row writes, which step it takes, what it tracks.

Every commit kernel (the word copies of ``core.kernels``, the converting commits of
``precision.commit_kernels``, the 8-bit commits of ``precision.quant8_kernels``, the replay kernels and
the checkpoint counters) decides a row's fate with these device functions, so the row rule of the
contract (the scatter, tree, replay and checkpoint commits, tracking, padding) has one device-side
statement, beside its NumPy statement in ``core.numpy_backend`` and ``replay.reference``:

```text
row b:  a = accept_lengths[b]
        steps      1 <= a <= max_accept              (accepted_steps; a tree: last_tree_node / tree_steps)
        slot       state_indices[b] (or b) in [0, B)  (row_slot)
        tracked    0 <= t < min(a, V), 0 <= e < P     (tracked_step; a padding row tracks nothing)
```

A row outside the rule commits nothing, whatever its values (any int32 is safe to pass). Compare
int32 values before doing arithmetic on them: ``INT32_MIN - 1`` must not wrap to a valid step.
Every function is ``inline="always"``: it compiles into the caller's kernel as if written there.
"""

from __future__ import annotations

from numba import cuda

from .checks import pad_slot_id

__all__ = ["accepted_steps", "is_padding", "last_tree_node", "row_slot", "tracked_step", "tree_steps"]


@cuda.jit(device=True, inline="always")
def accepted_steps(accept_lengths, row, max_accept):
    """``a = accept_lengths[row]`` if ``1 <= a <= max_accept``, else 0 (the row commits nothing)."""
    accepted = accept_lengths[row]
    if accepted < 1 or accepted > max_accept:
        return 0
    return accepted


@cuda.jit(device=True, inline="always")
def row_slot(state_indices, use_indices, row, slots):
    """The row's slot, ``state_indices[row]`` (``use_indices``) or ``row``, or -1 outside ``[0, slots)``."""
    slot = state_indices[row] if use_indices else row
    if slot < 0 or slot >= slots:
        return -1
    return slot


@cuda.jit(device=True, inline="always")
def is_padding(state_indices, use_indices, row):
    """True for a padding row: its slot is ``pad_slot_id`` (it reads, writes and tracks nothing)."""
    if use_indices:
        return state_indices[row] == pad_slot_id
    return False


@cuda.jit(device=True, inline="always")
def last_tree_node(node_ids, accept_lengths, row, seq_len):
    """``(node, depth)`` a tree row commits, or ``(-1, -1)``.

    ``node`` is the last non-negative id of ``node_ids[row, :min(a, M)]`` and ``depth`` its index
    (the state after ``depth + 1`` accepted tokens); the row commits nothing when there is none or
    ``node >= seq_len``. Every block of the row scans the row's ``M`` ids itself (M is a handful).
    """
    count = accept_lengths[row]
    if count > node_ids.shape[1]:
        count = node_ids.shape[1]
    node = -1
    depth = -1
    for j in range(count):  # count <= 0: no iterations
        candidate = node_ids[row, j]
        if candidate >= 0:
            node = candidate
            depth = j
    if node < 0 or node >= seq_len:
        return -1, -1
    return node, depth


@cuda.jit(device=True, inline="always")
def tree_steps(node_ids, accept_lengths, row, seq_len):
    """Steps a tree row replays (the replay commit's tree rule), or 0.

    ``min(a, M)`` when that is at least 1 and every one of ``node_ids[row, :min(a, M)]`` is in
    ``[0, seq_len)``, else 0.
    """
    count = accept_lengths[row]
    if count > node_ids.shape[1]:
        count = node_ids.shape[1]
    if count < 1:
        return 0
    for t in range(count):
        node = node_ids[row, t]
        if node < 0 or node >= seq_len:
            return 0
    return count


@cuda.jit(device=True, inline="always")
def tracked_step(track_steps, track_entries, row, accepted, seq_len, entries):
    """``(t, e)`` of a tracked row, or ``(-1, -1)``.

    ``t = track_steps[row]`` with ``0 <= t < accepted`` and ``t < seq_len``, ``e = track_entries[row]``
    in ``[0, entries)``.

    The caller adds the padding rule (`is_padding`) where the row's slot is not otherwise checked.
    """
    step = track_steps[row]
    entry = track_entries[row]
    if step < 0 or step >= accepted or step >= seq_len or entry < 0 or entry >= entries:
        return -1, -1
    return step, entry
