"""The Ray Data actor of `conduit batch` for an embedding model: one Embedder replica's worth of
resources, running the Ray-free `Encoder` (app/encoder.py) that the Embedder deployment runs. A line
goes the embeddings route's way: the body limit, the route's request model, the model id, the
Pipeline's input checks, the encoder's checks, then one forward pass for many lines' inputs, and the
route's own response builder. Whatever one line does wrong ends in its own output line."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from app.api.errors import ConduitError, model_not_found
from app.api.input_limits import check_embedding_request
from app.api.wire.embeddings import EmbeddingRequest, embedding_response
from app.batch.lines import EMBEDDING_URLS, BatchLine, LineError, job_line_error, parse_line, response_line
from app.batch.requests import check_size, refusal_line, route_body
from app.config import EmbeddingModelConfig, IngressConfig


@dataclass
class _Line:
    """A line the route would take: its body and its inputs' token ids."""

    line: BatchLine
    request_id: str
    body: EmbeddingRequest
    sequences: list[list[int]]


class EmbeddingWorker:
    """Ray Data callable class, as `BatchWorker`: `__call__` takes {"text", "line", "utf8"} rows and
    yields {"line": output lines, "completion_tokens": 0 each, "node": this actor's node id}."""

    def __init__(self, model: EmbeddingModelConfig, ingress: IngressConfig):
        import ray

        from app.encoder import Encoder

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        self.encoder = Encoder(model, threads=max(1, int(cpus)))  # as the Embedder deployment does
        self.model, self.ingress = model, ingress
        self.ids = {model.name, *model.aliases}
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> Iterator[dict]:
        finished: list[str] = []
        accepted: list[_Line] = []
        for text, number, utf8 in zip(batch["text"], batch["line"], batch["utf8"]):
            result = self._start(str(text), int(number), bool(utf8))
            (finished if isinstance(result, str) else accepted).append(result)
        if accepted:
            finished += self._answer(accepted)
        yield {"line": finished, "completion_tokens": [0] * len(finished), "node": [self.node] * len(finished)}

    def _start(self, text: str, number: int, utf8: bool) -> _Line | str:
        """The line's request, or its output line when it is refused."""
        parsed = parse_line(text, utf8, EMBEDDING_URLS)
        if isinstance(parsed, LineError):
            return job_line_error(parsed, number, self.model.name)
        request_id = uuid.uuid4().hex
        try:  # in the order the route and the Pipeline check
            check_size(text, self.ingress)
            body = route_body(parsed)
            if body.model not in self.ids:  # one job runs one model
                raise model_not_found(body.model)
            inputs = body.inputs()
            check_embedding_request(inputs, self.ingress.input_limits)
            return _Line(parsed, request_id, body, self.encoder.sequences(inputs, body.dimensions))
        except Exception as e:  # one line's failure is its own: the route's 4xx, or a 500 as online
            return refusal_line(parsed.custom_id, _as_error(e, "Preparing the request failed"), request_id)

    def _answer(self, lines: list[_Line]) -> list[str]:
        """All the lines' inputs through the encoder, shortest first (less padding in each forward
        pass); each line's answer built by the route's own builder."""
        sequences = [ids for line in lines for ids in line.sequences]
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        try:
            vectors = np.empty((len(sequences), self.encoder.size), np.float32)
            vectors[order] = self.encoder.encode([sequences[i] for i in order])
        except Exception as e:  # the forward pass failed (out of memory, say): a 500 for its lines, as online
            err = _as_error(e, "Embedding failed")
            return [refusal_line(line.line.custom_id, err, line.request_id) for line in lines]
        answers, start = [], 0
        for line in lines:
            count = len(line.sequences)
            body = embedding_response(line.body.model, self.encoder.resize(vectors[start:start + count],
                                      line.body.dimensions), sum(map(len, line.sequences)), line.body.encoding_format)
            answers.append(response_line(line.line.custom_id, 200, line.request_id, body))
            start += count
        return answers


def _as_error(e: Exception, what: str) -> ConduitError:
    return e if isinstance(e, ConduitError) else ConduitError(f"{what}: {e}", 500, "server_error")
