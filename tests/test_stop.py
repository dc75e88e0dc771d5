"""Stop semantics on SmolLM2 (float32 greedy): EOS, stop strings, stop token ids, min_tokens.

Greedy continuation of "The capital of France is" (vLLM golden): token ids
[7042 ' Paris', 30 '.', 198 '\\n', 198, 504 'The', 2988 ' answer', 314 ' is', ...]
text " Paris.\\n\\nThe answer is: 2018-01-22 12:12:53." then EOS (2) as the 30th token.
"""

from perfxlm import SamplingParams

PROMPT = "The capital of France is"
PARIS = [7042, 30, 198, 198, 504, 2988, 314]
EOS = 2


def run(llm, **kw):
    kw.setdefault("max_tokens", 32)
    return llm.generate(PROMPT, SamplingParams(temperature=0, **kw), use_tqdm=False)[0].outputs[0]


def test_eos_stops_without_text(smol_llm):
    c = run(smol_llm)
    assert c.token_ids[-1] == EOS and len(c.token_ids) == 30
    assert c.finish_reason == "stop" and c.stop_reason is None
    assert c.text == " Paris.\n\nThe answer is: 2018-01-22 12:12:53."


def test_ignore_eos_runs_to_max_tokens(smol_llm):
    c = run(smol_llm, ignore_eos=True)
    assert len(c.token_ids) == 32 and c.token_ids[29] == EOS
    assert c.finish_reason == "length" and c.stop_reason is None


def test_min_tokens_suppresses_eos(smol_llm):
    c = run(smol_llm, min_tokens=31, max_tokens=31)
    assert len(c.token_ids) == 31 and EOS not in c.token_ids
    assert c.finish_reason == "length"


def test_stop_string_is_cut_from_text(smol_llm):
    c = run(smol_llm, stop=["answer"])
    assert c.text == " Paris.\n\nThe "
    assert list(c.token_ids) == PARIS[:6]           # up to the token that completed the match
    assert c.finish_reason == "stop" and c.stop_reason == "answer"


def test_stop_string_kept_with_include_stop_str_in_output(smol_llm):
    c = run(smol_llm, stop=["answer"], include_stop_str_in_output=True)
    assert c.text == " Paris.\n\nThe answer" and c.stop_reason == "answer"


def test_stop_string_spanning_tokens(smol_llm):
    c = run(smol_llm, stop=["ris."])
    assert c.text == " Pa" and list(c.token_ids) == PARIS[:2]


def test_first_listed_stop_string_that_matches_wins(smol_llm):
    c = run(smol_llm, stop=["zzz", "\n\nThe"])
    assert c.text == " Paris." and c.stop_reason == "\n\nThe"


def test_stop_strings_wait_for_min_tokens(smol_llm):
    c = run(smol_llm, stop=["."], min_tokens=3)
    assert c.stop_reason == "." and c.text == " Paris.\n\nThe answer is: 2018-01-22 12:12:53"


def test_stop_token_id_is_kept_in_ids_not_text(smol_llm):
    c = run(smol_llm, stop_token_ids=[198])
    assert list(c.token_ids) == PARIS[:3]
    assert c.text == " Paris." and c.finish_reason == "stop" and c.stop_reason == 198
    kept = run(smol_llm, stop_token_ids=[198], include_stop_str_in_output=True)
    assert kept.text == " Paris.\n"


def test_bad_words_logit_bias_allowed_token_ids(smol_llm):
    assert run(smol_llm, bad_words=["Paris"], max_tokens=3).token_ids[0] != 7042
    forced = run(smol_llm, logit_bias={EOS: 100.0})
    assert list(forced.token_ids) == [EOS] and forced.text == "" and forced.finish_reason == "stop"
    allowed = run(smol_llm, allowed_token_ids=[30, 504], max_tokens=6)
    assert set(allowed.token_ids) <= {30, 504} and len(allowed.token_ids) == 6


def test_repetition_penalty_changes_a_repetitive_greedy_output(smol_llm):
    prompt = "The president of the United States is"
    plain = smol_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    penalised = smol_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=32, repetition_penalty=1.5),
                                  use_tqdm=False)[0]
    assert plain.outputs[0].text.count("The president") == 2
    assert penalised.outputs[0].text.count("The president") < 2


def test_skip_special_tokens_false_shows_eos(smol_llm):
    c = run(smol_llm, skip_special_tokens=False, include_stop_str_in_output=True)
    assert c.text.endswith("<|im_end|>")
