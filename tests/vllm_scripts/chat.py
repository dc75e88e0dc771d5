# A chat script in the shape of vLLM 0.32's examples/offline_inference/basic/chat.py: engine
# flags from EngineArgs on vLLM's FlexibleArgumentParser, `LLM(**args)`, the model's default
# sampling parameters with the flags laid over them, then `llm.chat` on one conversation and on
# a batch. Written for vLLM (only `vllm` imports); tests/test_vllm_shim.py runs it unedited.

from vllm import LLM, EngineArgs, SamplingParams
from vllm.utils.argparse_utils import FlexibleArgumentParser


def create_parser() -> FlexibleArgumentParser:
    parser = FlexibleArgumentParser()
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(model="HuggingFaceTB/SmolLM2-135M-Instruct")
    sampling_group = parser.add_argument_group("Sampling parameters")
    sampling_group.add_argument("--max-tokens", type=int)
    sampling_group.add_argument("--temperature", type=float)
    sampling_group.add_argument("--top-p", type=float)
    sampling_group.add_argument("--top-k", type=int)
    parser.add_argument("--batch-size", type=int, default=2)
    return parser


def print_outputs(outputs) -> None:
    for output in outputs:
        print(f"Prompt: {output.prompt!r}")
        print(f"Generated text: {output.outputs[0].text!r}")
    print("-" * 80)


def main(args: dict) -> None:
    sampling = {name: args.pop(name) for name in ("max_tokens", "temperature", "top_p", "top_k")}
    batch_size = args.pop("batch_size")
    llm = LLM(**args)
    sampling_params = llm.get_default_sampling_params()
    for name, value in sampling.items():
        if value is not None:
            setattr(sampling_params, name, value)
    assert isinstance(sampling_params, SamplingParams)

    conversation = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I assist you today?"},
        {"role": "user", "content": "Write an essay about the importance of higher education."},
    ]
    print("=" * 80)
    print_outputs(llm.chat(conversation, sampling_params, use_tqdm=False))
    print_outputs(llm.chat([conversation] * batch_size, sampling_params, use_tqdm=True))


if __name__ == "__main__":
    main(vars(create_parser().parse_args()))
