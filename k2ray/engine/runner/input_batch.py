"""The persistent input batch (vLLM's InputBatch): one row per request the model runner holds, kept in
preallocated buffers that are updated in place as requests join and leave: block tables on the host, sampling
parameters and penalty counts on the device. A step writes its inputs into one host staging buffer (pinned on
CUDA) with tensor ops (positions and slot mapping are gathers, not Python loops over tokens) and moves them with
one non-blocking copy; buffers double when a step or a row outgrows them."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from k2ray.engine.outputs import ScheduledSequence
from k2ray.engine.runner.penalty_counts import PenaltyCounts
from k2ray.engine.runner.sampler import SamplingMetadata, has_penalty, penalty_inputs, samples_greedily
from k2ray.model.attention_metadata import AttentionMetadata
from k2ray.sampling_params import SamplingParams

INITIAL_NUM_ROWS = 16
INITIAL_NUM_BLOCKS_PER_ROW = 16
INITIAL_STAGING_SIZE = 4096
# Columns of the per-row sampling parameters (one float32 row per request, written once when it joins).
TEMPERATURE, TOP_K, TOP_P, MIN_P, PRESENCE, FREQUENCY, REPETITION = range(7)
NUM_PARAM_COLUMNS = 7


@dataclass(frozen=True, slots=True)
class StepInputs:
    """One step's model inputs (views of the batch's device buffer: valid until the next step's prepare)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64, the last token of each sampled sequence
    sampled_rows: torch.Tensor  # [S] int64, their batch rows
    random_positions: torch.Tensor  # [R] int64, which of the S are sampled at a temperature
    sampled_ids: list[str]
    sampled_row_ids: list[int]
    random_position_ids: list[int]  # random_positions on the host


class InputBatch:
    """Rows of the requests a model runner holds; `prepare_inputs` and `sampling_metadata` turn a step's
    ScheduledSequences into model and sampler inputs."""

    def __init__(self, block_size: int, vocab_size: int, device: torch.device, prefill_context_chunk: int) -> None:
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = device
        self.prefill_context_chunk = prefill_context_chunk
        self._pin = device.type == "cuda"
        self.req_id_to_row: dict[str, int] = {}
        self._free_rows = list(range(INITIAL_NUM_ROWS))
        self.block_table = self._host_zeros(INITIAL_NUM_ROWS, INITIAL_NUM_BLOCKS_PER_ROW, dtype=torch.int32)
        self.num_blocks = [0] * INITIAL_NUM_ROWS
        self._last_block_ids = [0] * INITIAL_NUM_ROWS
        self.params: list[SamplingParams | None] = [None] * INITIAL_NUM_ROWS
        self.row_params = torch.zeros(INITIAL_NUM_ROWS, NUM_PARAM_COLUMNS, dtype=torch.float32, device=device)
        self.generators: dict[int, torch.Generator] = {}
        self.penalty_counts = PenaltyCounts(INITIAL_NUM_ROWS, device)
        self._penalized_rows: set[int] = set()
        self._num_random = 0
        self._num_logprobs = 0
        self._staging = self._host_zeros(INITIAL_STAGING_SIZE, dtype=torch.int64)
        self._on_device = torch.zeros(INITIAL_STAGING_SIZE, dtype=torch.int64, device=device)
        self._copy_done: torch.cuda.Event | None = None  # the last host-to-device copy out of the staging buffer

    @property
    def num_reqs(self) -> int:
        return len(self.req_id_to_row)

    def add_request(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
                    params: SamplingParams, generator: torch.Generator | None) -> int:
        self.remove_request(request_id)  # a request sent again replaces its row, as it replaces its state
        if not self._free_rows:
            self._grow_rows()
        row = heapq.heappop(self._free_rows)
        self.req_id_to_row[request_id] = row
        self.params[row] = params
        self.num_blocks[row] = 0
        values = [1.0 if samples_greedily(params) else params.temperature, min(params.top_k or self.vocab_size,
                  self.vocab_size), params.top_p, params.min_p, params.presence_penalty, params.frequency_penalty,
                  params.repetition_penalty]
        self.row_params[row] = torch.tensor(values, dtype=torch.float32).to(self.device)
        if not samples_greedily(params):
            self._num_random += 1
            if generator is not None:
                self.generators[row] = generator
        self._num_logprobs += params.logprobs is not None
        if has_penalty(params):
            self._penalized_rows.add(row)
            self.penalty_counts.add_row(row, prompt_token_ids, output_token_ids, params.repetition_penalty != 1.0)
        return row

    def remove_request(self, request_id: str) -> None:
        row = self.req_id_to_row.pop(request_id, None)
        if row is None:
            return
        params = self.params[row]
        self.params[row] = None
        self._num_random -= not samples_greedily(params)
        self._num_logprobs -= params.logprobs is not None
        self.generators.pop(row, None)
        if row in self._penalized_rows:
            self._penalized_rows.discard(row)
            self.penalty_counts.remove_row(row)
        heapq.heappush(self._free_rows, row)

    def forget_blocks(self, request_id: str) -> None:
        """The request was preempted: its next step brings a new block list."""
        row = self.req_id_to_row.get(request_id)
        if row is not None:
            self.num_blocks[row] = 0

    def append_sampled(self, rows: list[int], token_ids: list[int]) -> None:
        """Count the step's sampled tokens for the penalties."""
        if self._penalized_rows:
            pairs = [(row, token) for row, token in zip(rows, token_ids, strict=True) if row in self._penalized_rows]
            if pairs:
                self.penalty_counts.append_tokens([row for row, _ in pairs], [token for _, token in pairs])

    def prepare_inputs(self, seqs: list[ScheduledSequence]) -> StepInputs:
        """`seqs` decodes first; each request added before."""
        rows, starts, num_new, token_ids, sample_positions, sampled_ids = [], [], [], [], [], []
        for position, seq in enumerate(seqs):
            row = self.req_id_to_row[seq.request_id]
            self._update_block_row(row, seq.block_ids, seq.num_computed_tokens == 0)
            rows.append(row)
            starts.append(seq.num_computed_tokens)
            num_new.append(len(seq.token_ids))
            token_ids.extend(seq.token_ids)
            if seq.sample:
                sample_positions.append(position)
                sampled_ids.append(seq.request_id)
        rows_t, starts_t = torch.tensor(rows), torch.tensor(starts)
        num_new_t, sample_t = torch.tensor(num_new), torch.tensor(sample_positions, dtype=torch.int64)
        query_start_loc = torch.zeros(len(seqs) + 1, dtype=torch.int64)
        torch.cumsum(num_new_t, 0, out=query_start_loc[1:])
        seq_of_token = torch.repeat_interleave(num_new_t)
        positions = torch.arange(len(token_ids)) - query_start_loc[seq_of_token] + starts_t[seq_of_token]
        block_ids = self.block_table[rows_t[seq_of_token], positions // self.block_size]
        slot_mapping = block_ids * self.block_size + positions % self.block_size
        seq_lens = starts_t + num_new_t
        width = max(self.num_blocks[row] for row in rows)
        sampled_row_ids = [rows[p] for p in sample_positions]
        random_positions = [i for i, row in enumerate(sampled_row_ids) if not samples_greedily(self.params[row])] \
            if self._num_random else []
        device_parts = self._to_device([
            torch.tensor(token_ids, dtype=torch.int64), positions, slot_mapping, query_start_loc, seq_lens,
            query_start_loc[1:][sample_t] - 1, rows_t[sample_t], torch.tensor(random_positions, dtype=torch.int64),
            self.block_table[rows_t, :width].flatten()])
        input_ids, positions_d, slots_d, query_start_loc_d, seq_lens_d, logits_indices, sampled_rows = device_parts[:7]
        seq_lens_cpu = tuple(seq_lens.tolist())
        metadata = AttentionMetadata(
            query_start_loc=query_start_loc_d, seq_lens=seq_lens_d,
            block_tables=device_parts[8].view(len(seqs), width).to(torch.int32), slot_mapping=slots_d,
            num_decodes=sum(1 for n in num_new if n == 1), max_seq_len=max(seq_lens_cpu),
            query_start_loc_cpu=tuple(query_start_loc.tolist()), seq_lens_cpu=seq_lens_cpu,
            prefill_context_chunk=self.prefill_context_chunk)
        return StepInputs(input_ids, positions_d, metadata, logits_indices, sampled_rows, device_parts[7],
                          sampled_ids, sampled_row_ids, random_positions)

    def sampling_metadata(self, inputs: StepInputs) -> SamplingMetadata:
        """The sampler's inputs for the step's sampled rows, gathered from the rows' buffers."""
        rows = inputs.sampled_row_ids
        params = [self.params[row] for row in rows]
        penalties = None
        if self._penalized_rows and any(row in self._penalized_rows for row in rows):
            counts, index = self.penalty_counts, inputs.sampled_rows
            penalties = penalty_inputs(params, counts.token_ids[index], counts.output_counts[index],
                                       counts.in_prompt[index], self.device)
        logprob_counts = [p.logprobs for p in params if p.logprobs is not None] if self._num_logprobs else []
        num_random = len(inputs.random_position_ids)
        fields = self._random_fields(inputs) if num_random else \
            {"temperature": None, "top_k": None, "top_p": None, "min_p": None, "generators": {}}
        return SamplingMetadata(
            all_greedy=num_random == 0, random_rows=inputs.random_positions if 0 < num_random < len(rows) else None,
            penalties=penalties, max_num_logprobs=max(logprob_counts) if logprob_counts else None, **fields)

    def _random_fields(self, inputs: StepInputs) -> dict:
        random_rows = [inputs.sampled_row_ids[i] for i in inputs.random_position_ids]
        random_params = [self.params[row] for row in random_rows]
        row_params = self.row_params[inputs.sampled_rows[inputs.random_positions]]  # [R, NUM_PARAM_COLUMNS]
        use_top_k = any(p.top_k is not None and p.top_k < self.vocab_size for p in random_params)
        return {
            "temperature": row_params[:, TEMPERATURE],
            "top_k": row_params[:, TOP_K].to(torch.int64) if use_top_k else None,
            "top_p": row_params[:, TOP_P] if any(p.top_p < 1.0 for p in random_params) else None,
            "min_p": row_params[:, MIN_P] if any(p.min_p > 0.0 for p in random_params) else None,
            "generators": {i: self.generators[row] for i, row in enumerate(random_rows) if row in self.generators},
        }

    def _update_block_row(self, row: int, block_ids: list[int], is_first_chunk: bool) -> None:
        """Blocks only get appended while a request runs: write the new tail (the whole row when it starts
        over, or when its last block is not the one recorded)."""
        num_old, num = self.num_blocks[row], len(block_ids)
        if is_first_chunk or num < num_old or (num == num_old and block_ids[-1] != self._last_block_ids[row]):
            num_old = 0
            self.block_table[row].zero_()  # block tables are padded with 0
        if num > num_old:
            if num > self.block_table.shape[1]:
                self._grow_block_table(num)
            self.block_table[row, num_old:num] = torch.tensor(block_ids[num_old:], dtype=torch.int32)
        self.num_blocks[row] = num
        self._last_block_ids[row] = block_ids[-1] if block_ids else 0

    def _to_device(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        sizes = [part.numel() for part in parts]
        total = sum(sizes)
        if total > self._staging.numel():
            size = max(total, 2 * self._staging.numel())
            self._staging = self._host_zeros(size, dtype=torch.int64)
            self._on_device = torch.zeros(size, dtype=torch.int64, device=self.device)
        if self._copy_done is not None:  # a step that sampled nothing did not wait for its copy
            self._copy_done.synchronize()
        torch.cat([part.to(torch.int64) for part in parts], out=self._staging[:total])
        if self.device.type == "cpu":
            flat = self._staging[:total]
        else:
            flat = self._on_device[:total]
            flat.copy_(self._staging[:total], non_blocking=True)
            self._copy_done = torch.cuda.Event()
            self._copy_done.record()
        return list(torch.split(flat, sizes))

    def _grow_rows(self) -> None:
        old = len(self.params)
        new = 2 * old
        table = self._host_zeros(new, self.block_table.shape[1], dtype=torch.int32)
        table[:old] = self.block_table
        self.block_table = table
        self.num_blocks.extend([0] * (new - old))
        self._last_block_ids.extend([0] * (new - old))
        self.params.extend([None] * (new - old))
        self.row_params = torch.cat([self.row_params, torch.zeros_like(self.row_params)])
        self.penalty_counts.grow_rows(new)
        for row in range(old, new):
            heapq.heappush(self._free_rows, row)

    def _grow_block_table(self, num_blocks: int) -> None:
        table = self._host_zeros(self.block_table.shape[0], max(num_blocks, 2 * self.block_table.shape[1]),
                                 dtype=torch.int32)
        table[:, :self.block_table.shape[1]] = self.block_table
        self.block_table = table

    def _host_zeros(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, pin_memory=self._pin)

