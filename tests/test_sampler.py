"""Sampler processing on hand-made logits (numpy, as the engine hands them): penalties, biases,
masks, top-k/top-p/min-p, draws; torch only as a reference."""

import math

import numpy as np
import pytest
import torch

from perfxlm.engine.request import Request
from perfxlm.engine.sampler import Sampler, _apply_constraints, _apply_penalties, apply_top_k_top_p
from perfxlm.sampling_params import SamplingParams


def req(prompt=(1,), output=(), **params) -> Request:
    r = Request("r", list(prompt), SamplingParams(**params), eos_token_id=0, max_tokens=16)
    for t in output:
        r.append_output_token(t)
    return r


def test_penalties_follow_vllm_formulas():
    logits = np.array([[2.0, -2.0, 1.0, 3.0, 0.5]], np.float32)
    r = req(prompt=[0], output=[1, 3, 3], repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    _apply_penalties(logits, [r])
    # token 0: prompt only -> repetition only (2/2); 1: output once -> -2*2 - 0.5 - 0.25
    # 2: unseen; 3: output twice -> 3/2 - 2*0.5 - 0.25; 4: unseen
    assert logits[0].tolist() == pytest.approx([1.0, -4.75, 1.0, 0.25, 0.5])


def test_constraints_allowed_bias_bad_words_min_tokens():
    logits = np.zeros((1, 6), np.float32)
    _apply_constraints(logits, [req(allowed_token_ids=[2, 4])])
    assert np.isinf(logits[0, [0, 1, 3, 5]]).all() and (logits[0, [2, 4]] == 0).all()
    logits = np.zeros((1, 6), np.float32)
    _apply_constraints(logits, [req(logit_bias={1: 5.0, 2: -3.0})])
    assert logits[0].tolist() == [0, 5, -3, 0, 0, 0]
    # bad word [4, 5]: 5 is banned only right after 4; single-token bad word [3] always
    r = req(output=[4])
    r.sampling_params._bad_words_token_ids = [[4, 5], [3]]
    logits = np.zeros((1, 6), np.float32)
    _apply_constraints(logits, [r])
    assert math.isinf(logits[0, 5]) and math.isinf(logits[0, 3]) and logits[0, 4] == 0
    r = req(output=[2])
    r.sampling_params._bad_words_token_ids = [[4, 5]]
    logits = np.zeros((1, 6), np.float32)
    _apply_constraints(logits, [r])
    assert not np.isinf(logits).any()
    # min_tokens masks every stop id (EOS included) until reached
    r = req(min_tokens=2, stop_token_ids=[3])
    r.sampling_params.update_from_generation_config({}, eos_token_id=0)
    logits = np.zeros((1, 6), np.float32)
    _apply_constraints(logits, [r])
    assert math.isinf(logits[0, 0]) and math.isinf(logits[0, 3]) and logits[0, 1] == 0


def test_top_k_top_p_masks():
    logits = np.array([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]], np.float32)
    out = apply_top_k_top_p(logits.copy(), np.array([2, 4]), np.array([1.0, 0.5], np.float32))
    assert np.isinf(out[0, [0, 3]]).all() and not np.isinf(out[0, [1, 2]]).any()
    # row 1: softmax(4,3,2,1) = .64,.24,.09,.03: top_p=0.5 keeps only the top token
    assert not np.isinf(out[1, 1]) and np.isinf(out[1, [0, 2, 3]]).all()


def test_greedy_and_random_rows_in_one_batch():
    logits = np.array([[0.0, 5.0, 1.0], [0.0, 0.0, 0.0]], np.float32)
    s = Sampler(seed=0)
    greedy, rand = req(temperature=0), req(temperature=1.0, top_k=1)
    out = s(logits.copy(), [greedy, rand])
    assert out.token_ids[0] == 1 and out.token_ids[1] in (0, 1, 2)


def test_sampling_follows_the_distribution_and_filters():
    probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    logits = np.tile(np.log(probs), (4000, 1))
    s = Sampler(seed=0)
    counts = np.bincount(s(logits.copy(), [req(temperature=1.0)] * 4000).token_ids, minlength=4)
    assert np.allclose(counts / 4000, probs, atol=0.03)
    top2 = s(logits.copy(), [req(temperature=1.0, top_k=2)] * 2000).token_ids
    assert set(top2) == {0, 1}
    nucleus = s(logits.copy(), [req(temperature=1.0, top_p=0.7)] * 2000).token_ids
    assert set(nucleus) == {0, 1}
    minp = s(logits.copy(), [req(temperature=1.0, min_p=0.5)] * 2000).token_ids
    assert set(minp) == {0, 1}  # 0.3 >= 0.5 * 0.5, 0.15 is not
    cold = s(logits.copy(), [req(temperature=0.05)] * 500).token_ids
    assert set(cold) == {0}


def test_plain_random_batches_take_the_short_path_and_draw_the_same_tokens():
    plain = [req(temperature=1.0) for _ in range(6)]
    assert all(r.plain_draw for r in plain)
    assert not any(r.plain_draw for r in (req(temperature=0), req(temperature=0.7), req(top_k=5), req(top_p=0.9),
                                          req(min_p=0.1), req(seed=1), req(logprobs=1), req(logit_bias={1: 1.0}),
                                          req(presence_penalty=0.5), req(allowed_token_ids=[1, 2])))
    logits = np.random.default_rng(0).standard_normal((6, 300), dtype=np.float32)
    short = Sampler(seed=3)(logits.copy(), plain).token_ids
    for r in plain:  # the same requests through the general path: the same uniforms, the same tokens
        r.plain_draw = False
    assert Sampler(seed=3)(logits.copy(), plain).token_ids == short


def test_logprobs_are_raw_and_seeded_draws_repeat():
    logits = np.array([[0.0, 1.0, 2.0]], np.float32)
    s = Sampler(seed=0)
    out = s(logits.copy(), [req(temperature=0.5, logprobs=2, logit_bias={0: 50.0})])
    want = torch.log_softmax(torch.from_numpy(logits), -1).numpy()  # before bias and temperature
    assert np.allclose(out.logprobs, want, atol=1e-6)
    a = [s(np.zeros((1, 50), np.float32), [req(temperature=1.0, seed=5)]).token_ids[0] for _ in range(2)]
    assert a[0] == a[1]


def test_inverse_cdf_maps_uniform_quantiles_to_each_token_in_proportion():
    from perfxlm.engine.sampler import inverse_cdf
    V, n = 1000, 20000  # V not a multiple of the block; zero-probability runs across block edges
    p = np.random.default_rng(0).random(V, dtype=np.float32) + np.float32(0.01)
    p[250:270] = 0
    p[990:] = 0
    p[0] = 0
    p = p / p.sum()
    u = ((np.arange(n) + 0.5) / n).astype(np.float32)  # evenly spread quantiles instead of random draws
    tokens = inverse_cdf(np.tile(p, (n, 1)), u, block=64)
    counts = np.bincount(tokens, minlength=V) / n
    assert counts[p == 0].sum() == 0
    assert np.abs(counts - p.astype(np.float64)).max() < 2.0 / n + 1e-6  # each token gets its share of quantiles
    edge = inverse_cdf(p[None], np.array([1.0], np.float32), block=64)  # u rounded up to the total
    assert p[edge[0]] > 0


def test_greedy_argmax_takes_the_first_of_equal_maxima_and_nan_like_torch():
    logits = torch.randn(4, 1000)
    logits[1, 7] = logits[1, 9] = 50.0            # a tie: the first index wins
    logits[2, 3] = logits[2, 8] = float("nan")    # NaN counts as the largest, the first one
    logits[3, -1] = 60.0
    out = Sampler(seed=0)(logits.numpy().copy(), [req(temperature=0) for _ in range(4)])
    assert out.token_ids == logits.argmax(dim=-1).tolist() and out.token_ids[1:] == [7, 3, 999]


def _native_sampler():
    from hw_plugins.cpu.plugin import CpuPlugin
    plugin = CpuPlugin()
    if not plugin.is_available():
        pytest.skip(f"cpu plugin: {plugin.unavailable_reason()}")
    return plugin.sample_rows


def test_native_inverse_cdf_from_logits_maps_quantiles_in_proportion():
    sample_rows = _native_sampler()
    V, n = 1000, 20000  # zero-probability (-inf) runs across the kernel's 256-token blocks
    p = torch.rand(V, dtype=torch.float64) + 0.01
    p[250:270] = 0
    p[990:] = 0
    p[0] = 0
    p = p / p.sum()
    logits = (p.log() + 3.0).float()  # a shift softmax removes; log(0) = -inf
    u = ((torch.arange(n) + 0.5) / n).float()
    tokens = torch.from_numpy(sample_rows(logits.repeat(n, 1).numpy(), u.numpy()))
    counts = torch.bincount(tokens, minlength=V).double() / n
    assert counts[p == 0].sum() == 0
    assert (counts - p).abs().max() < 2.0 / n + 1e-6
    # the same tokens as torch's softmax + inverse_cdf wherever u is not at a CDF step's edge
    from perfxlm.engine.sampler import inverse_cdf
    want = torch.from_numpy(inverse_cdf(logits.softmax(-1).repeat(n, 1).numpy(), u.numpy()))
    cdf = p.cumsum(0)
    near_edge = (cdf.unsqueeze(0) - u.double().unsqueeze(1)).abs().min(dim=1).values < 1e-5
    assert ((tokens == want) | near_edge).all()
    edge = sample_rows(logits.unsqueeze(0).numpy(), torch.tensor([0.99999994]).numpy())
    assert p[edge[0]] > 0
    bad = torch.stack([logits, logits, torch.full((V,), float("-inf"))])
    bad[1, 5] = float("nan")
    bad[0, 7] = float("inf")
    assert sample_rows(bad.numpy(), torch.tensor([0.5, 0.5, 0.5]).numpy()).tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="float32 rows"):
        sample_rows(logits.double().unsqueeze(0).numpy(), u[:1].numpy())


def test_sampler_with_the_native_kernel_follows_the_distribution_and_filters():
    s = Sampler(seed=0, native=_native_sampler())
    probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    logits = np.tile(np.log(probs), (4000, 1))
    counts = np.bincount(s(logits.copy(), [req(temperature=1.0)] * 4000).token_ids, minlength=4)
    assert np.allclose(counts / 4000, probs, atol=0.03)
    assert set(s(logits.copy(), [req(temperature=1.0, top_k=2)] * 2000).token_ids) == {0, 1}
    assert set(s(logits.copy(), [req(temperature=1.0, min_p=0.5)] * 2000).token_ids) == {0, 1}
    # a NaN row is left to softmax + inverse_cdf (whatever they make of it); the other rows still sample
    rows = np.array([[0.0, np.nan, 0.0], [-np.inf, 0.0, -np.inf]], np.float32)
    out = s(rows, [req(temperature=1.0), req(temperature=1.0)]).token_ids
    assert out[1] == 1 and 0 <= out[0] < 3


def test_engine_samples_natively_on_the_cpu_plugin_only():
    from perfxlm import LLM
    _native_sampler()
    llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct", hw_plugin="cpu", max_model_len=256)
    assert llm.llm_engine.sampler.native is not None
    out = llm.generate(["Hello"], SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5
    llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct", hw_plugin="torch", max_model_len=256)
    assert llm.llm_engine.sampler.native is None  # the torch reference plugin has no native sampler
