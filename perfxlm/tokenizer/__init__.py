"""A tokenizer for machines without `tokenizers` or `transformers` (a RISC-V board's Python):
reads an HF directory's tokenizer.json, tokenizer_config.json and special_tokens_map.json and
gives the ids and text transformers' fast tokenizer gives. Pure Python plus `regex` (and
`jinja2` for chat templates); imports neither torch nor numpy.

Supported tokenizer.json components (any other raises NotImplementedError naming it):
- added tokens: special / normalized / lstrip / rstrip / single_word, split out first;
- normalizers: Sequence, NFC/NFD/NFKC/NFKD, Lowercase, Prepend, Replace, Strip,
  StripAccents, BertNormalizer;
- pre-tokenizers: Sequence, Split (regex or string, every behavior, invert), ByteLevel
  (add_prefix_space, use_regex), Digits, Metaspace (prepend_scheme, split), Whitespace,
  WhitespaceSplit, BertPreTokenizer, Punctuation, CharDelimiterSplit;
- models: BPE (merges as "a b" or [a, b], byte_fallback, ignore_merges,
  continuing_subword_prefix, end_of_word_suffix, unk_token, fuse_unk; no dropout), WordPiece,
  WordLevel (not Unigram);
- post-processors: TemplateProcessing, BertProcessing, RobertaProcessing, ByteLevel, Sequence;
- decoders: ByteLevel, Metaspace, WordPiece, BPEDecoder, and Sequence of Replace /
  ByteFallback / Fuse / Strip.
Chat templates render with jinja2 as transformers renders them.

Character classes follow Unicode as the `regex` module knows it; the `tokenizers` library's
tables are older in places (BERT's punctuation and control-character tests use Unicode 8.0),
so characters assigned since then can split differently there.
"""

import logging
from pathlib import Path
from typing import Any

from perfxlm.tokenizer.hf_tokenizer import HFTokenizer
from perfxlm.tokenizer.pipeline import TokenizerPipeline

logger = logging.getLogger(__name__)

__all__ = ["HFTokenizer", "TokenizerPipeline", "load_tokenizer_files"]


def load_tokenizer_files(directory: str | Path, **kwargs: Any) -> Any:
    """The tokenizer of an HF directory: transformers' AutoTokenizer where transformers can be
    imported, else this package's HFTokenizer (tokenizer.json only)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        logger.info("tokenizer %s: perfxlm's tokenizer.json reader (transformers is not importable: %s)",
                    directory, e)
        return HFTokenizer.from_pretrained(directory, **kwargs)
    logger.info("tokenizer %s: transformers' AutoTokenizer", directory)
    return AutoTokenizer.from_pretrained(str(directory), **kwargs)
