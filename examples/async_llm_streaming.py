"""Streaming with the async engine, as an app written for vLLM's `AsyncLLMEngine` does it: only the
import differs. Two prompts stream at once in DELTA mode (each output carries only the new text);
the second is aborted after a few tokens, the first runs to its end.

    python examples/async_llm_streaming.py [--model MODEL] [--max-tokens N] [--abort-after N]
"""

import argparse
import asyncio

from perfxlm import AsyncLLMEngine, SamplingParams
from perfxlm.engine.arg_utils import AsyncEngineArgs
from perfxlm.sampling_params import RequestOutputKind


async def stream(engine: AsyncLLMEngine, prompt: str, request_id: str, max_tokens: int,
                 abort_after: int | None) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, output_kind=RequestOutputKind.DELTA)
    text, tokens = "", 0
    async for output in engine.generate(prompt, params, request_id):
        for completion in output.outputs:
            text += completion.text
            tokens += len(completion.token_ids)
        if abort_after is not None and tokens >= abort_after and not output.finished:
            await engine.abort(request_id)  # the stream ends with one last output, finish_reason "abort"
        if output.finished:
            print(f"[{request_id}] {tokens} tokens, finish_reason={output.outputs[0].finish_reason}: {text!r}")
    return text


async def main(args: argparse.Namespace) -> None:
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=args.model, disable_log_stats=True))
    try:
        await asyncio.gather(
            stream(engine, "The capital of France is", "full", args.max_tokens, None),
            stream(engine, "Once upon a time, in a land far away,", "aborted", args.max_tokens, args.abort_after),
        )
    finally:
        engine.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--abort-after", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
