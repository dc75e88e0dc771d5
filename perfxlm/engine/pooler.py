"""The pooling path beside the sampler: which rows of a pooling request's prompt the graph
returns, and what becomes of them (vLLM's poolers, in numpy on the host).

A pooling request is prefill only. Each step, the runner asks the graph for the rows its
pooling needs (`positions`): every prompt row for MEAN and the token tasks, the first for
CLS, the last for LAST; the engine keeps them (`collect`). When the whole prompt is computed
the request is pooled (`pool`): the rows averaged (MEAN) or taken, then the head: for
embeddings the Matryoshka truncation (`dimensions`) and the L2 normalisation, for classes the
calibration (logit_mean / logit_sigma) and the activation (softmax, or sigmoid for one
label); `use_activation=False` skips the normalisation or activation, as in vLLM.
"""

from typing import Any

import numpy as np

from perfxlm.config import PoolerConfig
from perfxlm.engine.request import Request

SUPPORTED_TASKS = {"embed": ("embed", "token_embed"), "classify": ("classify",)}


class Pooler:
    def __init__(self, model_task: str, config: PoolerConfig, hf_config: dict) -> None:
        self.model_task = model_task                 # "embed" or "classify": what the graph's rows are
        self.config = config
        self.classify_activation = _classify_activation(hf_config)

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        return SUPPORTED_TASKS[self.model_task]

    def positions(self, req: Request, start: int, n: int) -> range:
        """The prompt positions among [start, start + n) (this step's) whose rows req pools."""
        end = start + n
        if req.pooling_params.task.startswith("token_") or self.config.seq_pooling_type == "MEAN":
            return range(start, end)
        if self.config.seq_pooling_type == "CLS":
            return range(0, 1) if start == 0 else range(0)
        return range(end - 1, end) if end == req.num_prompt_tokens else range(0)  # LAST

    def collect(self, req: Request, positions: range, rows: np.ndarray) -> None:
        """Keep rows (len(positions), W) of the graph's output, by position (a request preempted
        and recomputed writes the same positions again)."""
        for p, row in zip(positions, rows):
            req.pooled_rows[p] = row.copy()  # the graph's output buffer is reused next step

    def pool(self, req: Request) -> Any:
        """The request's PoolingOutput data, a torch.Tensor: (D,) or (C,) for embed / classify,
        (T, D) for token_embed."""
        import torch  # vLLM's PoolingOutput.data is a tensor: pooling models need torch
        params = req.pooling_params
        rows = np.stack([req.pooled_rows[p] for p in sorted(req.pooled_rows)]).astype(np.float32)  # (R, W)
        if not params.task.startswith("token_"):
            rows = rows.mean(0, keepdims=True) if self.config.seq_pooling_type == "MEAN" else rows  # (1, W)
        data = torch.from_numpy(rows)
        if self.model_task == "embed":
            if params.dimensions is not None:
                data = data[:, :params.dimensions]
            if params.use_activation:
                data = torch.nn.functional.normalize(data, p=2, dim=-1)
        else:
            if self.config.logit_mean is not None:
                data = data - self.config.logit_mean
            if self.config.logit_sigma is not None:
                data = data / self.config.logit_sigma
            if params.use_activation:
                data = self.classify_activation(data)
        return data if params.task.startswith("token_") else data[0]


def _classify_activation(hf_config: dict):
    """vLLM's classifier activation (get_act_fn): by the config's problem_type, else a
    sentence-transformers cross-encoder's activation_fn, else softmax (sigmoid for one label)."""
    import torch
    problem = hf_config.get("problem_type")
    if problem == "regression":
        return lambda x: x
    if problem == "multi_label_classification":
        return torch.sigmoid
    name = (hf_config.get("sentence_transformers") or {}).get("activation_fn") \
        or hf_config.get("sbert_ce_default_activation_function")
    if name is not None:
        if not name.startswith("torch.nn.modules."):
            raise ValueError("Loading of activation functions is restricted to torch.nn.modules for security "
                             "reasons")
        kind = name.rsplit(".", 1)[-1]
        if kind == "Identity":
            return lambda x: x
        if kind not in ("Sigmoid", "Softmax"):
            raise NotImplementedError(f"perfxlm does not support the cross-encoder activation {name}")
    return lambda x: torch.sigmoid(x) if x.shape[-1] < 2 else torch.softmax(x, dim=-1)
