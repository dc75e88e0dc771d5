# Beam search with vLLM's offline API; only the imports are changed (vllm -> perfxlm).
from perfxlm import LLM, TokensPrompt
from perfxlm.beam_search import BeamSearchParams  # vLLM 0.32: vllm.sampling_params.BeamSearchParams

prompts = [
    {"prompt": "The capital of France is"},
    "The future of AI is",
]
params = BeamSearchParams(beam_width=3, max_tokens=16, length_penalty=1.0)


def main():
    llm = LLM(model="HuggingFaceTB/SmolLM2-135M-Instruct")
    tokenizer = llm.get_tokenizer()
    # a prompt may also be token ids
    token_prompt = TokensPrompt(prompt_token_ids=tokenizer.encode("Once upon a time"))
    outputs = llm.beam_search(prompts + [token_prompt], params)
    print("\nBeam search outputs:\n" + "-" * 60)
    for output in outputs:
        for rank, seq in enumerate(output.sequences):
            # `text` decodes the whole sequence: the prompt, then what was generated
            print(f"#{rank} cum_logprob={seq.cum_logprob:8.3f}  {seq.text!r}")
        print("-" * 60)


if __name__ == "__main__":
    main()
