"""What the runner keeps about each request across steps (vLLM's InputBatch, reduced to the
parts that change rarely): its block table and its sampler constants, in NumPy rows.

Host-only module: NumPy, never ``jax``. A step looks its requests' rows up and gathers them,
instead of flattening every request's block-id list and stacking every request's constants
again (at batch 256: ~0.15 ms and ~0.1 ms a step).

Invariants:
  * A request holds a row from the first step that schedules it until ``release`` (the
    runner releases the requests each scheduler output reports finished or preempted).
  * ``block_table[row, :num_blocks[row]]`` equals the request's block table as last
    scheduled, and the rest of the row is ``NULL_BLOCK_ID``. A running request's table only
    grows, so a step writes only the new tail; an admitted request (first time or resumed
    after preemption) starts its row afresh, so a missed release never leaves a stale table.
  * ``constants[row]`` is valid once ``has_constants[row]``; they never change while the row
    is held (a request's sampling parameters are fixed).
"""

from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from jaxpaged.block_manager import NULL_BLOCK_ID


class ScheduledRow(Protocol):  # what is read of a jaxpaged.scheduler.ScheduledRequest
    request_id: str
    block_ids: list[int]
    admitted: bool


class HasSamplerConstants(Protocol):  # a jaxpaged.sampling_params.SamplingParams
    sampler_constants: tuple[float, ...]


class InputBatch:
    def __init__(self, max_blocks_per_seq: int, num_constants: int, capacity: int = 256):
        if max_blocks_per_seq < 1 or num_constants < 1 or capacity < 1:
            raise ValueError(f"max_blocks_per_seq, num_constants and capacity must be >= 1, "
                             f"got {max_blocks_per_seq}, {num_constants}, {capacity}")
        self.block_table = np.full((capacity, max_blocks_per_seq), NULL_BLOCK_ID, np.int32)
        self.constants = np.zeros((capacity, num_constants), np.float64)
        # Python lists: read once per request per step, where a NumPy scalar read costs more.
        self.num_blocks: list[int] = [0] * capacity
        self.has_constants: list[bool] = [False] * capacity
        self._row_of: dict[str, int] = {}
        self._free_rows = list(range(capacity - 1, -1, -1))

    @property
    def num_rows_held(self) -> int:
        return len(self._row_of)

    def release(self, request_ids: Iterable[str]) -> None:
        """Give back the rows of requests that finished or were preempted (unknown ids are
        ignored: a request may finish before any step scheduled it)."""
        for request_id in request_ids:
            row = self._row_of.pop(request_id, None)
            if row is not None:
                self._free_rows.append(row)

    def rows(self, scheduled: Sequence[ScheduledRow]) -> list[int]:
        """Each scheduled request's row, its block table brought up to date."""
        row_of, num_blocks = self._row_of, self.num_blocks  # lists grow in place
        rows = []
        for s in scheduled:
            row = row_of.get(s.request_id)
            if row is None or s.admitted:
                row = self._fresh_row(s.request_id, row)
            blocks, known = s.block_ids, num_blocks[row]
            if len(blocks) != known:
                table = self.block_table  # not hoisted: _fresh_row may have grown it
                if len(blocks) < known:  # never for a running request; be safe anyway
                    table[row] = NULL_BLOCK_ID
                    known = 0
                if len(blocks) > table.shape[1]:  # the scheduler caps requests at max_model_len
                    raise ValueError(f"request {s.request_id!r} holds {len(blocks)} KV blocks; "
                                     f"a block table has room for {table.shape[1]}")
                table[row, known:len(blocks)] = blocks[known:]
                num_blocks[row] = len(blocks)
            rows.append(row)
        return rows

    def block_tables(self, rows: Sequence[int], num_seqs: int) -> tuple[np.ndarray, np.ndarray]:
        """(i32[num_seqs, max_blocks_per_seq] block tables padded with null rows, i32[n] the
        number of blocks of each of the n real rows)."""
        tables = np.full((num_seqs, self.block_table.shape[1]), NULL_BLOCK_ID, np.int32)
        lens = np.fromiter(map(self.num_blocks.__getitem__, rows), np.int32, len(rows))
        if rows:  # only the columns some row uses: the rest is null in both
            width = int(lens.max())
            tables[:len(rows), :width] = self.block_table[rows, :width]
        return tables, lens

    def sampler_constants(self, rows: Sequence[int], params: Sequence[HasSamplerConstants]
                          ) -> np.ndarray:
        """f64[len(rows), num_constants]: each row's constants, taken from its params' (a
        SamplingParams) `sampler_constants` the first time the row asks."""
        constants, has_constants = self.constants, self.has_constants
        for row, p in zip(rows, params):
            if not has_constants[row]:
                constants[row] = p.sampler_constants
                has_constants[row] = True
        return constants[list(rows)]

    def _fresh_row(self, request_id: str, row: int | None) -> int:
        if row is None:
            if not self._free_rows:
                self._grow()
            row = self._free_rows.pop()
            self._row_of[request_id] = row
        self.block_table[row] = NULL_BLOCK_ID
        self.num_blocks[row] = 0
        self.has_constants[row] = False
        return row

    def _grow(self) -> None:
        old = self.block_table.shape[0]
        self.block_table = np.concatenate([self.block_table,
                                           np.full_like(self.block_table, NULL_BLOCK_ID)])
        self.constants = np.concatenate([self.constants, np.zeros_like(self.constants)])
        self.num_blocks += [0] * old
        self.has_constants += [False] * old
        self._free_rows.extend(range(2 * old - 1, old - 1, -1))
