"""Tokenizer deployment: chat template, encoding and the context-window check, for every model.
CPU-only and stateless, so it scales on its own (see its autoscaling_config in serve_config.yaml)."""

from __future__ import annotations

import logging

from ray import serve

from app.api.errors import ConduitError, invalid
from app.api.fim import fim_ids
from app.api.protocol import GenerateRequest, PreparedRequest
from app.api.tools import chat_template_inputs, constrain
from app.config import ModelConfig
from app.loading import load_tokenizer, resolved_engine_config

log = logging.getLogger("ray.serve")


@serve.deployment(
    name="Tokenizer",
    ray_actor_options={"num_cpus": 0.2},
    max_ongoing_requests=256,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64},
)
class Tokenizer:
    def __init__(self, models: list[ModelConfig]):
        self.tokenizers = {m.name: load_tokenizer(m) for m in models}
        self.max_len = {m.name: resolved_engine_config(m).max_model_len for m in models}

    def _encode(self, req: GenerateRequest) -> list[int]:
        tokenizer = self.tokenizers[req.model]
        if req.messages is not None:
            if tokenizer.chat_template is None:
                raise invalid(f"model {req.model} has no chat template; use /v1/completions", "messages")
            cont = req.continue_final_message
            messages, tools = chat_template_inputs(tokenizer, req)
            text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=not cont,
                                                 continue_final_message=cont)
            # the template already holds any special tokens it wants
            return tokenizer.encode(text, add_special_tokens=False)
        if isinstance(req.prompt, list):
            vocab = len(tokenizer)
            if any(not 0 <= t < vocab for t in req.prompt):
                raise invalid(f"prompt token ids must be in [0, {vocab})", "prompt")
            prompt_ids = list(req.prompt)
        else:
            prompt_ids = tokenizer.encode(req.prompt, add_special_tokens=req.suffix is None)
        return prompt_ids if req.suffix is None else fim_ids(tokenizer, prompt_ids, req.suffix)

    async def prepare(self, req: GenerateRequest) -> PreparedRequest:
        prompt_ids = self._encode(req)
        window = self.max_len[req.model]
        param = "messages" if req.messages is not None else "prompt"
        if not prompt_ids:
            raise invalid("the prompt is empty", param)
        room = window - len(prompt_ids)
        if room <= 0:
            raise ConduitError(
                f"This model's maximum context length is {window} tokens. However, your prompt is "
                f"{len(prompt_ids)} tokens. Please reduce the length of the prompt.",
                param=param,
                code="context_length_exceeded",
            )
        constrain(req)  # a forced tool call decodes under its grammar
        sampling = req.sampling
        if not req.max_tokens_given:
            sampling.max_tokens = room
        elif sampling.max_tokens > room:
            raise ConduitError(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{len(prompt_ids) + sampling.max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                f"{sampling.max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        log.info("request %s: %d prompt tokens for %s", req.request_id, len(prompt_ids), req.model)
        return PreparedRequest(req.request_id, req.model, prompt_ids, sampling)

    async def max_model_len(self, model: str) -> int:
        return self.max_len[model]

    async def detokenize(self, model: str, token_ids: list[int]) -> str:
        tokenizer = self.tokenizers[model]
        if any(t >= len(tokenizer) for t in token_ids):
            raise invalid(f"token ids must be in [0, {len(tokenizer)})", "tokens")
        return tokenizer.decode(token_ids)
