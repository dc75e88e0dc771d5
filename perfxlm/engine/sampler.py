"""Next-token sampling with vLLM's processing order and semantics, on numpy (no torch: the
engine's request path runs on boards without it).

Order: the structured outputs grammar's token mask (only on rows with a live
grammar), allowed_token_ids, bad_words, min_tokens, logit_bias, penalties
(repetition, frequency, presence), then greedy argmax, or temperature, min_p,
top-k/top-p and a draw. Logprobs are the log-softmax of the logits as the model
gave them, after the grammar mask only, as vLLM applies it before its sampler
(vLLM's default `raw_logprobs`).
"""

from dataclasses import dataclass

import numpy as np

from hw_plugins.base import NativeSampler
from perfxlm.engine.request import Request
from perfxlm.engine.structured_output import GrammarBitmask
from perfxlm.sampling_params import SamplingType


@dataclass
class SamplerOutput:
    token_ids: list[int]                   # one per row
    logprobs: np.ndarray | None = None     # (B, V) raw log-softmax, when some row asked for logprobs


def make_generator(seed: int) -> np.random.Generator:
    """A generator for `seed`, any int in config.SEED_RANGE (negative seeds wrap, as torch's)."""
    return np.random.default_rng(seed % (1 << 64))


class Sampler:
    def __init__(self, seed: int, native: NativeSampler | None = None) -> None:
        self.generator = make_generator(seed)  # for unseeded random requests
        # the logits' plugin's inverse CDF straight from logits (HwPlugin.native_sampler, the cpu
        # plugins'): one pass over each row instead of softmax + block sums in numpy
        self.native = native
        self.grammar_bitmask = GrammarBitmask()

    def __call__(self, logits: np.ndarray, reqs: list[Request]) -> SamplerOutput:
        """logits (B, V) float32, one row per request (modified in place) -> one token per request."""
        self.grammar_bitmask.apply(logits, reqs)  # in place, rows of live grammars only
        if all(r.plain_draw for r in reqs):  # the usual random batch: one uniform a row, drawn as below
            u = self.generator.random(len(reqs), dtype=np.float32)
            return SamplerOutput(self._inverse_cdf(logits, u).tolist())
        logprobs = None
        if any(r.sampling_params.logprobs is not None for r in reqs):
            logprobs = log_softmax(logits)
        _apply_constraints(logits, reqs)
        _apply_penalties(logits, reqs)
        greedy = [r.sampling_params.sampling_type == SamplingType.GREEDY for r in reqs]
        tokens = logits.argmax(axis=-1) if any(greedy) else None  # NaN counts as the largest, as torch's
        if not all(greedy):
            rows = [i for i, g in enumerate(greedy) if not g]
            sampled = self._sample(logits if len(rows) == logits.shape[0] else logits[rows], [reqs[i] for i in rows])
            if tokens is None:
                tokens = sampled
            else:
                tokens[rows] = sampled
        return SamplerOutput(tokens.tolist(), logprobs)

    def _sample(self, logits: np.ndarray, reqs: list[Request]) -> np.ndarray:
        """Random sampling of logits (R, V) for non-greedy requests -> (R,) token ids."""
        params = [r.sampling_params for r in reqs]
        temps = [p.temperature for p in params]
        if any(t != 1.0 for t in temps):  # x / 1.0 is x: skip a pass over (R, V) in the common case
            logits = logits / np.array(temps, np.float32)[:, None]
        min_p = np.array([p.min_p for p in params], np.float32)
        if (min_p > 0).any():
            probs = softmax(logits)
            threshold = probs.max(axis=-1, keepdims=True) * min_p[:, None]
            logits[probs < threshold] = -np.inf
        vocab = logits.shape[1]
        top_k = np.minimum([p.top_k if p.top_k > 0 else vocab for p in params], vocab)
        top_p = np.array([p.top_p for p in params], np.float32)
        if (top_k < vocab).any() or (top_p < 1).any():
            logits = apply_top_k_top_p(logits, top_k, top_p)
        tokens = np.empty(len(reqs), dtype=np.int64)
        # Each seeded request draws from its own generator, so its output is batch-independent:
        # argmax(p / q) with q ~ Exp(1) (the Gumbel-max trick, as vLLM) samples from p.
        seeded = [i for i, r in enumerate(reqs) if r.generator is not None]
        if seeded:
            probs = softmax(logits if len(seeded) == len(reqs) else logits[seeded])
            for k, i in enumerate(seeded):
                q = reqs[i].generator.standard_exponential(vocab, dtype=np.float32)
                # a float32 draw is exactly 0 about once in 2^24 (a few times a step over a
                # large vocabulary's batch): 0 / 0 would make a masked token the NaN argmax
                np.maximum(q, np.finfo(np.float32).tiny, out=q)
                tokens[i] = (probs[k] / q).argmax()
        # The unseeded rows share one generator and need no per-token noise: inverse CDF, one
        # uniform per row instead of a uniform and a log per token.
        unseeded = [i for i, r in enumerate(reqs) if r.generator is None]
        if unseeded:
            rows = logits if len(unseeded) == len(reqs) else logits[unseeded]
            u = self.generator.random(len(unseeded), dtype=np.float32)
            tokens[unseeded] = self._inverse_cdf(rows, u)
        return tokens

    def _inverse_cdf(self, logits: np.ndarray, u: np.ndarray) -> np.ndarray:
        """logits (R, V), u (R,) -> (R,) tokens by inverse CDF of softmax(logits)."""
        if self.native is None or logits.dtype != np.float32 or not logits.flags.c_contiguous:
            return inverse_cdf(softmax(logits), u)
        tokens = np.asarray(self.native(logits, u), dtype=np.int64)
        bad = np.flatnonzero(tokens < 0)
        if len(bad):  # no finite max (NaN, +inf, all masked): whatever softmax makes of it
            tokens[bad] = inverse_cdf(softmax(logits[bad]), u[bad])
        return tokens


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax of x (R, V) in x's dtype; a row with no finite max gives NaN, as torch's."""
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of x (R, V) in x's dtype."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        shifted = x - x.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def inverse_cdf(probs: np.ndarray, u: np.ndarray, block: int = 256) -> np.ndarray:
    """For each row of probs (R, V) (unnormalised is fine) the token where its CDF crosses
    u (R,) in [0, 1) of the row's total: the first block of `block` tokens whose running
    sum passes it, then the token inside that block (two short scans instead of a full-row
    cumsum). Never a zero-probability token."""
    R, V = probs.shape
    u = np.asarray(u, dtype=probs.dtype).reshape(R, 1)
    full = V // block * block
    sums = probs[:, :full].reshape(R, full // block, block).sum(axis=-1)          # (R, nb)
    if full < V:
        sums = np.concatenate([sums, probs[:, full:].sum(axis=-1, keepdims=True)], axis=1)
    nb = sums.shape[1]
    bcdf = np.cumsum(sums, axis=-1)
    target = u * bcdf[:, -1:]                                                      # (R, 1)
    # searchsorted(right) row by row: how many running sums are <= the target
    b = np.minimum((bcdf <= target).sum(axis=-1), nb - 1)                          # (R,): its sum > 0
    rows = np.arange(R)
    before = np.where(b > 0, bcdf[rows, np.maximum(b - 1, 0)], 0).astype(probs.dtype)
    cols = b[:, None] * block + np.arange(block)                                   # (R, block)
    inner = probs[rows[:, None], np.minimum(cols, V - 1)]
    inner[cols >= V] = 0
    icdf = np.cumsum(inner, axis=-1)
    k = (icdf <= (target[:, 0] - before)[:, None]).sum(axis=-1)                    # (R,)
    for r in np.flatnonzero(k >= block):  # rounding put the target past the block's sum
        k[r] = np.flatnonzero(inner[r])[-1]
    return b * block + k


def apply_top_k_top_p(logits: np.ndarray, k: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Mask logits (R, V) outside each row's top k (R,) and top-p nucleus (R,) to -inf."""
    V = logits.shape[1]
    idx = np.argsort(logits, axis=-1, kind="stable")
    logits_sort = np.take_along_axis(logits, idx, axis=-1)
    kth = np.take_along_axis(logits_sort, (V - np.asarray(k))[:, None], axis=1)  # k-th largest per row
    logits_sort[logits_sort < kth] = -np.inf
    cum = np.cumsum(softmax(logits_sort), axis=-1)
    outside = cum <= (1 - np.asarray(p, logits.dtype))[:, None]
    outside[:, -1] = False  # always keep the most likely token
    logits_sort[outside] = -np.inf
    out = np.empty_like(logits)
    np.put_along_axis(out, idx, logits_sort, axis=-1)
    return out


def _apply_constraints(logits: np.ndarray, reqs: list[Request]) -> None:
    """allowed_token_ids, bad_words, min_tokens and logit_bias, in place on logits (B, V)."""
    for i, r in enumerate(reqs):
        p = r.sampling_params
        if p.allowed_token_ids is not None:
            keep = np.zeros(logits.shape[1], dtype=bool)
            keep[p.allowed_token_ids] = True
            logits[i, ~keep] = -np.inf
        for word in p.bad_words_token_ids or ():
            prefix = word[:-1]
            if len(prefix) <= r.num_output_tokens and (not prefix or r.output_token_ids[-len(prefix):] == prefix):
                logits[i, word[-1]] = -np.inf
        if r.num_output_tokens < p.min_tokens and p.all_stop_token_ids:
            logits[i, list(p.all_stop_token_ids)] = -np.inf
        if p.logit_bias:
            ids = np.array(list(p.logit_bias.keys()), np.int64)
            logits[i, ids] += np.array(list(p.logit_bias.values()), dtype=logits.dtype)


def _apply_penalties(logits: np.ndarray, reqs: list[Request]) -> None:
    """Repetition (prompt + output tokens), frequency and presence (output tokens), in place."""
    V = logits.shape[1]
    for i, r in enumerate(reqs):
        p = r.sampling_params
        if p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0:
            continue
        counts = np.bincount(np.array(r.output_token_ids, np.int64), minlength=V)[:V].astype(logits.dtype)
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            seen[np.array(r.prompt_token_ids, np.int64)] = True
            scaled = row * np.where(row > 0, np.float32(1.0 / p.repetition_penalty),
                                    np.float32(p.repetition_penalty))
            row[seen] = scaled[seen]
        row -= np.float32(p.frequency_penalty) * counts
        row -= np.float32(p.presence_penalty) * (counts > 0).astype(logits.dtype)
