"""Speculative decoding: drafts proposed after each step (n-gram lookup or DeepSeek's MTP
modules), verified by the next one over the sharded KV, accepted by exact rejection sampling.

    config.py         --speculative-config (vLLM's JSON), checked at start-up
    drafter.py        the engine's hook: who proposes drafts after a step, and how many
    ngram.py          prompt lookup, vectorised over each request's token buffer
    mtp_proposer.py   the MTP module on every rank: over the step's tokens, then chained
    rejection.py      verification: sampled rows, the accepted prefix and the token after
    metrics.py        vLLM's counters
"""
