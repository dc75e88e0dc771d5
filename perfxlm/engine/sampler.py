"""Next-token sampling with vLLM's processing order and semantics.

Order: the structured outputs grammar's token mask (only on rows with a live
grammar), allowed_token_ids, bad_words, min_tokens, logit_bias, penalties
(repetition, frequency, presence), then greedy argmax, or temperature, min_p,
top-k/top-p and a draw. Logprobs are the log-softmax of the logits as the model
gave them, after the grammar mask only, as vLLM applies it before its sampler
(vLLM's default `raw_logprobs`).
"""

from dataclasses import dataclass

import torch

from hw_plugins.base import NativeSampler
from perfxlm.engine.request import Request
from perfxlm.engine.structured_output import GrammarBitmask
from perfxlm.sampling_params import SamplingType


@dataclass
class SamplerOutput:
    token_ids: list[int]                   # one per row
    logprobs: torch.Tensor | None = None   # (B, V) raw log-softmax, when some row asked for logprobs


class Sampler:
    def __init__(self, seed: int, native: NativeSampler | None = None) -> None:
        self.generator = torch.Generator().manual_seed(seed)  # for unseeded random requests
        # the logits' plugin's inverse CDF straight from logits (HwPlugin.native_sampler, the cpu
        # plugins'): one pass over each row instead of softmax + block sums in torch
        self.native = native
        self.grammar_bitmask = GrammarBitmask()

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        """logits (B, V) float32, one row per request -> one token per request."""
        self.grammar_bitmask.apply(logits, reqs)  # in place, rows of live grammars only
        if all(r.plain_draw for r in reqs):  # the usual random batch: one uniform a row, drawn as below
            u = torch.rand(len(reqs), 1, generator=self.generator)
            return SamplerOutput(self._inverse_cdf(logits, u).tolist())
        logprobs = None
        if any(r.sampling_params.logprobs is not None for r in reqs):
            logprobs = torch.log_softmax(logits, dim=-1)
        _apply_constraints(logits, reqs)
        _apply_penalties(logits, reqs)
        greedy = [r.sampling_params.sampling_type == SamplingType.GREEDY for r in reqs]
        tokens = _argmax(logits) if any(greedy) else None
        if not all(greedy):
            rows = [i for i, g in enumerate(greedy) if not g]
            sampled = self._sample(logits if len(rows) == logits.shape[0] else logits[rows], [reqs[i] for i in rows])
            tokens = sampled if tokens is None else tokens.index_put_((torch.tensor(rows),), sampled)
        return SamplerOutput(tokens.tolist(), logprobs)

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Random sampling of logits (R, V) for non-greedy requests -> (R,) token ids."""
        params = [r.sampling_params for r in reqs]
        temps = [p.temperature for p in params]
        if any(t != 1.0 for t in temps):  # x / 1.0 is x: skip a pass over (R, V) in the common case
            logits = logits / torch.tensor(temps).unsqueeze(1)
        min_p = torch.tensor([p.min_p for p in params])
        if (min_p > 0).any():
            probs = logits.softmax(dim=-1)
            threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
            logits.masked_fill_(probs < threshold, float("-inf"))
        vocab = logits.shape[1]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params]).clamp_(max=vocab)
        top_p = torch.tensor([p.top_p for p in params])
        if (top_k < vocab).any() or (top_p < 1).any():
            logits = apply_top_k_top_p(logits, top_k, top_p)
        tokens = torch.empty(len(reqs), dtype=torch.int64)
        # Each seeded request draws from its own generator, so its output is batch-independent:
        # argmax(p / q) with q ~ Exp(1) (the Gumbel-max trick, as vLLM) samples from p.
        seeded = [i for i, r in enumerate(reqs) if r.generator is not None]
        if seeded:
            probs = (logits if len(seeded) == len(reqs) else logits[seeded]).softmax(dim=-1)
            for k, i in enumerate(seeded):
                q = torch.empty_like(probs[k]).exponential_(generator=reqs[i].generator)
                tokens[i] = probs[k].div_(q).argmax()
        # The unseeded rows share one generator and need no per-token noise: inverse CDF, one
        # uniform per row instead of a uniform and a log per token.
        unseeded = [i for i, r in enumerate(reqs) if r.generator is None]
        if unseeded:
            rows = logits if len(unseeded) == len(reqs) else logits[unseeded]
            u = torch.rand(len(unseeded), 1, generator=self.generator)
            tokens[unseeded] = self._inverse_cdf(rows, u)
        return tokens

    def _inverse_cdf(self, logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """logits (R, V), u (R, 1) -> (R,) tokens by inverse CDF of softmax(logits)."""
        if self.native is None or logits.device.type != "cpu" or logits.dtype != torch.float32 \
                or logits.stride(1) != 1:
            return inverse_cdf(logits.softmax(dim=-1), u)
        tokens = torch.from_numpy(self.native(logits.numpy(), u.numpy().reshape(-1)))
        bad = (tokens < 0).nonzero().flatten()
        if len(bad):  # no finite max (NaN, +inf, all masked): whatever torch's softmax makes of it
            tokens[bad] = inverse_cdf(logits[bad].softmax(dim=-1), u[bad])
        return tokens


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of logits (B, V), the first of equal maxima (NaN counts as the largest),
    as torch's; numpy's is the faster of the two on CPU rows."""
    if logits.device.type != "cpu":
        return logits.argmax(dim=-1)
    return torch.from_numpy(logits.numpy().argmax(axis=-1))


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """For each row of probs (R, V) (unnormalised is fine) the token where its CDF crosses
    u (R, 1) in [0, 1) of the row's total: the first block of `block` tokens whose running
    sum passes it, then the token inside that block (two short scans: a full-row cumsum is
    single-threaded). Never a zero-probability token."""
    R, V = probs.shape
    full = V // block * block
    sums = probs[:, :full].view(R, full // block, block).sum(dim=-1)                # (R, nb)
    if full < V:
        sums = torch.cat([sums, probs[:, full:].sum(dim=-1, keepdim=True)], dim=1)
    nb = sums.shape[1]
    bcdf = sums.cumsum(dim=-1)
    target = u * bcdf[:, -1:]
    b = torch.searchsorted(bcdf, target, right=True).clamp_(max=nb - 1)        # (R, 1): its sum > 0
    before = torch.where(b > 0, bcdf.gather(1, (b - 1).clamp_(min=0)), torch.zeros_like(target))
    cols = b * block + torch.arange(block)                                     # (R, block)
    inner = probs.gather(1, cols.clamp(max=V - 1)).masked_fill_(cols >= V, 0)
    icdf = inner.cumsum(dim=-1)
    k = torch.searchsorted(icdf, target - before, right=True).squeeze(1)       # (R,)
    for r in (k >= block).nonzero().flatten().tolist():  # rounding put the target past the block's sum
        k[r] = inner[r].nonzero()[-1, 0]
    return b.squeeze(1) * block + k


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Mask logits (R, V) outside each row's top k (R,) and top-p nucleus (R,) to -inf."""
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    kth = logits_sort.gather(1, (logits_sort.shape[1] - k).unsqueeze(1))  # k-th largest per row
    logits_sort.masked_fill_(logits_sort < kth, float("-inf"))
    cum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
    outside = cum <= (1 - p).unsqueeze(1)
    outside[:, -1] = False  # always keep the most likely token
    logits_sort.masked_fill_(outside, float("-inf"))
    return logits.scatter(-1, logits_idx, logits_sort)


def _apply_constraints(logits: torch.Tensor, reqs: list[Request]) -> None:
    """allowed_token_ids, bad_words, min_tokens and logit_bias, in place on logits (B, V)."""
    for i, r in enumerate(reqs):
        p = r.sampling_params
        if p.allowed_token_ids is not None:
            keep = torch.zeros(logits.shape[1], dtype=torch.bool)
            keep[p.allowed_token_ids] = True
            logits[i].masked_fill_(~keep, float("-inf"))
        for word in p.bad_words_token_ids or ():
            prefix = word[:-1]
            if len(prefix) <= r.num_output_tokens and (not prefix or r.output_token_ids[-len(prefix):] == prefix):
                logits[i, word[-1]] = float("-inf")
        if r.num_output_tokens < p.min_tokens and p.all_stop_token_ids:
            logits[i, list(p.all_stop_token_ids)] = float("-inf")
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias.keys()))
            logits[i, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)


def _apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> None:
    """Repetition (prompt + output tokens), frequency and presence (output tokens), in place."""
    for i, r in enumerate(reqs):
        p = r.sampling_params
        if p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0:
            continue
        counts = torch.bincount(torch.tensor(r.output_token_ids, dtype=torch.int64),
                                minlength=logits.shape[1])[: logits.shape[1]].to(logits.dtype)
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            seen[torch.tensor(r.prompt_token_ids)] = True
            row = logits[i]
            scaled = row * torch.where(row > 0, 1.0 / p.repetition_penalty, p.repetition_penalty)
            logits[i] = torch.where(seen, scaled, row)
        logits[i] -= p.frequency_penalty * counts
        logits[i] -= p.presence_penalty * (counts > 0).to(logits.dtype)
