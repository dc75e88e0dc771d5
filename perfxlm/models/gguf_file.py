"""Read a GGUF file: HF-style config, weights (float or kept as blocks) and a tokenizer.

Block-quantised tensors (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, ...) are dequantised at load with
llama.cpp's own `gguf` package, or kept as blocks where our kernels run them. Which
parameter a tensor fills, and any convert-time layout to undo, is the model family's
(`gguf_weight_names`, `gguf_tensor`).
"""

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perfxlm.models.layers import CausalLM
from perfxlm.models.registry import gguf_architecture, gguf_architectures, model_class

logger = logging.getLogger(__name__)

# Pre-tokenizer split rules by `tokenizer.ggml.pre` (byte-level BPE vocabularies)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_TENSOR_NAME = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)")


class GGUFFile:
    """One GGUF file, opened memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        import gguf
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except (ValueError, IndexError, KeyError, OSError) as e:  # gguf reports a cut file as a bad reshape
            size = self.path.stat().st_size if self.path.exists() else 0
            raise ValueError(f"{self.path} is not a readable GGUF file ({size} bytes; truncated or corrupt?): "
                             f"{e}") from None
        self._check_complete()
        big = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
               "tokenizer.ggml.scores")  # read on demand by tokenizer()
        self.meta = {k: _field_value(f) for k, f in self.reader.fields.items() if k not in big}
        self.arch = self.meta.get("general.architecture")
        if gguf_architecture(self.arch) is None:
            raise ValueError(f"GGUF architecture {self.arch!r} in {self.path} is not supported; "
                             f"supported: {gguf_architectures()}")

    def _check_complete(self) -> None:
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"{self.path} is truncated: tensor {t.name} ends at byte "
                                 f"{t.data_offset + t.n_bytes} of a {size}-byte file")

    def get(self, key: str, default: Any = None) -> Any:
        """The architecture's metadata value `{arch}.{key}` (llama.cpp's names)."""
        return self.meta.get(f"{self.arch}.{key}", default)

    @property
    def tensor_names(self) -> set[str]:
        return {t.name for t in self.reader.tensors}

    @property
    def vocab_size(self) -> int:
        return self.get("vocab_size") or len(self.reader.fields["tokenizer.ggml.tokens"].data)

    def hf_config(self) -> dict[str, Any]:
        """The equivalent transformers config.json contents, as the model family reads them."""
        architecture = gguf_architecture(self.arch)
        try:
            return model_class([architecture]).config_from_gguf(self, architecture)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{self.path}: its {self.arch} metadata lacks what the model needs ({e})") from None

    def _tensors(self, family: type[CausalLM], kinds: tuple[str, ...]) -> Any:
        """(parameter name, GGUF tensor) for every tensor the family has a parameter for."""
        for t in self.reader.tensors:
            m = _TENSOR_NAME.fullmatch(t.name)
            if m is None or m.group(2) not in family.gguf_weight_names or m.group(3) not in kinds:
                logger.debug("skipping GGUF tensor %s", t.name)
                continue
            layer, base, kind = m.groups()
            yield f"{family.gguf_weight_names[base].format(layer)}.{kind}", t

    def state_dict(self, family: type[CausalLM], params: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """All tensors, dequantised to `dtype`, under the family's parameter names."""
        import gguf
        out = {}
        for name, t in self._tensors(family, ("weight", "bias")):
            w = gguf.quants.dequantize(t.data, t.tensor_type)     # (rows, cols) float32
            w = np.asarray(w, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
            w = family.gguf_tensor(name, w, params, self.arch)
            out[name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)  # copy off the mmap
        return out

    def has_native_blocks(self) -> bool:
        """Whether any weight is in a block format our kernels run (Q8_0/Q4_0/Q4_1 and the
        K-quants Q4_K/Q5_K/Q6_K) or one they hold exactly (Q5_0, as Q8_0; Q5_1, as Q4_1 plus
        Q4_0): a look at the tensor types only, no data read."""
        from graph_export.quant import SPLIT, TRANSCODED, from_gguf_type
        return any(from_gguf_type(t.tensor_type.name) or t.tensor_type.name in (*TRANSCODED, *SPLIT)
                   for t in self.reader.tensors if t.name.endswith(".weight"))

    def linear_blocks(self, family: type[CausalLM], params: Any) -> dict[str, tuple[str, np.ndarray]]:
        """2-D weights, and 3-D stacked MoE experts, whose GGUF blocks have native kernels, kept as
        stored: parameter name -> (weight_format, uint8 ([E,] N, K/block * block bytes), blocks of 32
        weights or 256 for K-quants, so a Q4_K_M file's Q4_K and Q6_K tensors take the file's bytes;
        Q5_0 tensors are rewritten as the Q8_0 blocks of the same values; a 2-D Q5_1 weight as
        Q4_1 blocks, with the Q4_0 blocks that complete it exactly under name + quant.ADDEND,
        which the exporter adds as a second Linear); the exporter uses them where an op's weight
        input (a Linear's weight, MoE's experts) reads that parameter (a tied output projection
        reads the token embedding's)."""
        from graph_export.quant import ADDEND, SPLIT, TRANSCODED, from_gguf_type, split, transcode
        out = {}
        for name, t in self._tensors(family, ("weight",)):
            fmt, data = from_gguf_type(t.tensor_type.name), np.asarray(t.data)  # ([E,] N, row bytes), mmapped
            if t.tensor_type.name in SPLIT and len(t.shape) == 2:
                parts = split(data, t.tensor_type.name)
                for key, (part_fmt, blocks) in zip((name, name + ADDEND), parts or ()):
                    out[key] = (part_fmt, np.ascontiguousarray(family.gguf_tensor(name, blocks, params, self.arch)))
                continue
            if len(t.shape) not in (2, 3) or (fmt is None and t.tensor_type.name not in TRANSCODED):
                continue
            if fmt is None:
                fmt, data = transcode(data, t.tensor_type.name)
            blocks = family.gguf_tensor(name, data, params, self.arch)
            out[name] = (fmt, np.ascontiguousarray(blocks))
        return out

    def tokenizer(self) -> Any:
        """A transformers fast tokenizer built from the GGUF vocabulary and chat template."""
        model = self.meta.get("tokenizer.ggml.model")
        pre = self.meta.get("tokenizer.ggml.pre", "default")
        if model != "gpt2" or pre not in ("smollm", "gpt2", "default", "llama-bpe", "qwen2"):
            # sentencepiece-style vocabularies: transformers' own GGUF converter
            from transformers import AutoTokenizer
            logger.info("tokenizer %s/%s: using transformers' GGUF converter", model, pre)
            return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        return self._bpe_tokenizer(pre)

    def _bpe_tokenizer(self, pre: str) -> Any:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        fields = self.reader.fields
        tokens = _field_value(fields["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in _field_value(fields["tokenizer.ggml.merges"])]
        types = _field_value(fields["tokenizer.ggml.token_type"])
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("smollm", "gpt2", "default"))
        if pre == "smollm":  # digits split one by one before GPT-2's rule (SmolLM's tokenizer.json)
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in ("llama-bpe", "qwen2"):
            split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if pre == "llama-bpe" else _QWEN2_SPLIT),
                                         behavior="isolated")
            tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        # token types: 3 = control, 4 = user defined
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == 3])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == 4])

        def token(key: str) -> str | None:
            i = self.meta.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if i is not None and i < len(tokens) else None

        bos = token("bos")
        if self.meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
            bos_id = tokens.index(bos)
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=bos, eos_token=token("eos"), unk_token=token("unknown"),
            pad_token=token("padding"), chat_template=self.meta.get("tokenizer.chat_template"),
            clean_up_tokenization_spaces=False)


def _field_value(field: Any) -> Any:
    return field.contents()
