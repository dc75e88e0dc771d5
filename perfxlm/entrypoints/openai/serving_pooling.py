"""vLLM 0.32's pooling routes, served when the model is a pooling model: /v1/embeddings,
/pooling, /classify, /score (and /v1/score), /rerank (and /v1/rerank, /v2/rerank).

Each input becomes one engine pooling request (AsyncLLM.encode), all sent at once so the
engine batches them; the response keeps the input order. Scores follow LLM.score
(entrypoints/pooling.py): cosines of embeddings for an embedding model, the classifier's
probability of each tokenizer-encoded pair for a one-label cross-encoder."""

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from perfxlm.entrypoints.openai.protocol import UsageInfo
from perfxlm.entrypoints.openai.protocol_pooling import (ClassificationData, ClassificationRequest,
                                                         ClassificationResponse, EmbeddingRequest, EmbeddingResponse,
                                                         EmbeddingResponseData, InputRequest, PoolingRequest,
                                                         PoolingResponse, PoolingResponseData, RerankDocument,
                                                         RerankRequest, RerankResponse, RerankResult, RerankUsage,
                                                         ScoreRequest, ScoreResponse, ScoreResponseData)
from perfxlm.entrypoints.openai.serving_common import OpenAIServing, run_until_disconnect
from perfxlm.entrypoints.pooling import SCORE_TYPES, pair_prompt, score_inputs
from perfxlm.exceptions import VLLMValidationError
from perfxlm.models.labels import num_labels
from perfxlm.outputs import PoolingRequestOutput
from perfxlm.pooling_params import PoolingParams


class OpenAIServingPooling(OpenAIServing):
    """The pooling handlers over an AsyncLLM serving a pooling model."""

    def __init__(self, engine: Any, options: Any) -> None:
        super().__init__(engine, options)
        self.supported_tasks = engine.engine.get_supported_tasks()
        config = engine.engine.config.pooler_config
        self.pooling_task = config.task or next(t for t in ("embed", "classify", "token_embed")
                                                if t in self.supported_tasks)
        self.hf_config = engine.model_config.hf_config

    async def create_embedding(self, request: EmbeddingRequest, raw_request: Request) -> EmbeddingResponse:
        outs = await self._pool_inputs(request, "embd", raw_request)
        data = [EmbeddingResponseData(index=i, embedding=_encoded(o.outputs.data, request.encoding_format))
                for i, o in enumerate(outs)]
        return EmbeddingResponse(id=f"embd-{request.request_id}", model=self.model_name, data=data,
                                 usage=_usage(outs))

    async def create_pooling(self, request: PoolingRequest, raw_request: Request) -> PoolingResponse:
        outs = await self._pool_inputs(request, "pool", raw_request)
        data = [PoolingResponseData(index=i, data=_encoded(o.outputs.data, request.encoding_format))
                for i, o in enumerate(outs)]
        return PoolingResponse(id=f"pool-{request.request_id}", model=self.model_name, data=data, usage=_usage(outs))

    async def create_classify(self, request: ClassificationRequest, raw_request: Request) -> ClassificationResponse:
        outs = await self._pool_inputs(request, "classify", raw_request)
        id2label = self.hf_config.get("id2label") or {}
        data = []
        for i, o in enumerate(outs):
            probs = o.outputs.data.tolist()
            label = id2label.get(str(int(np.argmax(probs))))  # (JSON keys: the config's ids are strings)
            data.append(ClassificationData(index=i, label=label, probs=probs, num_classes=len(probs)))
        return ClassificationResponse(id=f"classify-{request.request_id}", model=self.model_name, data=data,
                                      usage=_usage(outs))

    async def create_score(self, request: ScoreRequest, raw_request: Request) -> ScoreResponse:
        self.check_model(request.model)
        outs = await self._score(*request.pair(), request, raw_request)
        data = [ScoreResponseData(index=i, score=float(o.outputs.data.squeeze())) for i, o in enumerate(outs)]
        return ScoreResponse(id=f"score-{request.request_id}", model=self.model_name, data=data, usage=_usage(outs))

    async def create_rerank(self, request: RerankRequest, raw_request: Request) -> RerankResponse:
        self.check_model(request.model)
        documents = request.documents if isinstance(request.documents, list) else [request.documents]
        outs = await self._score(request.query, documents, request, raw_request)
        results = [RerankResult(index=i, document=RerankDocument(text=doc), relevance_score=float(o.outputs.data))
                   for i, (doc, o) in enumerate(zip(documents, outs))]
        results.sort(key=lambda r: r.relevance_score, reverse=True)  # best first, then the top n if set
        if 0 < request.top_n < len(results):
            results = results[:request.top_n]
        tokens = _usage(outs).prompt_tokens
        return RerankResponse(id=f"score-{request.request_id}", model=self.model_name,
                              usage=RerankUsage(prompt_tokens=tokens, total_tokens=tokens), results=results)

    # ---- internals --------------------------------------------------------------------

    async def _pool_inputs(self, request: InputRequest, prefix: str,
                           raw_request: Request) -> list[PoolingRequestOutput]:
        self.check_model(request.model)
        params = request.to_pooling_params()
        if params.task is None:
            params.task = self.pooling_task
        prompts = [{"prompt_token_ids": self._prompt_ids(p, request)} for p in _inputs(request.input)]
        return await self._encode(prompts, params, f"{prefix}-{request.request_id}")

    def _prompt_ids(self, prompt: str | list[int], request: Any) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt, getattr(request, "add_special_tokens", True), request.truncate_prompt_tokens)
        return self.check_prompt(list(prompt), request.truncate_prompt_tokens)

    async def _score(self, first: Any, second: Any, request: Any, raw_request: Request) -> list[PoolingRequestOutput]:
        """One output per pair, its data the pair's score (as LLM.score computes it)."""
        score_type = SCORE_TYPES.get(self.pooling_task)
        if score_type == "cross-encoder" and num_labels(self.hf_config) != 1:
            raise ValueError("Scoring API is only enabled for num_labels == 1.")
        if score_type not in ("bi-encoder", "cross-encoder"):
            raise ValueError("This model does not support the Scoring API.")
        texts_1, texts_2 = score_inputs(first, second, self.hf_config)
        params = PoolingParams(task="embed" if score_type == "bi-encoder" else "classify",
                               use_activation=request.use_activation)
        request_id = f"score-{request.request_id}"
        if score_type == "cross-encoder":
            queries = texts_1 * len(texts_2) if len(texts_1) == 1 else texts_1
            tok = self.require_tokenizer()
            prompts = [pair_prompt(tok, q, d, self.hf_config, None) for q, d in zip(queries, texts_2)]
            for p in prompts:
                p["prompt_token_ids"] = self.check_prompt(p["prompt_token_ids"], request.truncate_prompt_tokens)
                if "token_type_ids" in p:  # (kept as long as the ids: truncation keeps the end)
                    p["token_type_ids"] = p["token_type_ids"][-len(p["prompt_token_ids"]):]
            return await self._encode(prompts, params, request_id)
        prompts = [{"prompt_token_ids": self._prompt_ids(t, request)} for t in texts_1 + texts_2]
        embeds = await self._encode(prompts, params, request_id)
        firsts, seconds = embeds[:len(texts_1)], embeds[len(texts_1):]
        if len(firsts) == 1:
            firsts = firsts * len(seconds)
        import torch  # pooling outputs are tensors: pooling models need torch
        return [PoolingRequestOutput(f"{request_id}-{i}", _Scalar(torch.nn.functional.cosine_similarity(
            a.outputs.data.float(), b.outputs.data.float(), dim=0)), a.prompt_token_ids + b.prompt_token_ids,
            a.num_cached_tokens + b.num_cached_tokens, True) for i, (a, b) in enumerate(zip(firsts, seconds))]

    async def _encode(self, prompts: list[dict[str, Any]], params: PoolingParams,
                      request_id: str) -> list[PoolingRequestOutput]:
        """Every prompt through the engine at once (validated first: a bad one fails the call
        before any is queued); the outputs in prompt order."""
        generators = [self.engine.encode(p, params, f"{request_id}-{i}") for i, p in enumerate(prompts)]

        async def last(gen: Any) -> PoolingRequestOutput:
            out = None
            async for out in gen:
                pass
            return out

        tasks = [asyncio.ensure_future(last(g)) for g in generators]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            raise


class _Scalar:
    """A pair's score as a PoolingOutput-like holder (`data`)."""

    def __init__(self, data: Any) -> None:  # a torch.Tensor
        self.data = data


def _inputs(value: Any) -> list[str | list[int]]:
    """vLLM's rule: a str, or a list of ints, is ONE prompt."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(t, int) for t in value)):
        value = [value]
    if not value:
        raise VLLMValidationError("The input cannot be empty", parameter="input")
    return list(value)


def _encoded(data: Any, encoding_format: str) -> list[float] | list[list[float]] | str:
    """float: a JSON list; base64: the float32 values' bytes (little-endian), as OpenAI sends them."""
    if encoding_format == "base64":
        return base64.b64encode(data.float().numpy().astype("<f4").tobytes()).decode("utf-8")
    return data.tolist()


def _usage(outs: list[PoolingRequestOutput]) -> UsageInfo:
    tokens = sum(len(o.prompt_token_ids or ()) for o in outs)
    return UsageInfo(prompt_tokens=tokens, total_tokens=tokens)


def add_pooling_routes(router: APIRouter, serving: OpenAIServingPooling, dependencies: list[Any],
                       answer: Callable[[Any], Any]) -> None:
    """The routes the model's tasks serve, on `router` (vLLM registers them only for a pooling
    model: a generative one answers 404)."""
    tasks = serving.supported_tasks
    routes: list[tuple[str, Callable[..., Any], type]] = [("/pooling", serving.create_pooling, PoolingRequest)]
    if "embed" in tasks:
        routes.append(("/v1/embeddings", serving.create_embedding, EmbeddingRequest))
    if "classify" in tasks:
        routes.append(("/classify", serving.create_classify, ClassificationRequest))
    if SCORE_TYPES.get(serving.pooling_task) in ("bi-encoder", "cross-encoder"):
        routes += [(path, serving.create_score, ScoreRequest) for path in ("/score", "/v1/score")]
        routes += [(path, serving.create_rerank, RerankRequest) for path in ("/rerank", "/v1/rerank", "/v2/rerank")]
    for path, handler, body in routes:
        router.add_api_route(path, _endpoint(handler, body, answer), methods=["POST"], dependencies=dependencies,
                             response_model=None)


def _endpoint(handler: Callable[..., Any], body: type, answer: Callable[[Any], Any]) -> Callable[..., Any]:
    async def endpoint(request: body, raw_request: Request) -> Any:  # type: ignore[valid-type]
        return await run_until_disconnect(raw_request, answer(handler(request, raw_request)))
    return endpoint
