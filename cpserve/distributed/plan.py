"""The step plan: what the driver sends every rank each step, as msgpack (never pickle).

It carries diffs: a request's whole block table only on its first step after (re)admission,
afterwards just the blocks appended. Workers keep the tables and drop those of freed requests.
Sampling parameters stay on the driver: only rank 0 samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import torch
import torch.distributed as dist

from cpserve.distributed.groups import Group

# A token the driver did not know when it planned the step (async scheduling: the last step's
# sample, still on the device). The driver hands its value to the step on the device.
PENDING_TOKEN = -1


@dataclass
class PlannedRequest:
    request_id: str
    token_ids: list[int]  # the new tokens this step computes (PENDING_TOKEN: see above)
    start: int  # position of token_ids[0]
    block_ids: list[int]  # the whole table if is_new, else the blocks appended this step
    is_new: bool
    num_logits: int  # logits are needed for the last num_logits new tokens
    num_drafts: int = 0  # the last num_drafts new tokens are drafts to verify (never split)


@dataclass
class StepPlan:
    """One message from the driver. Besides a step, it can carry a command for every rank:
    `load` (an engine config as a plain dict: build a model runner for it), `probe_kv`
    (report which cache slots hold data), `draft` (run the MTP drafter after the last step:
    one `[next_token_ids, last_row, num_drafts]` per request of that step, see
    spec_decode/mtp_proposer.py) or `shutdown`; and `kv`, what the ranks must do about KV
    transfer between instances, with or without a step."""

    requests: list[PlannedRequest] = field(default_factory=list)
    freed_request_ids: list[str] = field(default_factory=list)
    shutdown: bool = False
    load: dict | None = None
    probe_kv: bool = False
    draft: list | None = None
    # KV transfer between instances (cpserve.kv_transfer.worker): leases, loads, polls.
    kv: dict | None = None

    def encode(self) -> bytes:
        return msgpack.packb({
            "requests": [[r.request_id, r.token_ids, r.start, r.block_ids, r.is_new, r.num_logits,
                          r.num_drafts] for r in self.requests],
            "freed": self.freed_request_ids,
            "shutdown": self.shutdown,
            "load": self.load,
            "probe_kv": self.probe_kv,
            "draft": self.draft,
            "kv": self.kv,
        }, use_bin_type=True)

    @staticmethod
    def decode(data: bytes) -> StepPlan:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
        return StepPlan(requests=[PlannedRequest(*fields) for fields in raw["requests"]],
                        freed_request_ids=list(raw["freed"]), shutdown=bool(raw["shutdown"]),
                        load=raw["load"], probe_kv=bool(raw["probe_kv"]), draft=raw["draft"],
                        kv=raw["kv"])


def broadcast_plan(plan: StepPlan | None, group: Group, src: int = 0) -> StepPlan:
    """Send `plan` from `src` to every rank of the (CPU, gloo) group; returns it everywhere."""
    if plan is not None:
        payload = torch.frombuffer(bytearray(plan.encode()), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.long)
    else:
        size = torch.zeros(1, dtype=torch.long)
    dist.broadcast(size, src=src, group=group)
    if plan is None:
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(payload, src=src, group=group)
    return plan if plan is not None else StepPlan.decode(payload.numpy().tobytes())
