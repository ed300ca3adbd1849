"""A vLLM (0.32, v1) logits processor that makes a request stop at a given length: hidden lengths
on a real engine.

A trace replay sends `max_tokens` (the cap, all the admission gate sees) and, in the request body,
`"vllm_xargs": {"saber_output_tokens": N}`. vLLM passes `vllm_xargs` to `SamplingParams.extra_args`;
this processor then keeps the stop tokens (EOS) masked until N - 1 tokens are out and forces EOS as
token N, so `usage.completion_tokens == min(N, max_tokens)`. The sidecar forwards the body as is and
never reads the field.

Load it in the engine: `--logits-processors saber_bench.vllm_stop:StopAtLength`, with this file's
package on the vLLM process's PYTHONPATH. It imports only vLLM and torch (it runs in vLLM's venv).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

XARG = "saber_output_tokens"


class StopAtLength(LogitsProcessor):
    """Per request with `extra_args[XARG] = N`: no stop token before token N, EOS as token N."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        hf = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
        eos = getattr(hf, "eos_token_id", None)
        if isinstance(eos, list):  # some configs list several EOS ids: the first is the canonical one
            eos = eos[0] if eos else None
        self.default_eos: int | None = eos
        # batch index -> (N, live reference to the request's output token ids, stop ids, eos id)
        self.reqs: dict[int, tuple[int, list[int], tuple[int, ...], int]] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        n = (sampling_params.extra_args or {}).get(XARG)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"vllm_xargs.{XARG} must be an integer >= 1, got {n!r}")

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token wins

    def _add(self, params: SamplingParams, _prompt: list[int] | None, out: list[int]):
        n = (params.extra_args or {}).get(XARG)
        if n is None:
            return None
        stops = tuple(sorted(params.all_stop_token_ids or ()))
        eos = getattr(params, "_eos_token_id", None)
        if eos is None:
            eos = stops[0] if stops else self.default_eos
        if eos is None:
            return None  # a model without EOS cannot be stopped early; max_tokens still applies
        return (int(n), out, stops or (eos,), int(eos))

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.reqs, batch_update, self._add)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (n, out, stops, eos) in self.reqs.items():
            if len(out) >= n - 1:
                logits[index, :] = -float("inf")
                logits[index, eos] = 0.0
            else:
                logits[index, list(stops)] = -float("inf")
        return logits
