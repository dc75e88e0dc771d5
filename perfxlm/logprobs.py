from dataclasses import dataclass


@dataclass
class Logprob:
    """The log probability of one token, as vLLM reports it.

    rank: 1 for the most likely token of the vocabulary.
    decoded_token: the token's text (`tokenizer.decode([token_id])`).
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per position: token id -> Logprob (the chosen token plus the top k).
PromptLogprobs = list[dict[int, Logprob] | None]
SampleLogprobs = list[dict[int, Logprob]]
