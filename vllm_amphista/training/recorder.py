"""HiddenStateRecorder: a drafter that drafts nothing and keeps what the target computed.

Built by vLLM through `custom_class` like the proposer, it receives every step's rows
(step.StepRows) and appends each request's final-normed hidden states, the very vectors
the proposer is fed when serving. The distillation set is thus recorded while the target
answers, with no second pass over the conversation. Proposing nothing makes every step a
plain decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_amphista.serving.step import Proposal, StepDrafter, StepRows

RECORDER_CLASS_PATH = f"{__name__}.HiddenStateRecorder"


@dataclass
class RecordedRequest:
    rows: list[torch.Tensor] = field(default_factory=list)  # hidden-state chunks, in order
    next_position: int = 0  # where the next chunk must start
    broken: bool = False  # rows went missing: the request is not kept


class HiddenStateRecorder(StepDrafter):
    def __init__(self, vllm_config, storage_dtype: torch.dtype = torch.bfloat16) -> None:
        self.storage_dtype = storage_dtype
        self.requests: dict[str, RecordedRequest] = {}
        self.finished: list[tuple[list[int], torch.Tensor, int]] = []
        self.dropped = 0  # requests whose rows were incomplete

    def propose_from_step(self, step: StepRows) -> Proposal:
        for i, (req_id, rows) in enumerate(zip(step.req_ids, step.accepted_counts().tolist(),
                                               strict=True)):
            if rows == 0:
                continue
            start, first = int(step.start_positions[i]), int(step.query_start_loc[i])
            record = self.requests.setdefault(req_id, RecordedRequest())
            if start != record.next_position:
                record.rows.clear()  # preempted and recomputed from position 0
                # Any other start means rows we never saw: drop the request.
                record.broken = record.broken or start != 0
            record.rows.append(step.hidden_states[first: first + rows].to(self.storage_dtype))
            record.next_position = start + rows
        return Proposal([[] for _ in step.req_ids])

    def release(self, req_id: str, request=None) -> None:
        """vLLM dropped the request: keep it if it finished (its rows cover its tokens),
        forget it if it was aborted."""
        record = self.requests.pop(req_id, None)
        if record is not None and request is not None:
            conversation = self._conversation(record, request)
            if conversation is not None:
                self.finished.append(conversation)

    def take(self, runner_requests: dict) -> list[tuple[list[int], torch.Tensor, int]]:
        """Every finished request, as (prompt + answer tokens, hidden states
        [len(tokens) - 1, d], prompt length), then forgotten. Call it when the engine is
        idle: the requests the runner still holds have then finished too (vLLM drops a
        finished request from the runner only at its next step)."""
        for req_id in [r for r in self.requests if r in runner_requests]:
            self.release(req_id, runner_requests[req_id])
        taken, self.finished = self.finished, []
        return taken

    def _conversation(self, record: RecordedRequest, request) -> tuple | None:
        tokens = list(request.prompt_token_ids) + list(request.output_token_ids)
        hidden = torch.cat(record.rows) if record.rows else None
        if record.broken or hidden is None or hidden.shape[0] != len(tokens) - 1:
            self.dropped += 1  # aborted mid-step, or rows missing
            return None
        return tokens, hidden, len(request.prompt_token_ids)


def take_recorded(worker) -> list[tuple[list[int], torch.Tensor, int]]:
    """For LLM.collective_rpc: what the worker's recorder holds."""
    runner = worker.model_runner
    return runner.drafter.take(runner.requests)
