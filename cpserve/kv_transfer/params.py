"""`kv_transfer_params` of a request, as vLLM's NixlConnector reads and writes them.

    proxy -> prefill   {"do_remote_decode": true}   (vLLM's proxy also sends the other keys, null)
    prefill -> proxy   {"do_remote_prefill": true, "do_remote_decode": false,
                        "remote_engine_id", "remote_block_ids", "remote_request_id",
                        "remote_host", "remote_port", "tp_size",
                        cpserve's: "remote_instance", "remote_layout", "remote_num_tokens",
                                   "remote_prompt_hash"}
    proxy -> decode    the prefill's params, unchanged

The prefill instance keeps the request's blocks under a lease and returns where they are; the
decode instance pulls them and computes only the last prompt token (for its logits).
Anything else in these params is refused with a message naming the field.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from cpserve.kv_transfer.puller import RemoteKV

FIELD = "kv_transfer_params"
MAX_BLOCK_IDS = 2**20
_VLLM_KEYS = ("do_remote_decode", "do_remote_prefill", "remote_engine_id", "remote_block_ids",
              "remote_request_id", "remote_host", "remote_port", "tp_size")
_CPSERVE_KEYS = ("remote_instance", "remote_layout", "remote_num_tokens", "remote_prompt_hash")


@dataclass(frozen=True)
class RemotePrefill:
    """A request whose prompt KV another instance computed: where to pull it from."""

    kv: RemoteKV
    num_tokens: int
    prompt_hash: str


@dataclass(frozen=True)
class TransferRequest:
    remote_decode: bool  # prefill side: keep the KV for a decode instance
    remote_prefill: RemotePrefill | None  # decode side: pull the KV first


def prompt_hash(token_ids: list[int]) -> str:
    """Names a prompt, so a decode instance can tell it tokenized the same prompt."""
    return hashlib.sha256(struct.pack(f"<{len(token_ids)}q", *token_ids)).hexdigest()[:32]


def parse(params: Any, *, is_producer: bool | None, is_consumer: bool | None) -> TransferRequest:
    """Validate a request's kv_transfer_params. `is_producer` / `is_consumer`: this instance's
    role (None for both: no --kv-transfer-config). Raises ValueError naming the field."""
    if not isinstance(params, dict):
        raise ValueError(f"{FIELD} must be an object")
    unknown = sorted(set(params) - set(_VLLM_KEYS) - set(_CPSERVE_KEYS))
    if unknown:
        raise ValueError(f"{FIELD}.{unknown[0]} is not a field cpserve knows (known: "
                         f"{', '.join(_VLLM_KEYS + _CPSERVE_KEYS)})")
    remote_decode = _flag(params, "do_remote_decode")
    remote_prefill = _flag(params, "do_remote_prefill")
    if not (remote_decode or remote_prefill):
        return TransferRequest(False, None)
    if is_producer is None:
        raise ValueError(f"{FIELD}: this server has no --kv-transfer-config, so it cannot take "
                         "part in a KV transfer")
    if remote_decode and remote_prefill:
        raise ValueError(f"{FIELD}: do_remote_decode and do_remote_prefill cannot both be true")
    if remote_decode:
        if not is_producer:
            raise ValueError(f"{FIELD}.do_remote_decode: this instance is a kv_consumer; send "
                             "the prefill request to a kv_producer (or kv_both)")
        return TransferRequest(True, None)
    if not is_consumer:
        raise ValueError(f"{FIELD}.do_remote_prefill: this instance is a kv_producer; send "
                         "the decode request to a kv_consumer (or kv_both)")
    missing = [k for k in (*_VLLM_KEYS[2:7], *_CPSERVE_KEYS) if params.get(k) is None
               and k != "remote_layout"]
    if missing:
        raise ValueError(f"{FIELD}.{missing[0]} is missing: do_remote_prefill needs the params "
                         "a cpserve prefill instance returned, unchanged")
    blocks = params["remote_block_ids"]
    if not isinstance(blocks, list) or len(blocks) > MAX_BLOCK_IDS or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
        raise ValueError(f"{FIELD}.remote_block_ids must be a list of block ids")
    port = params["remote_port"]
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"{FIELD}.remote_port must be a port number")
    num_tokens = params["remote_num_tokens"]
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
        raise ValueError(f"{FIELD}.remote_num_tokens must be a positive integer")
    for key in ("remote_engine_id", "remote_request_id", "remote_host", "remote_instance",
                "remote_prompt_hash"):
        if not isinstance(params[key], str) or not params[key] or len(params[key]) > 1024:
            raise ValueError(f"{FIELD}.{key} must be a non-empty string")
    kv = RemoteKV(engine_id=params["remote_engine_id"], instance=params["remote_instance"],
                  host=params["remote_host"], port=port,
                  request_id=params["remote_request_id"], block_ids=tuple(blocks))
    return TransferRequest(False, RemotePrefill(kv, num_tokens, params["remote_prompt_hash"]))


def for_request(config, params) -> TransferRequest | None:
    """What a request's kv_transfer_params ask of this instance (`config`: its EngineConfig),
    None without them. Raises ValueError for the user; the front end checks before sending,
    the engine core again when it admits the sequence."""
    if params.kv_transfer_params is None:
        return None
    kvt = config.kv_transfer
    transfer = parse(params.kv_transfer_params,
                     is_producer=kvt.is_producer if kvt else None,
                     is_consumer=kvt.is_consumer if kvt else None)
    if (transfer.remote_decode or transfer.remote_prefill) and params.n != 1:
        raise ValueError("kv_transfer_params: a KV transfer is for one completion (n=1)")
    if transfer.remote_prefill is not None and params.prompt_logprobs is not None:
        raise ValueError("prompt_logprobs: a decode instance that receives the prompt's KV "
                         "does not compute the prompt, so it has no prompt logprobs")
    return transfer


def _flag(params: dict, key: str) -> bool:
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{FIELD}.{key} must be true, false or null")
    return bool(value)


def prefill_reply(*, engine_id: str, instance: str, host: str, port: int, tp: int,
                  layout: dict, request_id: str, block_ids: list[int],
                  prompt_token_ids: list[int]) -> dict:
    """What a prefill instance returns for a request it keeps the KV of."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": engine_id,
        "remote_block_ids": list(block_ids),
        "remote_request_id": request_id,
        "remote_host": host,
        "remote_port": port,
        "tp_size": tp,
        "remote_instance": instance,
        "remote_layout": layout,
        "remote_num_tokens": len(prompt_token_ids),
        "remote_prompt_hash": prompt_hash(prompt_token_ids),
    }
