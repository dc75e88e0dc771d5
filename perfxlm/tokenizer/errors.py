"""The one error a tokenizer.json component this package does not implement raises."""


def unsupported(section: str, kind: object) -> NotImplementedError:
    """NotImplementedError naming the tokenizer.json section and the component type found there."""
    return NotImplementedError(f"tokenizer.json {section} type {kind!r} is not supported without the "
                               f"`tokenizers` package; install it")
