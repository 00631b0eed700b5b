"""cpserve: long-context LLM inference with prefill and decode context parallelism."""

from cpserve.outputs import CompletionOutput, Logprob, RequestOutput
from cpserve.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch models and the engine; import it only when asked for.
    if name == "LLM":
        from cpserve.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
