"""LLM.chat on SmolLM2: the GGUF's chat template, overrides, continue_final_message."""

import pytest

from perfxlm import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_uses_the_tokenizer_template(smol_llm):
    tok = smol_llm.get_tokenizer()
    out = smol_llm.chat(QUESTION, GREEDY, use_tqdm=False)[0]
    expected_text = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert out.prompt == expected_text
    assert out.prompt_token_ids == tok.encode(expected_text, add_special_tokens=False)
    assert out.prompt.endswith("<|im_start|>assistant\n")
    assert "Paris" in out.outputs[0].text and out.outputs[0].finish_reason == "stop"


def test_chat_batch_of_conversations_and_content_parts(smol_llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    outs = smol_llm.chat([QUESTION, parts], GREEDY, use_tqdm=False)
    assert len(outs) == 2 and outs[0].prompt_token_ids == outs[1].prompt_token_ids
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_add_generation_prompt_false_and_continue_final_message(smol_llm):
    no_gen = smol_llm.chat(QUESTION, GREEDY, add_generation_prompt=False, use_tqdm=False)[0]
    assert not no_gen.prompt.endswith("assistant\n")
    convo = QUESTION + [{"role": "assistant", "content": "The capital of France is"}]
    cont = smol_llm.chat(convo, GREEDY, add_generation_prompt=False, continue_final_message=True,
                         use_tqdm=False)[0]
    assert cont.prompt.endswith("The capital of France is")
    assert cont.outputs[0].text.startswith(" Paris")
    with pytest.raises(ValueError):
        smol_llm.chat(convo, GREEDY, add_generation_prompt=True, continue_final_message=True, use_tqdm=False)


def test_chat_template_override(smol_llm, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    out = smol_llm.chat(QUESTION, GREEDY, chat_template=template, use_tqdm=False)[0]
    assert out.prompt == "[user] What is the capital of France?\n[assistant]"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    assert smol_llm.chat(QUESTION, GREEDY, chat_template=str(path), use_tqdm=False)[0].prompt == out.prompt
