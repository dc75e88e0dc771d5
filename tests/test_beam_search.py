"""LLM.beam_search against references computed from a transformers forward of the same weights:
an exhaustive table of next-token logprobs for every sequence up to the length searched, the
beam rule run over that table, and, where beam search must find it, the exhaustive optimum."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perfxlm import LLM
from perfxlm.beam_search import BeamSearchOutput, BeamSearchParams, get_beam_search_score
from perfxlm.exceptions import VLLMValidationError
from tests.conftest import SMALL_KV, assert_no_leaks, build_tiny_model

V = 8        # vocabulary of the tiny model: small enough to enumerate every sequence, >= 2 * width
EOS = 2      # the SmolLM2 tokenizer's EOS id, inside that vocabulary
MAX_LEN = 6
PROMPTS = [[1, 3, 4], [1, 0]]


@pytest.fixture(scope="module")
def tiny_dir(smol_tokenizer, tmp_path_factory) -> Path:
    """The tiny model, its EOS row of lm_head made close to token 0's (often the likeliest) so
    that EOS is a likely candidate at most steps (random weights alone rarely end a best beam)."""
    from transformers import AutoModelForCausalLM
    path = build_tiny_model(tmp_path_factory.mktemp("tiny_v8"), "LlamaForCausalLM", smol_tokenizer, vocab_size=V)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        w = model.lm_head.weight                                                          # (V, hidden)
        w[EOS] = 0.9 * w[0] + 0.5 * torch.randn(w.shape[1], generator=torch.Generator().manual_seed(1))
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def llm(tiny_dir):
    llm = LLM(str(tiny_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV)
    yield llm
    assert_no_leaks(llm)


@pytest.fixture(scope="module")
def tables(tiny_dir) -> dict[tuple[int, ...], dict[tuple[int, ...], torch.Tensor]]:
    """prompt -> {prompt + k generated tokens (k < MAX_LEN): log-softmax of the next token (V,)},
    from one transformers forward over every continuation of length MAX_LEN - 1."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    out = {}
    for prompt in PROMPTS:
        conts = torch.tensor(list(itertools.product(range(V), repeat=MAX_LEN - 1)))         # (V^5, 5)
        ids = torch.cat([torch.tensor(prompt).expand(len(conts), -1), conts], dim=1)        # (V^5, P+5)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.double(), dim=-1)                    # (V^5, P+5, V)
        table = {}
        for row, seq in enumerate(ids.tolist()):
            for k in range(MAX_LEN):
                table.setdefault(tuple(seq[:len(prompt) + k]), logp[row, len(prompt) + k - 1])
        out[tuple(prompt)] = table
    return out


def _score(tokens: list[int], cum: float, lp: float) -> float:
    n = len(tokens) - (tokens[-1] == EOS)
    return cum / n ** lp


def reference_beam(table, prompt, width, steps, lp, ignore_eos):
    """The beam rule over the exact table: 2*width candidates a beam, EOS completes."""
    live, done = [(list(prompt), 0.0)], []
    for _ in range(steps):
        if not live:
            break
        cands = []
        for toks, cum in live:
            row = table[tuple(toks)]
            for t in torch.argsort(row, descending=True)[:2 * width].tolist():
                new = (toks + [t], cum + row[t].item())
                (done if t == EOS and not ignore_eos else cands).append(new)
        live = sorted(cands, key=lambda b: _score(*b, lp), reverse=True)[:width]
    return sorted(done + live, key=lambda b: _score(*b, lp), reverse=True)[:width]


def exhaustive_best(table, prompt, width, steps, lp):
    """The `width` best of every finished sequence: ended by EOS, or `steps` tokens long."""
    seqs = []
    for n in range(1, steps + 1):
        for cont in itertools.product(range(V), repeat=n):
            if EOS in cont[:-1] or (n < steps and cont[-1] != EOS):
                continue
            toks = list(prompt) + list(cont)
            cum = sum(table[tuple(toks[:len(prompt) + i])][t].item() for i, t in enumerate(cont))
            seqs.append((toks, cum))
    return sorted(seqs, key=lambda b: _score(*b, lp), reverse=True)[:width]


def _check(got: BeamSearchOutput, want: list[tuple[list[int], float]], prompt: list[int], table) -> None:
    assert [s.tokens for s in got.sequences] == [w[0] for w in want]
    for seq, (_, cum) in zip(got.sequences, want):
        assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
        generated = seq.tokens[len(prompt):]
        assert len(seq.logprobs) == len(generated)
        for i, (t, step) in enumerate(zip(generated, seq.logprobs)):  # the engine's logprob of each token
            assert step[t].logprob == pytest.approx(table[tuple(seq.tokens[:len(prompt) + i])][t].item(), abs=1e-4)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("ignore_eos", [False, True])
def test_matches_reference(llm, tables, width, length_penalty, ignore_eos):
    hit_eos = False
    for steps in (1, 3, MAX_LEN):
        params = BeamSearchParams(beam_width=width, max_tokens=steps, length_penalty=length_penalty,
                                  ignore_eos=ignore_eos)
        outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
        assert len(outs) == len(PROMPTS)
        for out, prompt in zip(outs, PROMPTS):
            table = tables[tuple(prompt)]
            _check(out, reference_beam(table, prompt, width, steps, length_penalty, ignore_eos), prompt, table)
            scores = [get_beam_search_score(s.tokens, s.cum_logprob, EOS, length_penalty) for s in out.sequences]
            assert scores == sorted(scores, reverse=True)
            hit_eos |= any(s.tokens[-1] == EOS for s in out.sequences)
            if ignore_eos:
                assert all(len(s.tokens) == len(prompt) + steps for s in out.sequences)
            else:
                assert all(EOS not in s.tokens[len(prompt):-1] for s in out.sequences)
            # where the beam keeps every live sequence but the last step's, beam search is exhaustive
            if not ignore_eos and 2 * width >= V and width >= (V - 1) ** (steps - 1):
                _check(out, exhaustive_best(table, prompt, width, steps, length_penalty), prompt, table)
    if not ignore_eos and width >= 2:
        assert hit_eos, "no EOS case was exercised"
    assert_no_leaks(llm)


def test_concurrency_limit_and_prompt_forms(llm):
    params = BeamSearchParams(beam_width=3, max_tokens=4, length_penalty=0.7)
    all_at_once = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    one_by_one = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params, concurrency_limit=1)
    bare = llm.beam_search(PROMPTS, params, use_tqdm=True)
    for a, b, c in zip(all_at_once, one_by_one, bare):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences] == [s.tokens for s in c.sequences]
        assert all(s.text is not None and s.finish_reason is None for s in a.sequences)
    assert all_at_once[0].sequences[0].orig_prompt == {"type": "token", "prompt_token_ids": PROMPTS[0]}


def test_bad_arguments(llm):
    with pytest.raises(VLLMValidationError, match="beam_width must be at least 1, got 0"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(VLLMValidationError, match="beam_width must be an int"):
        BeamSearchParams(beam_width=2.0, max_tokens=4)
    params = BeamSearchParams(beam_width=2, max_tokens=3)
    with pytest.raises(VLLMValidationError, match="LoRA is not enabled"):
        llm.beam_search(PROMPTS, params, lora_request=object())
    with pytest.raises(VLLMValidationError, match="out of vocabulary"):
        llm.beam_search([[1, V + 3]], params)
    with pytest.raises(VLLMValidationError):  # 2 * 11 logprobs > max_logprobs (20), as in vLLM
        llm.beam_search(PROMPTS, BeamSearchParams(beam_width=11, max_tokens=2))
    assert_no_leaks(llm)


def test_smollm2_text_prompt_width_one_is_greedy(smol_llm):
    from perfxlm import SamplingParams
    prompt = "The capital of France is"
    beam = smol_llm.beam_search([prompt], BeamSearchParams(beam_width=1, max_tokens=8))[0].sequences[0]
    greedy = smol_llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, logprobs=1),
                               use_tqdm=False)[0]
    assert beam.tokens == greedy.prompt_token_ids + greedy.outputs[0].token_ids
    assert beam.cum_logprob == pytest.approx(greedy.outputs[0].cumulative_logprob, abs=1e-3)
    assert beam.text.startswith(prompt) and beam.text == smol_llm.get_tokenizer().decode(beam.tokens,
                                                                                          skip_special_tokens=True)
    wide = smol_llm.beam_search([{"prompt": prompt}], BeamSearchParams(beam_width=3, max_tokens=8))[0]
    assert len(wide.sequences) == 3 and wide.sequences[0].cum_logprob >= beam.cum_logprob - 1e-6
    assert_no_leaks(smol_llm)


def test_example_runs():
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "examples" / "beam_search.py")], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("cum_logprob=") == 9 and "The capital of France is" in proc.stdout
