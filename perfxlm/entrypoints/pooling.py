"""`LLM.encode`, `embed`, `classify` and `score`: vLLM's offline API for pooling models
(its PoolingOfflineMixin), on the one engine that also generates.

Each prompt becomes one pooling request (a PoolingParams with its task set); the engine
prefills it and returns a PoolingRequestOutput (engine/pooler.py), which embed / classify /
score wrap in their task's output class. `score` pairs texts: a bi-encoder (an embedding
model) scores the cosine of the two embeddings; a cross-encoder (a one-label classifier)
reads the pair as one prompt, the tokenizer's `text, text_pair` encoding with its token
types, and scores the classifier's probability.
"""

import time
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from perfxlm.exceptions import VLLMValidationError
from perfxlm.models.labels import num_labels
from perfxlm.outputs import (ClassificationRequestOutput, EmbeddingRequestOutput, PoolingOutput,
                             PoolingRequestOutput, ScoringRequestOutput)
from perfxlm.pooling_params import PoolingParams

SCORE_TYPES = {"embed": "bi-encoder", "classify": "cross-encoder", "token_embed": "late-interaction"}
_PRIORITY = ("embed&token_classify", "embed", "classify", "token_embed", "token_classify", "plugin")
_TASK_REQUIRED = """
pooling_task required for `LLM.encode`.
Please use one of the more specific methods or set the pooling_task when using `LLM.encode`:
  - For embeddings, use `LLM.embed(...)` or `pooling_task="embed"`.
  - For classification logits, use `LLM.classify(...)` or `pooling_task="classify"`.
  - For similarity scores, use `LLM.score(...)`.
  - For rewards, `pooling_task="classify"` or `pooling_task="token_classify"`.
  - For token classification, use `pooling_task="token_classify"`.
  - For multi-vector retrieval, use `pooling_task="token_embed"`.
"""  # vLLM's message (without its source indentation)


class PoolingMixin:
    """LLM's pooling methods; the LLM provides llm_engine, runner_type, supported_tasks,
    request_counter, _exclusive, _prompt_list and _require_tokenizer."""

    llm_engine: Any
    runner_type: str
    supported_tasks: tuple[str, ...]

    @property
    def pooling_task(self) -> str | None:
        """The task LLM.encode serves unless told (vLLM's get_pooling_task): the pooler config's
        `task`, else the first supported of embed, classify, token_embed, token_classify."""
        config = self.llm_engine.config.pooler_config
        if config is None:
            return None
        if config.task is not None:
            if config.task not in self.supported_tasks:
                raise RuntimeError(f"Unsupported task: {config.task!r} Supported tasks: {self.supported_tasks}")
            return config.task
        return next((t for t in _PRIORITY if t in self.supported_tasks), None)

    def encode(self, prompts: Any, pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, *,
               use_tqdm: bool | Callable[..., tqdm] = True, lora_request: Any = None, pooling_task: str | None = None,
               tokenization_kwargs: dict[str, Any] | None = None) -> list[PoolingRequestOutput]:
        """Pool the hidden states of each prompt for `pooling_task` ("embed", "classify",
        "token_embed"): one PoolingRequestOutput per prompt, in prompt order."""
        if isinstance(prompts, dict) and "data" in prompts and pooling_task != "plugin":
            raise ValueError("The 'data' field is only supported for the 'plugin' pooling task.")
        self._verify_pooling_task(pooling_task)
        with self._exclusive("encode"):
            prompt_list = self._prompt_list(prompts)
            params = _params_for(pooling_params, len(prompt_list), pooling_task)
            return self._run_pooling(list(zip(prompt_list, params)), use_tqdm, lora_request, tokenization_kwargs)

    def embed(self, prompts: Any, *, use_tqdm: bool | Callable[..., tqdm] = True,
              pooling_params: PoolingParams | Sequence[PoolingParams] | None = None, lora_request: Any = None,
              tokenization_kwargs: dict[str, Any] | None = None) -> list[EmbeddingRequestOutput]:
        """An embedding vector for each prompt (`outputs.embedding`), in prompt order."""
        items = self.encode(prompts, use_tqdm=use_tqdm, pooling_params=pooling_params, lora_request=lora_request,
                            pooling_task="embed", tokenization_kwargs=tokenization_kwargs)
        return [EmbeddingRequestOutput.from_base(item) for item in items]

    def classify(self, prompts: Any, *, pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
                 use_tqdm: bool | Callable[..., tqdm] = True, lora_request: Any = None,
                 tokenization_kwargs: dict[str, Any] | None = None) -> list[ClassificationRequestOutput]:
        """Class probabilities for each prompt (`outputs.probs`), in prompt order."""
        items = self.encode(prompts, use_tqdm=use_tqdm, pooling_params=pooling_params, lora_request=lora_request,
                            pooling_task="classify", tokenization_kwargs=tokenization_kwargs)
        return [ClassificationRequestOutput.from_base(item) for item in items]

    def score(self, data_1: str | list[str], data_2: str | list[str], /, *,
              use_tqdm: bool | Callable[..., tqdm] = True, pooling_params: PoolingParams | None = None,
              lora_request: Any = None, tokenization_kwargs: dict[str, Any] | None = None,
              chat_template: str | None = None) -> list[ScoringRequestOutput]:
        """Similarity scores of the pairs (data_1[i], data_2[i]); one data_1 text pairs with every
        data_2 text (1:1, 1:N or N:N). One ScoringRequestOutput per pair, in order."""
        if self.runner_type != "pooling":
            raise ValueError("LLM.score() is only supported for pooling models. Try passing `--runner pooling` to "
                             "use the model as a pooling model.")
        score_type = SCORE_TYPES.get(self.pooling_task)
        if score_type == "cross-encoder" and num_labels(self.llm_engine.source.hf_config) != 1:
            raise ValueError("Scoring API is only enabled for num_labels == 1.")
        if score_type not in ("bi-encoder", "cross-encoder"):
            raise ValueError("This model does not support the Scoring API.")
        if chat_template is not None:
            raise NotImplementedError("perfxlm does not support LLM.score(chat_template=...) yet")
        texts_1, texts_2 = score_inputs(data_1, data_2, self.llm_engine.source.hf_config)
        task = "embed" if score_type == "bi-encoder" else "classify"
        params = (pooling_params or PoolingParams()).clone()
        if params.task is None:
            params.task = task
        elif params.task != task:
            raise ValueError(f"You cannot overwrite pooling_params.task={params.task!r} with pooling_task={task!r}!")
        with self._exclusive("score"):
            if score_type == "bi-encoder":
                outs = self._run_pooling([(t, params) for t in texts_1 + texts_2], use_tqdm, lora_request,
                                         tokenization_kwargs)
                return _cosine_scores(outs[:len(texts_1)], outs[len(texts_1):], self._require_tokenizer("score"))
            tok = self._require_tokenizer("score")
            pairs = [pair_prompt(tok, q, d, self.llm_engine.source.hf_config, tokenization_kwargs)
                     for q, d in zip(texts_1 * len(texts_2) if len(texts_1) == 1 else texts_1, texts_2)]
            outs = self._run_pooling([(p, params) for p in pairs], use_tqdm, lora_request, None)
            return [ScoringRequestOutput.from_base(out) for out in outs]

    # ---- internals --------------------------------------------------------------------

    def _verify_pooling_task(self, pooling_task: str | None) -> None:
        """vLLM's errors, in its order, for a task this model does not serve."""
        if self.runner_type != "pooling":
            raise ValueError("LLM.encode() is only supported for pooling models. Try passing `--runner pooling` "
                             "to use the model as a pooling model.")
        if pooling_task is None:
            raise ValueError(_TASK_REQUIRED)
        if pooling_task in ("embed", "token_embed") and pooling_task not in self.supported_tasks:
            raise ValueError("Embedding API is not supported by this model. Try converting the model using "
                             "`--convert embed`.")
        if pooling_task in ("classify", "token_classify") and pooling_task not in self.supported_tasks:
            raise ValueError("Classification API is not supported by this model. Try converting the model using "
                             "`--convert classify`.")
        if pooling_task != "plugin" and pooling_task != self.pooling_task:
            if pooling_task not in self.supported_tasks:
                raise ValueError(f"Unsupported task: {pooling_task!r} Supported tasks: {self.supported_tasks}")
            raise ValueError(f"Try switching the model's pooling_task via `PoolerConfig(task=\"{pooling_task}\")`")
        if pooling_task == "plugin":
            raise ValueError("No IOProcessor plugin installed. Please refer to the documentation and to the "
                             "'prithvi_geospatial_mae_io_processor' offline inference example for more details.")

    def _run_pooling(self, requests: list[tuple[Any, PoolingParams]], use_tqdm: bool | Callable[..., tqdm],
                     lora_request: Any, tokenization_kwargs: dict[str, Any] | None) -> list[PoolingRequestOutput]:
        """Queue every (prompt, params) (all or none: a bad one aborts those queued), step the engine
        until they are done, and return their outputs in order."""
        if not requests:
            raise ValueError("You must pass at least one prompt")
        if lora_request is not None:
            raise VLLMValidationError(f"Got lora_request {lora_request} but LoRA is not enabled!")
        engine, ids = self.llm_engine, []
        pbar = None
        try:
            for prompt, params in requests:
                request_id = str(next(self.request_counter))
                engine.add_request(request_id, prompt, params, tokenization_kwargs=tokenization_kwargs)
                ids.append(request_id)
            if use_tqdm:
                pbar = (use_tqdm if callable(use_tqdm) else tqdm)(
                    total=len(ids), desc="Processed prompts", dynamic_ncols=True,
                    postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
            outputs, in_toks, start = [], 0, time.perf_counter()
            while engine.has_unfinished_requests():
                for out in engine.step():
                    outputs.append(out)
                    if pbar is not None:
                        in_toks += len(out.prompt_token_ids)
                        pbar.postfix = (f"est. speed input: {in_toks / max(time.perf_counter() - start, 1e-9):.2f} "
                                        "toks/s, output: 0.00 toks/s")
                        pbar.update(1)
        except BaseException:
            engine.abort_request(ids)  # the next call sees a clean engine, as in vLLM
            raise
        finally:
            if pbar is not None:
                pbar.close()
        return sorted(outputs, key=lambda o: int(o.request_id))


def _params_for(pooling_params: PoolingParams | Sequence[PoolingParams] | None, n: int,
                task: str) -> list[PoolingParams]:
    """One copy of the params per prompt (the caller's stay as given), each with the task set."""
    if pooling_params is None:
        pooling_params = PoolingParams()
    if isinstance(pooling_params, Sequence):
        if len(pooling_params) != n:
            raise VLLMValidationError(f"The lengths of prompts ({n}) and params ({len(pooling_params)}) must be "
                                      "the same.")
        params = [p.clone() for p in pooling_params]
    else:
        params = [pooling_params.clone() for _ in range(n)]
    for p in params:
        if p.task is None:
            p.task = task
        elif p.task != task:
            raise VLLMValidationError(f"You cannot overwrite param.task={p.task!r} with pooling_task={task!r}!")
    return params


def score_inputs(data_1: Any, data_2: Any, hf_config: dict) -> tuple[list[str], list[str]]:
    """vLLM's checks of LLM.score's inputs: text only here, 1:1, 1:N or N:N."""
    data_1 = data_1 if isinstance(data_1, list) else [data_1]
    data_2 = data_2 if isinstance(data_2, list) else [data_2]
    arch = (hf_config.get("architectures") or ["?"])[0]
    for d in data_1 + data_2:
        if not isinstance(d, str):
            raise VLLMValidationError(f"MultiModalParam is not supported for {arch}")
    if len(data_1) > 1 and len(data_1) != len(data_2):
        raise VLLMValidationError("Input lengths must be either 1:1, 1:N or N:N")
    if not data_1:
        raise VLLMValidationError("At least one text element must be given")
    if not data_2:
        raise VLLMValidationError("At least one text_pair element must be given")
    return data_1, data_2


def pair_prompt(tok: Any, query: str, document: str, hf_config: dict,
                 tokenization_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """A cross-encoder's prompt: the tokenizer's pair encoding (with its separator and token
    types), or the two texts concatenated where the config says use_sep_token false (an LLM
    as reranker)."""
    kwargs = dict(tokenization_kwargs or {})
    if hf_config.get("use_sep_token", True):
        enc = tok(text=query, text_pair=document, **kwargs)
    else:
        enc = tok(text=query + document, **kwargs)
    prompt = {"prompt_token_ids": list(enc["input_ids"])}
    if enc.get("token_type_ids") is not None:
        prompt["token_type_ids"] = list(enc["token_type_ids"])
    return prompt


def _cosine_scores(first: list[PoolingRequestOutput], second: list[PoolingRequestOutput],
                   tok: Any) -> list[ScoringRequestOutput]:
    """A bi-encoder's scores: the cosine of each pair's embeddings (one first text pairs with all)."""
    if len(first) == 1:
        first = first * len(second)
    pad = [tok.pad_token_id] if tok.pad_token_id is not None else []
    scores = []
    for a, b in zip(first, second):
        import torch  # pooling outputs are tensors: pooling models need torch
        cosine = torch.nn.functional.cosine_similarity(a.outputs.data.float(), b.outputs.data.float(), dim=0)
        pair = PoolingRequestOutput(request_id=f"{a.request_id}_{b.request_id}", outputs=PoolingOutput(cosine),
                                    prompt_token_ids=a.prompt_token_ids + pad + b.prompt_token_ids,
                                    num_cached_tokens=a.num_cached_tokens + b.num_cached_tokens, finished=True)
        scores.append(ScoringRequestOutput.from_base(pair))
    return scores
